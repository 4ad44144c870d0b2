"""Dedup removes planted exact and near duplicates (within and across datasets) and keeps unrelated documents."""
import random

import pytest

from megacrystal.data.dedup import dedup_datasets, normalize, shingles
from megacrystal.data.prepare import prepare_dataset

from .conftest import stdlib_docs
from .formats import write_gz, write_jsonl
from .test_readers import expected, shard_docs


def jaccard(a: str, b: str, n: int = 13) -> float:
    """The exact Jaccard similarity of two documents' word 13-gram sets (the reference MinHash estimates)."""
    x, y = shingles(a, n), shingles(b, n)
    return len(x & y) / len(x | y)


def mutate(text: str, rng: random.Random, fraction: float) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[i] = f"w{rng.randrange(10**6)}"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("dedup")
    rng = random.Random(0)
    base = [t for t in stdlib_docs(400, skip=20) if len(normalize(t).split()) >= 120]
    uniques = base[:150]
    assert len(uniques) == 150
    exact = [uniques[i].upper().replace(" ", "  ") + " !" for i in range(0, 20)]  # same after normalizing
    near = [uniques[i] + f"\n# edited copy {i}" for i in range(20, 40)]  # a few 13-grams added
    far = [mutate(uniques[i], rng, 0.08) for i in range(40, 60)]  # many 13-grams broken: Jaccard well below 0.8
    a = write_jsonl(d / "a.jsonl", [{"text": t} for t in uniques[:100] + exact[:10] + near[:10] + far[:10]])
    b = write_gz(d / "b.jsonl.gz", [{"text": t} for t in uniques[100:] + exact[10:] + near[10:] + far[10:]])
    return d, a, b, uniques, exact, near, far


def test_planted_duplicates_removed_unrelated_kept(planted):
    d, a, b, uniques, exact, near, far = planted
    assert min(jaccard(uniques[20 + i], t) for i, t in enumerate(near)) >= 0.9
    assert max(jaccard(uniques[40 + i], t) for i, t in enumerate(far)) <= 0.5
    kw = {"text_field": "text", "filters": {}}
    result = dedup_datasets({"a": ([a], kw), "b": ([b], kw)}, d / "out", near=True, workers=2, progress=False)
    (drop_a, _, counts_a), (drop_b, _, counts_b) = result["a"], result["b"]
    # a: rows 101-110 exact copies of a's own rows, 111-120 near copies; b: its 10 exact/near copies of a's rows
    assert drop_a == {f"{a}:{i}" for i in range(101, 121)}
    assert drop_b == {f"{b}:{i}" for i in range(51, 71)}  # duplicates across datasets count too
    assert counts_a == {"documents": 130, "exact": 10, "near": 10}
    assert counts_b == {"documents": 80, "exact": 10, "near": 10}
    # False positives: the share of the 150 unrelated documents and the 20 at Jaccard <= 0.5 that were removed.
    unrelated = {f"{a}:{i}" for i in [*range(1, 101), *range(121, 131)]} | \
        {f"{b}:{i}" for i in [*range(1, 51), *range(71, 81)]}
    fp_rate = len((drop_a | drop_b) & unrelated) / len(unrelated)
    assert fp_rate == 0.0, fp_rate
    again = dedup_datasets({"a": ([a], kw), "b": ([b], kw)}, d / "out", near=True, progress=False)
    assert again["a"][0] == drop_a  # reused while inputs are unchanged


def test_prepare_skips_the_dropped_documents(planted, small_tok, tmp_path):
    d, a, b, uniques, exact, near, far = planted
    kw = {"text_field": "text", "filters": {}}
    drop, fp, counts = dedup_datasets({"a": ([a], kw)}, tmp_path / "dd", near=False, progress=False)["a"]
    result = prepare_dataset("a", [a], small_tok, tmp_path / "a", valid_fraction=0.0, workers=1, progress=False,
                             drop=drop, drop_fingerprint=fp, dedup_counts=counts)
    assert shard_docs(tmp_path / "a") == expected(small_tok, uniques[:100] + near[:10] + far[:10])
    assert result.meta["duplicates_removed"] == 10 and result.meta["dedup"]["exact"] == 10


def test_config_dedup_across_the_blend_lands_in_meta_and_report(tmp_path, small_tok):
    import copy
    import json

    from megacrystal.data.pipeline import prepare

    from .test_stale import cfg, setup as make_setup

    raw, a = make_setup.__wrapped__(tmp_path, small_tok)
    lines = a.read_text().splitlines()
    own = [json.dumps({"text": t}) for t in stdlib_docs(3, skip=60)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:5] + own) + "\n")  # five of a's documents, three new
    raw = copy.deepcopy(raw)
    raw["data"]["datasets"]["b"]["inputs"] = [str(tmp_path / "b.jsonl")]
    prepare(cfg(raw, dedup="exact"))
    meta = json.loads((tmp_path / "data" / "b.meta.json").read_text())
    assert meta["duplicates_removed"] == 5 and meta["dedup"] == {"documents": 8, "exact": 5, "near": 0}
    assert meta["documents"] == 3
    assert "| b | 3 | " in (tmp_path / "data" / "prepare-report.md").read_text()
    assert (tmp_path / "data" / "prepare-lengths.png").read_bytes()[:4] == b"\x89PNG"
