"""Sharded prepare: split over processes it equals one run; killed and rerun it gives byte-identical shards."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megacrystal.data.errors import DataError
from megacrystal.data.prepare import meta_path, prepare_dataset
from megacrystal.data.prepare_slurm import render

from .conftest import stdlib_docs
from .formats import write_jsonl, write_zst
from .test_readers import expected, shard_docs

ROOT = Path(__file__).resolve().parents[2]


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name[len(out.name):]: p.read_bytes() for p in sorted(out.parent.glob(out.name + "-*"))
            if p.suffix in (".bin", ".idx")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("corpus")
    texts = stdlib_docs(400, skip=40)
    return [write_zst(d / f"part_{k}.jsonl.zst", [{"text": t} for t in texts[k::5]]) for k in range(5)]


def test_num_shards_processes_together_equal_one_run(tmp_path, small_tok, corpus):
    kw = dict(valid_fraction=0.05, workers=1, progress=False, shard_bytes=1)  # one shard per input file
    one = prepare_dataset("d", corpus, small_tok, tmp_path / "one" / "d", **kw)
    assert len(one.meta["shards"]) == 5
    first = prepare_dataset("d", corpus, small_tok, tmp_path / "two" / "d", shard_index=0, num_shards=2, **kw)
    assert first.status == "partial" and first.meta["shards_missing"] == [1, 3]
    assert not meta_path(tmp_path / "two" / "d").exists()
    second = prepare_dataset("d", corpus, small_tok, tmp_path / "two" / "d", shard_index=1, num_shards=2, **kw)
    assert second.status == "built"
    assert shard_files(tmp_path / "one" / "d") == shard_files(tmp_path / "two" / "d")
    for split in ("train", "valid"):
        assert shard_docs(tmp_path / "one" / "d", split) == shard_docs(tmp_path / "two" / "d", split)
    # Every document is in exactly one split of one shard; each shard holds out one at least.
    docs = shard_docs(tmp_path / "one" / "d", "train") + shard_docs(tmp_path / "one" / "d", "valid")
    texts = [json.loads(line)["text"] for p in corpus for line in _zst_lines(p)]
    assert sorted(map(tuple, docs)) == sorted(map(tuple, expected(small_tok, texts)))
    assert second.meta["splits"]["valid"]["documents"] >= 5


def _zst_lines(path: Path) -> list[str]:
    import zstandard

    with zstandard.ZstdDecompressor().stream_reader(path.open("rb")) as r:
        return r.read().decode().splitlines()


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_identical_shards_and_keeps_finished_ones(tmp_path, small_tok):
    texts = stdlib_docs(900)
    inputs = [write_jsonl(tmp_path / f"in_{k:02d}.jsonl", [{"text": t} for t in texts[k::24]]) for k in range(24)]
    kw = dict(valid_fraction=0.02, workers=2, progress=False, shard_bytes=1)
    prepare_dataset("d", inputs, small_tok, tmp_path / "ref" / "d", **kw)
    code = (f"import sys; from megacrystal.data.tokenizer import CrystalTokenizer; "
            f"from megacrystal.data.prepare import prepare_dataset; "
            f"prepare_dataset('d', sys.argv[1:], CrystalTokenizer.load({small_tok.source!r}), "
            f"{str(tmp_path / 'run' / 'd')!r}, **{kw!r})")
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, inputs)], cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "run").glob("d-*.json"))) < 3 and time.monotonic() < deadline \
            and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the workers too, as a preemption would
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("d-*.json")}
    assert 3 <= len(done) < 24 and not meta_path(tmp_path / "run" / "d").exists()
    result = prepare_dataset("d", inputs, small_tok, tmp_path / "run" / "d", **kw)
    assert result.status == "built"
    assert shard_files(tmp_path / "run" / "d") == shard_files(tmp_path / "ref" / "d")
    assert {n: (tmp_path / "run" / n).stat().st_mtime_ns for n in done} == done  # not redone
    assert not list((tmp_path / "run").glob("*.tmp"))  # the killed shard's partial files were rewritten


def test_slurm_array_script(tmp_path):
    config = ROOT / "configs" / "crystal-tiny.yaml"
    script = render(str(config), ["data.dir=/shared/data dir"], 4, 3, tmp_path / "prep.sbatch",
                    ["--partition=cpu"])
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --cpus-per-task=4" in text
    assert "#SBATCH --partition=cpu" in text
    assert "--set 'data.dir=/shared/data dir'" in text
    assert '--shard-index "$SLURM_ARRAY_TASK_ID" --num-shards 4' in text
    for path in (script, tmp_path / "prep-finish.sh"):
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "--shard-index" not in (tmp_path / "prep-finish.sh").read_text()


def test_background_syncs_leave_the_shards_unchanged(tmp_path, small_tok, corpus, monkeypatch):
    """With a sync after every few KB written (instead of every 32 MB) the shards are byte-identical."""
    from megacrystal.data import shards

    kw = dict(valid_fraction=0.05, workers=2, progress=False)
    prepare_dataset("d", corpus, small_tok, tmp_path / "plain" / "d", **kw)
    synced = []
    monkeypatch.setattr(shards, "SYNC_BYTES", 4096)
    monkeypatch.setattr(shards.os, "fdatasync", lambda fd: synced.append(fd) or os.fsync(fd))
    prepare_dataset("d", corpus, small_tok, tmp_path / "synced" / "d", **kw)
    assert len(synced) >= 3
    assert shard_files(tmp_path / "plain" / "d") == shard_files(tmp_path / "synced" / "d")


def test_a_failed_background_sync_fails_the_shard(tmp_path, small_tok, corpus, monkeypatch):
    """An I/O error seen by a background sync stops prepare with one line, and no half shard is left behind."""
    import errno

    from megacrystal.data import shards

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(shards, "SYNC_BYTES", 4096)
    monkeypatch.setattr(shards.os, "fdatasync", broken)
    with pytest.raises(DataError, match=r"writing shard .*d-00000 failed \(Input/output error\); fix the disk"):
        prepare_dataset("d", corpus, small_tok, tmp_path / "d", workers=1, progress=False)
    assert not list(tmp_path.glob("d-*.json")) and not list(tmp_path.glob("d-*.tmp"))
