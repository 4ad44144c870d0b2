"""`megacrystal bench-prepare` end to end on a small real input (Megatron-LM's side needs its source tree,
which CI does not have): every side runs, token counts agree, the report and plot are written."""
import json

from megacrystal.bench.prepare_bench import ids_digest, python_sources_jsonl, run, run_inputs
from megacrystal.data.tokenizer import train_tokenizer


def test_bench_prepare_small(tmp_path):
    """Two sizes of one input (as --repeat 1,2 writes them): every side per size, and one summary over both; our
    shards hold the ids of sentencepiece's own encode."""
    small = python_sources_jsonl(tmp_path / "input-x1.jsonl", 300_000)
    double = python_sources_jsonl(tmp_path / "input-x2.jsonl", 300_000, repeat=2)
    model = train_tokenizer([small], tmp_path / "tok", 400)
    summary = run_inputs([small, double], model, tmp_path / "out", workers=2, rounds=1, megatron=None,
                         dedup="exact")
    reports = [json.loads((tmp_path / "out" / sub / "report.json").read_text()) for sub in ("1-0mb", "2-1mb")]
    for report in reports:
        best = report["best"]
        assert set(best) == {"sentencepiece", "sentencepiece-numpy", "megacrystal", "megacrystal+dedup-exact"}
        assert report["identical_token_counts"] and report["identical_token_ids"]
        assert best["megacrystal"]["tokens"] == best["sentencepiece"]["tokens"] > 0
        limit = min(best["sentencepiece"]["seconds"], best["sentencepiece-numpy"]["seconds"])
        assert best["megacrystal"]["of_sentencepiece_limit"] == round(limit / best["megacrystal"]["seconds"], 3)
        assert report["of_sentencepiece_limit_per_round"] == [best["megacrystal"]["of_sentencepiece_limit"]]
    assert reports[1]["best"]["megacrystal"]["tokens"] == 2 * reports[0]["best"]["megacrystal"]["tokens"]
    rows = summary["rows"]
    assert [r["megacrystal_seconds"] for r in rows] == [r["best"]["megacrystal"]["seconds"] for r in reports]
    assert summary["peak_rss_growth"] == round(rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1, 3)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Peak RSS of `megacrystal prepare`" in md and md.count("| megacrystal |") == 2
    assert (tmp_path / "out" / "1-0mb" / "prepare.png").stat().st_size > 0


def test_bench_prepare_skips_the_list_encode_without_memory_for_it(tmp_path, monkeypatch):
    from megacrystal.bench import prepare_bench

    jsonl = python_sources_jsonl(tmp_path / "input.jsonl", 100_000)
    model = train_tokenizer([jsonl], tmp_path / "tok", 400)
    monkeypatch.setattr(prepare_bench, "_available_memory", lambda: 1_000_000)
    report = run(jsonl, model, tmp_path / "out", workers=1, rounds=1, megatron=None, dedup="none")
    assert set(report["best"]) == {"sentencepiece-numpy", "megacrystal"}
    assert "Python int lists need" in report["notes"]["sentencepiece"]
    assert "sentencepiece: not run" in (tmp_path / "out" / "report.md").read_text()


def test_bench_prepare_skip_names_unknown_sides(tmp_path):
    import pytest

    from megacrystal.data.errors import DataError

    for skip in (("megacrystal",), ("megatron-lm",)):  # ours always runs; Megatron-LM only with --megatron
        with pytest.raises(DataError, match="--skip"):
            run(tmp_path / "in.jsonl", tmp_path / "m.model", tmp_path / "out", 2, 1, None, "none", skip)


def test_ids_digest_ignores_document_order_but_not_ids_or_repeats():
    import numpy as np

    a, b = np.array([5, 6, 2]), [7, 2]
    assert ids_digest([a, b]) == ids_digest([b, a]) == ids_digest([list(a), np.array(b, np.uint16)])
    assert ids_digest([a, b]) != ids_digest([a, [8, 2]])
    assert ids_digest([a, a, b]) != ids_digest([a, b]) != ids_digest([np.array([5, 6, 2, 7, 2])])
