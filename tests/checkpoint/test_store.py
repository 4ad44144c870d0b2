"""The checkpoint store on real files: atomic commits, kills mid-save, damage, full disks, retention, resume."""
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacrystal.checkpoint import store as store_mod
from megacrystal.checkpoint.errors import (CheckpointDamaged, CheckpointError, CheckpointMismatch,
                                           CheckpointWarning, NotACheckpoint)
from megacrystal.checkpoint.manifest import MANIFEST, read_manifest, verify, write_manifest
from megacrystal.checkpoint.store import LATEST, CheckpointStore

ROOT = Path(__file__).resolve().parents[2]
SHARD = "__0_0.distcp"


def save(store: CheckpointStore, step: int, phase_end: bool = False, **files: bytes) -> Path:
    files = files or {SHARD: bytes([step % 256]) * 4096, "common.pt": b"common"}
    with store.saving(step, {"tokens": step * 512}, phase_end=phase_end) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return store.step_dir(step)


def steps(store: CheckpointStore) -> list[int]:
    return [int(p.name[5:]) for p in store.list()]


def scratch(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def pointer(root: Path) -> str:
    return (root / LATEST).read_text().strip()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_save_commits_a_verified_checkpoint_and_moves_latest(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    first = save(store, 1)
    second = save(store, 2, phase_end=True)
    assert second == tmp_path / "ckpt" / "step_000000002" and steps(store) == [1, 2]
    assert store.latest() == second and pointer(store.root) == "step_000000002"
    meta = verify(second)["metadata"]
    assert meta == {"tokens": 1024, "step": 2, "phase_end": True}
    assert verify(first)["metadata"]["phase_end"] is False
    assert scratch(store.root) == []


def test_distributed_flow_commits_files_written_by_other_processes(tmp_path):
    store = CheckpointStore(tmp_path)
    tmp = store.begin(7)
    assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-step_000000007-") and not store.list()
    # Another "rank" writes its shard into the broadcast directory; commit only sees files on disk.
    subprocess.run([sys.executable, "-c", f"open({str(tmp / '__1_0.distcp')!r}, 'wb').write(b'r1' * 100)"],
                   check=True)
    (tmp / SHARD).write_bytes(b"r0" * 100)
    final = store.commit(tmp, 7, {"tokens": 1})
    assert sorted(read_manifest(final)["files"]) == [SHARD, "__1_0.distcp"] and store.latest() == final


def test_commit_rejects_directories_it_did_not_begin(tmp_path):
    store = CheckpointStore(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ValueError, match="not a save directory returned by begin"):
        store.commit(other, 1, {})
    tmp = store.begin(1)
    with pytest.raises(ValueError, match="was begun for step_000000001, not step_000000002"):
        store.commit(tmp, 2, {})
    with pytest.raises(ValueError, match=r"metadata\['step'\] is 5"):
        store.commit(tmp, 1, {"step": 5})
    with pytest.raises(ValueError, match="not a save directory"):
        store.abort(other)
    assert other.exists()


def test_an_error_while_writing_aborts_and_propagates_unchanged(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    with pytest.raises(KeyError, match="bug"):
        with store.saving(2, {}) as tmp:
            (tmp / SHARD).write_bytes(b"partial")
            raise KeyError("bug")
    assert steps(store) == [1] and pointer(tmp_path) == "step_000000001" and scratch(tmp_path) == []


def test_before_rename_hook_failure_leaves_previous_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    store.before_rename = lambda tmp: (_ for _ in ()).throw(RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        save(store, 2)
    assert steps(store) == [1] and store.latest().name == "step_000000001" and scratch(tmp_path) == []


# -- kill during a save ---------------------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from megacrystal.checkpoint.store import CheckpointStore
store = CheckpointStore(sys.argv[1])
with store.saving(int(sys.argv[2]), {"tokens": 1}) as tmp:
    (tmp / "__0_0.distcp").write_bytes(b"new" * 50000)
"""


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the writer never reached the pause"
        time.sleep(0.02)


@pytest.mark.parametrize("pause, step", [("30", 2), ("before_rename:30", 1), ("before_latest:30", 2)],
                         ids=["new-step-before-rename", "replacing-step-before-rename", "new-step-before-latest"])
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, pause, step):
    store = CheckpointStore(tmp_path)
    first = save(store, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(ROOT), store_mod.PAUSE_ENV: pause}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(step)], env=env)
    try:
        if pause.startswith("before_latest"):
            wait_for(lambda: (tmp_path / "step_000000002" / MANIFEST).exists())
        else:
            wait_for(lambda: any((p / MANIFEST).exists() for p in tmp_path.glob(".tmp-*")))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert pointer(tmp_path) == "step_000000001"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    resumed = CheckpointStore(tmp_path)  # the relaunch: cleans the dead writer's scratch directory
    assert scratch(tmp_path) == [] and resumed.latest() == first
    assert resumed.resolve_resume("auto") == first  # `latest` is the commit point, even if step_2 got renamed


def test_a_writer_killed_between_moving_aside_and_renaming_in_is_undone(tmp_path):
    store = CheckpointStore(tmp_path)
    good = save(store, 2)
    aside = tmp_path / f".old-{good.name}-{socket.gethostname()}-{dead_pid()}-{uuid.uuid4().hex[:8]}"
    os.rename(good, aside)
    stale = tmp_path / f".tmp-{good.name}-{socket.gethostname()}-{dead_pid()}-0badcafe"
    stale.mkdir()
    with pytest.warns(CheckpointWarning, match="restored checkpoint .*step_000000002"):
        CheckpointStore(tmp_path)
    assert verify(good) and scratch(tmp_path) == []


def test_recovery_removes_only_dead_writers_scratch(tmp_path):
    store = CheckpointStore(tmp_path, stale_after_s=60)
    save(store, 1)
    host = socket.gethostname()
    live = store.begin(2)  # this process is alive
    dead = tmp_path / f".tmp-step_000000002-{host}-{dead_pid()}-00000001"
    deleting = tmp_path / f".del-step_000000001-{host}-{dead_pid()}-00000002"
    far_fresh = tmp_path / f".tmp-step_000000002-other-host-{os.getpid()}-00000004"
    for d in (dead, deleting, far_fresh):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"x")
    far_old = tmp_path / f".tmp-step_000000002-other-host-{os.getpid()}-00000003"
    (far_old / "sub").mkdir(parents=True)
    for p in (far_old / "sub" / "f", far_old / "sub", far_old):
        if p.name == "f":
            p.write_bytes(b"x")
        os.utime(p, (time.time() - 120, time.time() - 120))
    (tmp_path / "step_000000005").mkdir()  # looks like a checkpoint without a manifest: never deleted
    CheckpointStore(tmp_path, stale_after_s=60)
    assert scratch(tmp_path) == sorted([live.name, far_fresh.name])
    assert (tmp_path / "step_000000005").is_dir() and steps(store) == [1]


def test_rename_exchange_swaps_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "x").parent.mkdir()
    (a / "x").write_text("a")
    (b / "y").parent.mkdir()
    (b / "y").write_text("b")
    if not store_mod.rename_exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    assert (a / "y").read_text() == "b" and (b / "x").read_text() == "a"


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "move-aside"])
def test_resaving_a_step_replaces_it(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(store_mod, "rename_exchange", lambda a, b: False)
    store = CheckpointStore(tmp_path)
    save(store, 1, **{"old_only.bin": b"old", SHARD: b"old shard"})
    seen = []
    store.before_latest = lambda final: seen.append(verify(final)["files"].keys())
    replaced = save(store, 1, **{SHARD: b"new shard"})
    assert list(seen[0]) == [SHARD]  # the step dir held the complete new checkpoint before `latest` was touched
    assert (replaced / SHARD).read_bytes() == b"new shard" and not (replaced / "old_only.bin").exists()
    assert pointer(tmp_path) == "step_000000001" and scratch(tmp_path) == [] and steps(store) == [1]


# -- damage and resume --------------------------------------------------------------------------------------

def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:1000])


def bitflip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[2048] ^= 1
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (truncate, "__0_0.distcp is truncated (1000 of 4096 bytes)"),
    (bitflip, "__0_0.distcp is corrupt (sha256 differs from manifest.json)"),
    (Path.unlink, "__0_0.distcp is missing"),
])
def test_damaged_newest_checkpoint(tmp_path, damage, problem):
    store = CheckpointStore(tmp_path)
    first, newest = save(store, 1), save(store, 2)
    damage(newest / SHARD)
    state = {p.name: p.read_bytes() for p in newest.iterdir()}
    with pytest.raises(CheckpointDamaged) as exc:  # an explicit PATH: fatal, one line naming the file
        store.resolve_resume(str(newest))
    assert str(exc.value) == (f"checkpoint {newest} is damaged: {problem}; resume from an earlier checkpoint "
                              "(`--resume auto` skips damaged ones) or restore the file")
    with pytest.warns(CheckpointWarning) as warned:  # auto: falls back to the previous one, naming the file
        assert store.resolve_resume("auto") == first
    assert [str(w.message) for w in warned] == [f"--resume auto skips damaged checkpoint {newest}: {problem}"]
    assert {p.name: p.read_bytes() for p in newest.iterdir()} == state  # nothing overwritten or deleted
    assert pointer(tmp_path) == newest.name


def test_auto_when_every_checkpoint_is_damaged_refuses_to_start_over(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in (1, 2):
        truncate(save(store, step) / SHARD)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as exc:
        store.resolve_resume("auto")
    assert str(exc.value) == (f"no intact checkpoint in {tmp_path}: all 2 are damaged (newest, step_000000002: "
                              "__0_0.distcp is truncated (1000 of 4096 bytes)); restore the files or start over "
                              "with --resume none")


def test_resume_specs(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.resolve_resume("auto") is None and store.resolve_resume("none") is None
    first, second = save(store, 1), save(store, 2)
    assert store.resolve_resume("none") is None
    assert store.resolve_resume("auto") == second
    assert store.resolve_resume(str(first)) == first
    assert store.resolve_resume(str(tmp_path / "ckpt")) == second  # a root means its `latest`
    monkeypatch.chdir(tmp_path)
    assert store.resolve_resume("ckpt/step_000000001") == first
    with pytest.raises(NotACheckpoint, match=f"^{tmp_path} is not a checkpoint \\(no manifest.json\\)"):
        store.resolve_resume(str(tmp_path))
    with pytest.raises(NotACheckpoint, match="no such directory"):
        store.resolve_resume(str(tmp_path / "typo"))


def test_checkpoint_of_another_model_is_fatal_for_auto_too(tmp_path):
    store = CheckpointStore(tmp_path)
    with store.saving(1, {"model_fingerprint": "crystal-7b"}) as tmp:
        (tmp / SHARD).write_bytes(b"w")
    expect = {"model_fingerprint": "crystal-tiny"}
    for spec in ("auto", str(store.step_dir(1))):
        with pytest.raises(CheckpointMismatch, match="model_fingerprint is 'crystal-7b' in the checkpoint, "
                                                     "'crystal-tiny' expected"):
            store.resolve_resume(spec, expect=expect)
    assert store.resolve_resume("auto", expect={"model_fingerprint": "crystal-7b"}) == store.step_dir(1)


def test_latest_falls_back_when_the_pointer_is_missing_or_stale(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    save(store, 3)
    (tmp_path / "step_000000009").mkdir()  # no manifest: not a complete checkpoint
    assert steps(store) == [1, 3]
    for text in (None, "step_000000004\n", "../../etc\n", "garbage"):
        (tmp_path / LATEST).unlink(missing_ok=True)
        if text is not None:
            (tmp_path / LATEST).write_text(text)
        assert store.latest() == tmp_path / "step_000000003"
    (tmp_path / LATEST).write_text("step_000000001\n")
    assert store.latest() == tmp_path / "step_000000001"


def test_auto_follows_latest_not_the_highest_step(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        save(store, step)
    branch = save(store, 2)  # a run resumed from an earlier step saves again
    assert steps(store) == [2, 3, 4]  # retention leaves steps above the new head alone
    assert store.resolve_resume("auto") == branch
    (tmp_path / LATEST).write_text("step_000000006\n")
    stale = "names step_000000006, which does not exist; starting from step_000000004"
    with pytest.warns(CheckpointWarning, match=stale):
        assert store.resolve_resume("auto") == store.step_dir(4)


# -- retention ----------------------------------------------------------------------------------------------

def test_retention_keeps_last_k_and_every_phase_end_across_restarts(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in range(1, 7):
        save(store, step, phase_end=step in (2, 4))
    assert steps(store) == [2, 4, 5, 6]
    save(CheckpointStore(tmp_path, keep=2), 7)  # the phase-end marks are read back from the manifests
    assert steps(store) == [2, 4, 6, 7] and store.latest().name == "step_000000007"
    assert scratch(tmp_path) == []
    with pytest.raises(ValueError, match="keep must be >= 1"):
        CheckpointStore(tmp_path, keep=0)


def test_retention_keeps_checkpoints_it_cannot_read(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    save(store, 1)
    (store.step_dir(1) / MANIFEST).write_text("{")
    with pytest.warns(CheckpointWarning, match="retention keeps .*step_000000001: its manifest.json is missing"):
        save(store, 2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000000001", "step_000000002"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.one_of(st.none(), st.integers(1, 4)), phase_ends=st.lists(st.booleans(), min_size=1, max_size=7))
def test_retention_property(tmp_path_factory, keep, phase_ends):
    store = CheckpointStore(tmp_path_factory.mktemp("ret"), keep=keep)
    for step, phase_end in enumerate(phase_ends, start=1):
        save(store, step, phase_end, **{SHARD: b"x"})
    n = len(phase_ends)
    last_k = set(range(1, n + 1)) if keep is None else set(range(max(1, n - keep + 1), n + 1))
    assert set(steps(store)) == last_k | {s for s, pe in enumerate(phase_ends, start=1) if pe}
    assert store.latest() == store.step_dir(n)


# -- full disk ----------------------------------------------------------------------------------------------

def assert_previous_intact(store: CheckpointStore, previous: Path) -> None:
    assert verify(previous) and store.latest() == previous and pointer(store.root) == previous.name
    assert [p for p in store.list()] == [previous] and scratch(store.root) == []


def test_enospc_from_the_writer_fails_loudly_and_keeps_the_previous_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    previous = save(store, 1)
    with pytest.raises(CheckpointError) as exc:
        with store.saving(2, {}) as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / SHARD))
    tmp = re.escape(f"{store.root}/.tmp-step_000000002-")
    assert re.fullmatch(f"checkpoint save of step_000000002 failed: no space left on device writing {tmp}.*/{SHARD}; "
                        f"the previous checkpoint {re.escape(str(previous))} is intact; free space or change "
                        "checkpoint.dir", str(exc.value))
    assert isinstance(exc.value.__cause__, OSError)
    assert_previous_intact(store, previous)


def test_enospc_wrapped_by_torch_distributed_checkpoint_is_recognised(tmp_path):
    api = pytest.importorskip("torch.distributed.checkpoint.api")
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="no space left on device writing .*; there is no previous checkpoint"):
        with store.saving(1, {}):
            # torch's CheckpointException is a BaseException carrying each rank's (exception, traceback).
            raise api.CheckpointException("save failed", {1: (OSError(errno.ENOSPC, "No space left on device"), None)})
    assert store.list() == [] and scratch(tmp_path) == []


def test_enospc_while_writing_the_manifest(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    previous = save(store, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "manifest.json")
    monkeypatch.setattr(store_mod, "write_manifest", full)
    with pytest.raises(CheckpointError, match="no space left on device writing manifest.json; the previous"):
        save(store, 2)
    assert_previous_intact(store, previous)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 256 KiB tmpfs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_disk_while_writing_a_shard(tiny_tmpfs):
    store = CheckpointStore(tiny_tmpfs)
    previous = save(store, 1, **{SHARD: b"p" * 64 * 1024})
    with pytest.raises(CheckpointError, match="^checkpoint save of step_000000002 failed: no space left on device"):
        save(store, 2, **{SHARD: b"n" * 512 * 1024})
    assert_previous_intact(store, previous)
    assert os.statvfs(tiny_tmpfs).f_bfree * os.statvfs(tiny_tmpfs).f_frsize > 150 * 1024  # the partial save is gone


def test_real_full_disk_while_writing_the_manifest(tiny_tmpfs, monkeypatch):
    store = CheckpointStore(tiny_tmpfs)
    previous = save(store, 1, **{SHARD: b"p" * 64 * 1024})
    failed = []

    def spy(*args, **kwargs):
        try:
            return write_manifest(*args, **kwargs)
        except OSError as exc:
            failed.append(exc.errno)
            raise
    monkeypatch.setattr(store_mod, "write_manifest", spy)
    with pytest.raises(CheckpointError, match="no space left on device writing .*; the previous checkpoint"):
        with store.saving(2, {}) as tmp:
            with open(tmp / "filler", "wb", buffering=0) as f:  # the shards fit, exactly filling the disk
                with pytest.raises(OSError) as full:
                    while True:
                        f.write(b"f" * 4096)
            assert full.value.errno == errno.ENOSPC
    assert failed == [errno.ENOSPC]  # it was the manifest that did not fit
    assert_previous_intact(store, previous)


def test_files_written_0600_get_the_umask_mode_at_commit(tmp_path):
    """Writers that go through mkstemp (safetensors, some torch writers) leave 0600 files; the group of a shared
    run directory must read a checkpoint like any other file there."""
    store = CheckpointStore(tmp_path)
    old = os.umask(0o027)
    try:
        with store.saving(1, {"tokens": 512}) as tmp:
            (tmp / SHARD).write_bytes(b"x" * 64)
            os.chmod(tmp / SHARD, 0o600)
            (tmp / "common.pt").write_bytes(b"common")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in store.step_dir(1).iterdir()} == \
        {SHARD: "0o640", "common.pt": "0o640", MANIFEST: "0o640"}
