"""`megacrystal bench-prepare` end to end on a small real input (Megatron-LM's side needs its source tree,
which CI does not have): every side runs, token counts agree, the report and plot are written."""
import json

from megacrystal.bench.prepare_bench import python_sources_jsonl, run
from megacrystal.data.tokenizer import train_tokenizer


def test_bench_prepare_small(tmp_path):
    jsonl = python_sources_jsonl(tmp_path / "input.jsonl", 300_000)
    model = train_tokenizer([jsonl], tmp_path / "tok", 400)
    report = run(jsonl, model, tmp_path / "out", workers=2, rounds=1, megatron=None, dedup="exact")
    best = report["best"]
    assert set(best) == {"sentencepiece", "sentencepiece-numpy", "megacrystal", "megacrystal+dedup-exact"}
    assert report["identical_token_counts"]
    assert best["megacrystal"]["tokens"] == best["sentencepiece"]["tokens"] > 0
    limit = min(best["sentencepiece"]["seconds"], best["sentencepiece-numpy"]["seconds"])
    assert best["megacrystal"]["of_sentencepiece_limit"] == round(limit / best["megacrystal"]["seconds"], 3)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["best"] == best
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "prepare.png").stat().st_size > 0


def test_bench_prepare_skip_names_unknown_sides(tmp_path):
    import pytest

    from megacrystal.data.errors import DataError

    for skip in (("megacrystal",), ("megatron-lm",)):  # ours always runs; Megatron-LM only with --megatron
        with pytest.raises(DataError, match="--skip"):
            run(tmp_path / "in.jsonl", tmp_path / "m.model", tmp_path / "out", 2, 1, None, "none", skip)
