"""A directory of checkpoints with atomic commits, a `latest` pointer, retention and resume resolution.

Layout under `root`: complete checkpoints `step_000000100/` (each with `manifest.json`), the text file `latest`
naming one of them, and scratch directories of saves in progress (`.tmp-*`), of a replaced checkpoint (`.old-*`)
and of a deletion (`.del-*`). A checkpoint becomes visible only by one rename of a fully written, fsynced and
size-verified directory, and `latest` moves only after that, so a crash at any point leaves the previous
checkpoint loadable and `latest` naming a complete one.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CheckpointDamaged, CheckpointError, CheckpointWarning
from .manifest import MANIFEST, atomic_write_text, fsync_dir, honour_umask, read_manifest, verify, write_manifest

LATEST = "latest"
PAUSE_ENV = "MEGACRYSTAL_CKPT_TEST_PAUSE"  # "<seconds>" or "<point>:<seconds>", point before_rename|before_latest
_STEP_RE = re.compile(r"step_(\d{9,})")
_TMP, _OLD, _DEL = ".tmp-", ".old-", ".del-"
_POINTER_TMP = f".{LATEST}.tmp-"


def step_name(step: int) -> str:
    """`step_000000100`: the directory name of a step's checkpoint (zero-padded so names sort by step)."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:09d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint directory name, or None if it is not one."""
    m = _STEP_RE.fullmatch(name)
    return int(m.group(1)) if m else None


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (or not Linux)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange_flag = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange_flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system without the flag
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it wraps: causes, contexts, groups, torch's CheckpointException failures."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__, *e.args, *getattr(e, "exceptions", ())]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint: {rank: (exc, traceback)}
        if isinstance(failures, dict):
            for v in failures.values():
                stack += list(v) if isinstance(v, tuple) else [v]


def _space_error(exc: BaseException) -> OSError | None:
    """The out-of-space (ENOSPC, EDQUOT) error inside `exc`, also when only its text survived pickling."""
    for e in _exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
    text = str(exc)
    if "No space left on device" in text or "[Errno 28]" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


class CheckpointStore:
    """The checkpoints under `root`: begin/commit/abort a save, list, `latest`, retention, resume resolution.

    In a distributed run rank 0 calls `begin` and `commit`; every rank writes its files into the directory
    `begin` returned. Construct with `recover=False` on the other ranks so only one process cleans up.
    """

    def __init__(self, root: str | os.PathLike, keep: int | None = None, recover: bool = True,
                 stale_after_s: float = 3600.0):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (or None to keep every checkpoint), got {keep}")
        self.root = Path(root).absolute()
        self.keep = keep
        # Scratch directories of writers on other hosts (whose processes we cannot see) count as dead once
        # nothing in them has changed for this long.
        self.stale_after_s = stale_after_s
        # Test hooks: called with the directory about to be renamed / the new checkpoint before `latest` moves.
        self.before_rename: Callable[[Path], None] | None = None
        self.before_latest: Callable[[Path], None] | None = None
        if recover and self.root.is_dir():
            self.recover()

    # -- naming ------------------------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        """Where the checkpoint of `step` lives once committed."""
        return self.root / step_name(step)

    def _scratch(self, prefix: str, name: str) -> Path:
        return self.root / f"{prefix}{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    @staticmethod
    def _scratch_owner(name: str) -> tuple[str, str, int] | None:
        """(checkpoint name, host, pid) of a scratch directory name, None if it is not one."""
        for prefix in (_TMP, _OLD, _DEL):
            if name.startswith(prefix):
                ckpt, _, rest = name[len(prefix):].partition("-")
                parts = rest.rsplit("-", 2)
                if len(parts) == 3 and parts[1].isdigit() and parse_step(ckpt) is not None:
                    return ckpt, parts[0], int(parts[1])
        return None

    # -- recovery ----------------------------------------------------------------------------------------

    def _alive(self, path: Path, host: str, pid: int) -> bool:
        if host == socket.gethostname():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # exists, owned by someone else
                return True
            return True
        cutoff = time.time() - self.stale_after_s
        try:
            return any(p.lstat().st_mtime > cutoff for p in [path, *path.rglob("*")])
        except FileNotFoundError:
            return False

    def recover(self) -> None:
        """Clean up after dead writers: drop their scratch dirs, restore a checkpoint caught mid-replacement."""
        changed = False
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(_POINTER_TMP):
                # A pointer being written lives microseconds; one older than a minute is a dead writer's.
                if time.time() - entry.lstat().st_mtime > 60:
                    entry.unlink(missing_ok=True)
                    changed = True
                continue
            owner = self._scratch_owner(entry.name)
            if owner is None or self._alive(entry, owner[1], owner[2]):
                continue
            final = self.root / owner[0]
            if entry.name.startswith(_OLD) and not final.exists():
                # The writer died between moving the old checkpoint aside and renaming the new one in.
                with contextlib.suppress(FileNotFoundError):
                    os.rename(entry, final)
                    warnings.warn(f"restored checkpoint {final} from an interrupted replacement",
                                  CheckpointWarning, stacklevel=2)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            changed = True
        if changed:
            fsync_dir(self.root)

    # -- reading -----------------------------------------------------------------------------------------

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """Every `step_*` directory (complete or not), sorted by step."""
        if not self.root.is_dir():
            return []
        found = [(parse_step(p.name), p) for p in self.root.iterdir() if p.is_dir()]
        return sorted((s, p) for s, p in found if s is not None)

    def list(self) -> list[Path]:
        """Complete checkpoints (those with a manifest; not verified), oldest first."""
        return [p for _, p in self._step_dirs() if (p / MANIFEST).is_file()]

    def _pointer(self) -> str | None:
        try:
            name = (self.root / LATEST).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        return name if parse_step(name) is not None else None

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; if that is missing or incomplete, the highest complete one."""
        name = self._pointer()
        if name is not None and (self.root / name / MANIFEST).is_file():
            return self.root / name
        complete = self.list()
        return complete[-1] if complete else None

    # -- saving ------------------------------------------------------------------------------------------

    def begin(self, step: int) -> Path:
        """Create and return an empty scratch directory for the save of `step` (its files go in there)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._scratch(_TMP, step_name(step))
        tmp.mkdir()
        return tmp

    def _check_scratch(self, tmp: Path, step: int | None = None) -> None:
        owner = self._scratch_owner(tmp.name)
        if tmp.parent != self.root or owner is None or not tmp.name.startswith(_TMP):
            raise ValueError(f"{tmp} is not a save directory returned by begin() of {self.root}")
        if step is not None and owner[0] != step_name(step):
            raise ValueError(f"{tmp} was begun for {owner[0]}, not {step_name(step)}")

    def abort(self, tmp_dir: str | os.PathLike) -> None:
        """Discard an unfinished save (what remains after an error is cleaned up by `recover`)."""
        tmp = Path(tmp_dir).absolute()
        self._check_scratch(tmp)
        shutil.rmtree(tmp, ignore_errors=True)

    def _hook(self, point: str, path: Path) -> None:
        fn = getattr(self, point)
        if fn is not None:
            fn(path)
        spec = os.environ.get(PAUSE_ENV)
        if spec:
            where, _, seconds = spec.rpartition(":")
            if (where or "before_rename") == point:
                time.sleep(float(seconds))

    def _failure(self, exc: BaseException, step: int, tmp: Path, previous: Path | None) -> CheckpointError | None:
        """The one-line error for a failed save caused by the file system; None for other (program) errors."""
        intact = f"the previous checkpoint {previous} is intact" if previous else "there is no previous checkpoint"
        oserr = _space_error(exc) or (exc if isinstance(exc, OSError) else None)
        if oserr is None:
            oserr = self._likely_full(previous)
        if oserr is None:
            return None
        where = oserr.filename or tmp
        head = f"checkpoint save of {step_name(step)} failed"
        if oserr.errno == errno.ENOSPC:
            return CheckpointError(f"{head}: no space left on device writing {where}; {intact}; "
                                   "free space or change checkpoint.dir")
        if oserr.errno == errno.EDQUOT:
            return CheckpointError(f"{head}: disk quota exceeded writing {where}; {intact}; "
                                   "free space, raise the quota or change checkpoint.dir")
        return CheckpointError(f"{head}: {oserr.strerror or oserr} ({where}); {intact}; "
                               "check the file system or change checkpoint.dir")

    def _likely_full(self, previous: Path | None) -> OSError | None:
        """Some writers (torch's zip serializer in a worker process) report a full disk only as a short write
        ("unexpected pos ..."). Call it out of space when less room is left than the previous checkpoint took."""
        if previous is None:
            return None
        try:
            needed = sum(f["size"] for f in read_manifest(previous)["files"].values())
            free = shutil.disk_usage(self.root).free
        except (CheckpointError, OSError):
            return None
        if free >= needed:
            return None
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free:,} bytes free, a checkpoint needs "
                                     f"about {needed:,})")

    def _install(self, tmp: Path, final: Path) -> None:
        """Rename `tmp` to `final`; an existing `final` is replaced without a moment of no checkpoint there."""
        if not final.exists():
            os.rename(tmp, final)
            return
        if rename_exchange(tmp, final):
            old = tmp  # the swap left the old checkpoint under the scratch name
        else:
            # No atomic swap here: move the old one aside first; `recover` restores it if we die in between.
            old = self._scratch(_OLD, final.name)
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
        fsync_dir(self.root)
        try:
            self._delete(old)
        except OSError as exc:  # the new checkpoint is in place; `recover` removes the leftover later
            warnings.warn(f"could not delete the replaced {old}: {exc}", CheckpointWarning, stacklevel=3)

    def _delete(self, path: Path) -> None:
        """Remove a directory by renaming it out of sight first, so no half-deleted checkpoint is ever listed."""
        name = path.name
        if path.name.startswith((_TMP, _OLD)):
            name = self._scratch_owner(path.name)[0]
        doomed = self._scratch(_DEL, name)
        os.rename(path, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def commit(self, tmp_dir: str | os.PathLike, step: int, metadata: dict[str, Any],
               phase_end: bool = False) -> Path:
        """Manifest, fsync and size-check the files in `tmp_dir`, rename it to `step_*`, move `latest`, retain.

        `metadata` (JSON-serialisable) is stored in the manifest with `step` and `phase_end` added.
        """
        tmp = Path(tmp_dir).absolute()
        self._check_scratch(tmp, step)
        for key, value in (("step", step), ("phase_end", phase_end)):
            if key in metadata and metadata[key] != value:
                raise ValueError(f"metadata[{key!r}] is {metadata[key]!r} but commit() was given {value!r}")
        previous = self.latest()
        final = self.step_dir(step)
        try:
            honour_umask(tmp)
            write_manifest(tmp, {**metadata, "step": step, "phase_end": phase_end}, fsync=True)
            for dirpath, _, _ in os.walk(tmp, topdown=False):
                fsync_dir(dirpath)
            verify(tmp, deep=False)  # re-read from disk: catches a file still growing (a rank that kept writing)
            self._hook("before_rename", tmp)
            self._install(tmp, final)
            fsync_dir(self.root)
        except BaseException as exc:
            if tmp.exists():
                self.abort(tmp)
            failure = self._failure(exc, step, tmp, previous)
            if failure is None:
                raise
            raise failure from exc
        self._hook("before_latest", final)
        try:
            atomic_write_text(self.root / LATEST, final.name + "\n")
        except OSError as exc:
            was = previous.name if previous else "nothing"
            raise CheckpointError(f"checkpoint {final} was saved but {self.root / LATEST} could not be updated "
                                  f"({exc.strerror}); it still names {was}; fix the file system") from exc
        self._retain(final)
        return final

    @contextlib.contextmanager
    def saving(self, step: int, metadata: dict[str, Any], phase_end: bool = False) -> Iterator[Path]:
        """`with store.saving(step, meta) as tmp:` write files into tmp; commit on success, abort on error.

        `metadata` is read at commit, so the block may still add to it. Out-of-space and other file system
        errors become one-line CheckpointErrors; others propagate unchanged (the save is aborted either way).
        """
        previous = self.latest()
        try:
            tmp = self.begin(step)
        except OSError as exc:
            failure = self._failure(exc, step, self.root, previous)
            if failure is None:
                raise
            raise failure from exc
        try:
            yield tmp
        except BaseException as exc:
            self.abort(tmp)
            failure = self._failure(exc, step, tmp, previous)
            if failure is None:
                raise
            raise failure from exc
        self.commit(tmp, step, metadata, phase_end)

    # -- retention ---------------------------------------------------------------------------------------

    def _phase_end(self, path: Path) -> bool | None:
        try:
            return read_manifest(path)["metadata"].get("phase_end") is True
        except CheckpointError:
            return None

    def _retain(self, head: Path) -> None:
        """Delete checkpoints beyond the newest `keep` up to `head`, except phase ends and `latest`.

        Checkpoints above `head` (left from a run that was resumed from an earlier step) are not touched:
        they are replaced when the run reaches their step again.
        """
        if self.keep is None:
            return
        head_step = parse_step(head.name)
        candidates = [(s, p) for s, p in self._step_dirs() if s <= head_step]
        protected = {p for _, p in candidates[-self.keep:]} | {head, self.latest()}
        for _, path in candidates:
            if path in protected:
                continue
            phase_end = self._phase_end(path)
            if phase_end is None:
                warnings.warn(f"retention keeps {path}: its {MANIFEST} is missing or damaged; inspect or delete it",
                              CheckpointWarning, stacklevel=3)
            elif not phase_end:
                try:
                    self._delete(path)
                except OSError as exc:  # the save itself succeeded; a leftover old checkpoint is not fatal
                    warnings.warn(f"retention could not delete {path}: {exc}", CheckpointWarning, stacklevel=3)

    # -- resuming ----------------------------------------------------------------------------------------

    def resolve_resume(self, spec: str, expect: dict[str, Any] | None = None, deep: bool = True) -> Path | None:
        """The checkpoint directory `--resume spec` loads: `none` -> None, `auto` -> newest intact, else a path.

        A PATH may be a checkpoint or a checkpoint root (then its `latest`); any problem with it is fatal.
        `auto` skips damaged checkpoints with a CheckpointWarning naming the damaged file, returns None when
        there is no checkpoint, and raises when all are damaged or one belongs to another model (`expect`).
        """
        if spec == "none":
            return None
        if spec == "auto":
            return self._resolve_auto(expect, deep)
        path = Path(spec).expanduser().absolute()
        if path.is_dir() and not (path / MANIFEST).exists() and (path / LATEST).is_file():
            path = CheckpointStore(path, recover=False).latest() or path
        verify(path, expect=expect, deep=deep)
        return path

    def _resolve_auto(self, expect: dict[str, Any] | None, deep: bool) -> Path | None:
        dirs = self._step_dirs()
        if not dirs:
            return None
        name = self._pointer()
        head = self.root / name if name is not None and (self.root / name).is_dir() else dirs[-1][1]
        if name is not None and head.name != name:
            warnings.warn(f"{self.root / LATEST} names {name}, which does not exist; starting from {head.name}",
                          CheckpointWarning, stacklevel=3)
        head_step = parse_step(head.name)
        damaged = []
        for _, path in reversed([d for d in dirs if d[0] <= head_step]):
            try:
                verify(path, expect=expect, deep=deep)
            except CheckpointDamaged as exc:  # includes NotACheckpoint: a step_* dir without a manifest
                damaged.append(f"{path.name}: {exc.problem}")
                warnings.warn(f"--resume auto skips damaged checkpoint {path}: {exc.problem}",
                              CheckpointWarning, stacklevel=3)
                continue
            return path
        raise CheckpointError(f"no intact checkpoint in {self.root}: all {len(damaged)} are damaged (newest, "
                              f"{damaged[0]}); restore the files or start over with --resume none")
