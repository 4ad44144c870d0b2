"""FIM layouts, rates, determinism and fixed-length handling."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from megacrystal.data.fim import apply_fim, fim_rng, fim_sample

FIM = {"prefix": 100, "middle": 101, "suffix": 102, "pad": 103}
P, M, S, PAD = 100, 101, 102, 103
EOS = 2


def draws(seed, n, spm_rate=0.5):
    """The cut points and layout apply_fim will draw from fim_rng(seed, 0, 0) for an n-token document."""
    rng = fim_rng(seed, 0, 0)
    rng.random()
    lo, hi = np.sort(rng.integers(0, n + 1, size=2))
    return int(lo), int(hi), bool(rng.random() < spm_rate)


def test_psm_and_spm_layouts_exact():
    doc = list(range(10, 20))
    # Seed whose cuts fall strictly inside the document, so every part is non-empty.
    seed = next(s for s in range(1000) if 0 < draws(s, 10)[0] < draws(s, 10)[1] < 10)
    lo, hi, _ = draws(seed, 10)
    prefix, middle, suffix = doc[:lo], doc[lo:hi], doc[hi:]

    psm = apply_fim(doc, 1.0, fim_rng(seed, 0, 0), FIM, spm_rate=0.0)
    assert psm.mode == "psm"
    assert psm.tokens.tolist() == [P, *prefix, S, *suffix, M, *middle]

    spm = apply_fim(doc, 1.0, fim_rng(seed, 0, 0), FIM, spm_rate=1.0)
    assert spm.mode == "spm"
    assert spm.tokens.tolist() == [P, S, *suffix, M, *prefix, *middle]
    assert spm.loss_mask.tolist() == [1.0] * (len(doc) + 3)


def test_literal_example():
    # A worked example to read: cuts at 2 and 5 of [1..7].
    seed = next(s for s in range(10000) if draws(s, 7)[:2] == (2, 5))
    assert apply_fim([1, 2, 3, 4, 5, 6, 7], 1.0, fim_rng(seed, 0, 0), FIM, spm_rate=0.0).tokens.tolist() == \
        [P, 1, 2, S, 6, 7, M, 3, 4, 5]
    assert apply_fim([1, 2, 3, 4, 5, 6, 7], 1.0, fim_rng(seed, 0, 0), FIM, spm_rate=1.0).tokens.tolist() == \
        [P, S, 6, 7, M, 1, 2, 3, 4, 5]


def test_rate_zero_is_identity():
    for i in range(200):
        doc = np.arange(i % 17 + 1) + 5
        r = apply_fim(doc, 0.0, fim_rng(1, 0, i), FIM)
        assert r.mode == "none" and r.tokens.tolist() == doc.tolist() and r.loss_mask.all()


def test_rate_half_statistically():
    modes = [apply_fim(np.arange(50), 0.5, fim_rng(7, 0, i), FIM).mode for i in range(4000)]
    transformed = [m for m in modes if m != "none"]
    assert abs(len(transformed) / len(modes) - 0.5) < 0.03  # ~4.7 sigma for n=4000
    assert abs(transformed.count("spm") / len(transformed) - 0.5) < 0.04


def test_deterministic_per_seed_epoch_document():
    doc = np.arange(100)
    a = [apply_fim(doc, 0.9, fim_rng(3, 1, i), FIM).tokens.tolist() for i in range(20)]
    b = [apply_fim(doc, 0.9, fim_rng(3, 1, i), FIM).tokens.tolist() for i in range(20)]
    assert a == b
    other_epoch = [apply_fim(doc, 0.9, fim_rng(3, 2, i), FIM).tokens.tolist() for i in range(20)]
    other_seed = [apply_fim(doc, 0.9, fim_rng(4, 1, i), FIM).tokens.tolist() for i in range(20)]
    assert a != other_epoch and a != other_seed
    assert len({tuple(x) for x in a}) > 10  # documents get different draws too


def test_fixed_length_truncates_the_suffix():
    doc = list(range(10, 40))
    for seed in range(200):
        lo, hi, spm = draws(seed, 30)
        r = apply_fim(doc, 1.0, fim_rng(seed, 0, 0), FIM, length=30)
        assert len(r.tokens) == 30 and r.loss_mask.tolist() == [1.0] * 30
        if 30 - hi <= 3:  # suffix too short to give up 3 tokens: Crystal leaves the document as it is
            assert r.mode == "none" and r.tokens.tolist() == doc
            continue
        suffix = doc[hi:-3]
        expected = [P, S, *suffix, M, *doc[:hi]] if spm else [P, *doc[:lo], S, *suffix, M, *doc[lo:hi]]
        assert r.tokens.tolist() == expected


def test_fixed_length_pads_with_fim_pad_and_mask_zero():
    r = apply_fim(list(range(10, 20)), 1.0, fim_rng(0, 0, 0), FIM, length=20)
    assert r.tokens.tolist()[13:] == [PAD] * 7
    assert r.loss_mask.tolist() == [1.0] * 13 + [0.0] * 7
    r = apply_fim(list(range(10, 20)), 0.0, fim_rng(0, 0, 0), FIM, length=12)
    assert r.tokens.tolist() == list(range(10, 20)) + [PAD, PAD] and r.loss_mask.tolist()[-3:] == [1, 0, 0]


def test_packed_sample_keeps_length_and_documents():
    sample = np.array([5, 6, 7, 8, EOS, 9, 10, 11, EOS, 12, 13, 14, 15, 16], dtype=np.int64)
    same = fim_sample(sample, EOS, 0.0, fim_rng(0, 0, 0), FIM)
    assert same.tokens.tolist() == sample.tolist() and same.mode == "none"
    r = fim_sample(sample, EOS, 1.0, fim_rng(0, 0, 0), FIM)
    assert len(r.tokens) == len(sample) and r.loss_mask.all()
    assert r.tokens[0] == P and r.tokens.tolist().count(P) >= 2  # every document that fits got transformed
    assert r.tokens.tolist()[: r.tokens.tolist().index(EOS)].count(M) == 1
    padded = fim_sample(sample, EOS, 0.0, fim_rng(0, 0, 0), FIM, length=16)
    assert padded.tokens.tolist()[-2:] == [PAD, PAD] and padded.loss_mask.tolist()[-3:] == [1, 0, 0]


def test_missing_fim_ids():
    with pytest.raises(KeyError, match="pad"):
        apply_fim([1, 2], 1.0, fim_rng(0, 0, 0), {"prefix": 1, "middle": 2, "suffix": 3})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 99), max_size=60), st.integers(0, 2**31), st.floats(0, 1))
def test_fim_is_a_permutation_plus_three_sentinels(doc, seed, spm_rate):
    r = apply_fim(doc, 1.0, fim_rng(seed, 0, 0), FIM, spm_rate=spm_rate)
    assert len(r.tokens) == len(doc) + 3
    assert sorted(t for t in r.tokens.tolist() if t < 100) == sorted(doc)
    assert sorted(t for t in r.tokens.tolist() if t >= 100) == [P, M, S]
