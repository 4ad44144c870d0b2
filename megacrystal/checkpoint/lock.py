"""One run per run directory: an exclusive `flock` on `<run dir>/.megacrystal.lock`, held until the process exits."""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .errors import CheckpointError

LOCK_NAME = ".megacrystal.lock"
_held: dict[str, int] = {}  # run dir -> the open descriptor holding its lock (closing it would release the lock)


def lock_run_dir(run_dir: str | os.PathLike) -> Path:
    """Create `run_dir` if needed and lock it; a one-line CheckpointError if it is not writable or in use."""
    root = Path(run_dir).absolute()
    if str(root) in _held:
        return root / LOCK_NAME
    path = root / LOCK_NAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        reason = err.strerror or str(err)
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason += "; make it writable or choose another run.dir"
        raise CheckpointError(f"run directory {root} cannot be used: {reason}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = ""
        try:
            holder = os.read(fd, 200).decode(errors="replace").strip()
        except OSError:
            pass
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise CheckpointError(f"run directory {root} is in use by another run"
                                  f"{f' ({holder})' if holder else ''}; wait for it to end or choose another "
                                  "run.dir") from None
        raise CheckpointError(f"run directory {root}: cannot lock {path}: {err.strerror}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
    _held[str(root)] = fd
    return path
