"""Per-domain metrics and a cooldown phase on the code-cooldown recipe: one run, one resumed run.

- A run through a WSD stable phase and a 1-sqrt cooldown phase with its own blend resumes exactly.
- Each step's training loss per dataset equals the loss recomputed per dataset from samples.jsonl (the rows
  read back from the prepared data and scored with the previous checkpoint's weights).
- Validation bits per byte equal an independent NLL of the validation rows over the UTF-8 bytes of their text.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megacrystal.config import load_config
from megacrystal.data import indexed
from megacrystal.data.pipeline import data_dir, open_streams
from megacrystal.data.prepare import train_bins
from megacrystal.data.tokenizer import CrystalTokenizer
from megacrystal.schedule.from_config import plan_for
from tests.helpers.ranks import run_on_ranks
from tests.train.domain_runs import group_losses

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "lab" / "code-cooldown.yaml")
STEP_TOKENS = 16 * 128
SHORT = ["--set", f"data.phases.stable.tokens={8 * STEP_TOKENS}",
         "--set", f"data.phases.cooldown.tokens={6 * STEP_TOKENS}",
         "--set", "data.phases.stable.lr.warmup_steps=2", "--set", "train.threads=1",
         "--set", "data.log_samples=true", "--set", "checkpoint.interval=5", "--set", "checkpoint.keep=20",
         "--set", "data.eval_interval=100", "--set", "train.log_interval=100"]

pytestmark = pytest.mark.slow


def _train(run_dir: Path, data: list[str], *extra: str) -> None:
    out = subprocess.run([sys.executable, "-m", "megacrystal", "train", "--config", RECIPE,
                          "--set", f"run.dir={run_dir}", *data, *SHORT, *extra],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr


def _jsonl(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("domain")
    _train(root / "full", tiny_data)
    _train(root / "resumed", tiny_data, "--resume", str(root / "full" / "checkpoints" / "step_000000010"))
    config = load_config(RECIPE, [tiny_data[1], *SHORT[1::2]])
    # Independent forward passes, in one spawned process: the training rows of steps 6 (stable) and 11 (cooldown)
    # with the weights saved just before them, and the validation rows with the final weights.
    samples = _jsonl(root / "full" / "samples.jsonl")
    _, streams = open_streams(config, "train")
    _, valid = open_streams(config, "valid")
    rows, jobs = {}, {}
    for step in (6, 11):
        groups: dict[str, list] = {}
        for dataset, index in samples[step]["samples"]:
            groups.setdefault(dataset, []).append(streams[dataset].sample(index).tolist())
        rows[step] = groups
        jobs[f"step{step}"] = (str(root / "full" / "checkpoints" / f"step_{step - 1:09d}"), groups)
    rows["valid"] = {name: stream.first_samples(16) for name, stream in valid.items()}
    jobs["valid"] = (str(root / "full" / "checkpoints" / "step_000000014"),
                     {name: r.tolist() for name, r in rows["valid"].items()})
    (scored,) = run_on_ranks(group_losses, 1, jobs)
    return {"root": root, "config": config, "full": _jsonl(root / "full" / "metrics.jsonl"),
            "resumed": _jsonl(root / "resumed" / "metrics.jsonl"), "rows": rows, "scored": scored}


def test_cooldown_phase_follows_its_schedule_and_blend(runs):
    full, plan = runs["full"], plan_for(runs["config"])
    assert [full[s]["phase"] for s in (8, 9)] == ["stable", "cooldown"]
    assert [full[s]["lr"] for s in range(3, 10)] == [0.006] * 7  # stable, then the cooldown starts at the peak
    assert [full[s]["lr"] for s in range(9, 15)] == pytest.approx([0.006 * (1 - math.sqrt(k / 6)) for k in range(6)])
    assert [full[s]["lr"] for s in full] == [plan.lr_at_step(s - 1) for s in full]
    drawn = {d: sum(full[s]["samples"].get(d, 0) for s in range(9, 15)) for d in ("prose", "python", "web")}
    assert drawn == {"prose": 48, "python": 24, "web": 24}  # 96 cooldown rows at 0.5 / 0.25 / 0.25


def test_run_with_a_cooldown_phase_resumes_exactly(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert sorted(resumed) == list(range(11, 15))
    for key in ("loss", "lr", "loss_per_dataset", "val_loss", "val_bpb", "val_bpb_per_dataset"):
        assert [resumed[s].get(key) for s in resumed] == [full[s].get(key) for s in resumed], key  # bit-exact


def test_training_loss_per_dataset_matches_a_recomputation_from_samples(runs):
    full = runs["full"]
    for step in (6, 11):  # one step of each phase, scored with the weights saved just before it
        groups, scored = runs["rows"][step], runs["scored"][f"step{step}"]
        logged = full[step]["loss_per_dataset"]
        assert sorted(logged) == sorted(groups)
        for dataset, (nll, tokens) in scored.items():
            assert tokens == 128 * len(groups[dataset])
            assert logged[dataset] == pytest.approx(nll / tokens, rel=1e-5), (step, dataset)
        # The per-dataset losses weighted by tokens give back the step's loss (summed in float32 by the engine).
        total = sum(logged[d] * len(groups[d]) for d in groups) / 16
        assert total == pytest.approx(full[step]["loss"], rel=1e-6)


def _document_texts(config, dataset: str, tokenizer: CrystalTokenizer) -> list[tuple[np.ndarray, str]]:
    """(tokens, text) of every validation document; the tokenizer is lossless, so text is the document's text."""
    out = []
    for bin_path in train_bins(data_dir(config) / dataset, "valid"):  # every shard's validation documents
        docs = indexed.open_dataset(str(bin_path)[:-len(".bin")])
        out += _decoded(docs, tokenizer)
    return out


def _decoded(docs, tokenizer: CrystalTokenizer) -> list[tuple[np.ndarray, str]]:
    out = []
    for i in range(len(docs)):
        ids = np.asarray(docs[i], dtype=np.int64)
        text = tokenizer.decode(ids[:-1])  # without its EOS
        assert tokenizer.encode(text) + [tokenizer.eos_id] == ids.tolist()  # round trip: these are its bytes
        out.append((ids, text))
    return out


def test_validation_bits_per_byte_from_text_bytes_and_nll(runs):
    config, last = runs["config"], runs["full"][14]
    tokenizer = CrystalTokenizer.load(data_dir(config) / "tokenizer.model", padded_vocab_size=2048)
    rows, scored = runs["rows"]["valid"], runs["scored"]["valid"]
    nll_all = bytes_all = 0
    for name, windows in rows.items():
        # The labels are stream tokens 1..16*128 (the windows overlap by one token, wrapping a short stream):
        # count the bytes of every whole document they cover, and of the partial ones by decoding their part.
        docs = _document_texts(config, name, tokenizer)
        stream = np.concatenate([ids for ids, _ in docs])
        need = 16 * 128 + 1
        labels = np.resize(stream, need)[1:]
        assert np.array_equal(labels, windows[:, 1:].reshape(-1))
        n_bytes, pos, first = 0, 1, True
        while pos < need:
            doc_index, start = _locate(docs, pos % len(stream))
            ids, text = docs[doc_index]
            end = min(len(ids), start + need - pos)
            if start == 0 and end == len(ids):
                n_bytes += len(text.encode("utf-8"))
            else:  # a document cut by the window range: decode the covered part (first token: keep its space)
                whole = tokenizer.decode(ids[:end][ids[:end] != tokenizer.eos_id])
                before = tokenizer.decode(ids[:start]) if start else ""
                assert "\ufffd" not in whole
                n_bytes += len(whole.encode("utf-8")) - len(before.encode("utf-8"))
            pos += end - start
        nll, tokens = scored[name]
        assert tokens == 16 * 128
        assert last["val_loss"][name] == pytest.approx(nll / tokens, rel=1e-5)
        assert last["val_bpb_per_dataset"][name] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5), name
        nll_all += nll
        bytes_all += n_bytes
    assert last["val_bpb"] == pytest.approx(nll_all / (math.log(2) * bytes_all), rel=1e-5)


def _locate(docs, offset: int) -> tuple[int, int]:
    """(document index, token offset inside it) of a stream offset."""
    for i, (ids, _) in enumerate(docs):
        if offset < len(ids):
            return i, offset
        offset -= len(ids)
    raise AssertionError("offset past the stream")
