"""The manifest of a checkpoint directory: every file's size and sha256 plus the caller's metadata.

`manifest.json` is written last and atomically, so its presence means the listing is complete. It carries a
checksum of its own content, so a bit flip in the manifest is reported as such instead of blaming a shard or
silently changing the metadata (step, model fingerprint) that a resume trusts.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from .errors import CheckpointDamaged, CheckpointError, CheckpointMismatch, CheckpointWarning, NotACheckpoint

MANIFEST = "manifest.json"
FORMAT = "megacrystal-checkpoint"
VERSION = 1
CHUNK = 1 << 20  # 1 MiB: large enough for hashlib to run at memory speed, small enough for any RAM
_MANIFEST_TMP = f".{MANIFEST}.tmp-"
_EARLIER = "resume from an earlier checkpoint (`--resume auto` skips damaged ones)"
_FIX = f"{_EARLIER} or restore the file"
_MAX_WORKERS = 8  # hashlib releases the GIL, so threads hash shards in parallel; more rarely helps the disk


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so the names created, renamed or removed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode() -> int:
    """The mode a plain `open()` gives a new file here: 0666 less the process umask."""
    try:
        with open("/proc/self/status") as status:  # reading it leaves the umask alone (Linux)
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def honour_umask(root: str | os.PathLike) -> None:
    """Give every file under `root` (or `root` itself) the umask's mode: writers that go through mkstemp
    (safetensors, some checkpoint writers) create 0600 files that the run's group could not read."""
    root = Path(root)
    mode = file_mode()
    files = [root] if root.is_file() else [Path(d) / f for d, _, names in os.walk(root) for f in names]
    for path in files:
        if not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            path.chmod(mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` atomically: readers see the old or the new content, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def hash_file(path: str | os.PathLike, fsync: bool = False) -> tuple[int, str]:
    """(bytes read, sha256 hex) of a file, streamed in 1 MiB chunks; optionally fsync it on the way."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
        if fsync:
            try:
                # The files may have been written by other processes (all ranks); flushing them is our job.
                os.fsync(f.fileno())
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this file system has no fsync; nothing more to do
                    raise
    return size, digest.hexdigest()


def list_files(ckpt_dir: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of every file under `ckpt_dir`, sorted, except the manifest and its temporaries."""
    root = Path(ckpt_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if rel_dir == Path(".") and (name == MANIFEST or name.startswith(_MANIFEST_TMP)):
                continue
            out.append((rel_dir / name).as_posix())
    return sorted(out)


def _workers(n_files: int, workers: int | None) -> int:
    return max(1, min(n_files, workers or min(_MAX_WORKERS, os.cpu_count() or 1)))


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(ckpt_dir: str | os.PathLike, metadata: dict[str, Any], fsync: bool = True,
                   workers: int | None = None) -> dict[str, Any]:
    """Hash every file under `ckpt_dir` (fsyncing each) and write `manifest.json` atomically; return it."""
    root = Path(ckpt_dir)
    rels = list_files(root)
    with ThreadPoolExecutor(_workers(len(rels), workers)) as pool:
        hashed = list(pool.map(lambda rel: hash_file(root / rel, fsync=fsync), rels))
    files = {rel: {"size": size, "sha256": digest} for rel, (size, digest) in zip(rels, hashed)}
    # Round-trip the metadata now so an unserialisable value fails before anything is renamed.
    body = {"format": FORMAT, "version": VERSION, "hash": "sha256",
            "metadata": json.loads(json.dumps(metadata)), "files": files}
    manifest = {**body, "manifest_sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _damaged(ckpt_dir: Path, what: str, fix: str = _FIX) -> CheckpointDamaged:
    return CheckpointDamaged(f"checkpoint {ckpt_dir} is damaged: {what}; {fix}", problem=what)


def _safe_rel(rel: Any) -> bool:
    """A manifest path must stay inside the checkpoint (a damaged manifest must not make us read elsewhere)."""
    if not isinstance(rel, str) or not rel or rel == MANIFEST or "\\" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and "." not in p.parts and p.as_posix() == rel


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and self-check `manifest.json` (no file is hashed); NotACheckpoint or CheckpointDamaged if bad."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise NotACheckpoint(f"{d} is not a checkpoint (no such directory); pass a checkpoint directory",
                             problem="the directory does not exist")
    path = d / MANIFEST
    if not path.is_file():
        raise NotACheckpoint(f"{d} is not a checkpoint (no {MANIFEST}); pass a directory written by a "
                             f"megacrystal checkpoint save (an unfinished save has no {MANIFEST})",
                             problem=f"{MANIFEST} is missing")
    fix = _EARLIER
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _damaged(d, f"{MANIFEST} is not valid JSON ({type(exc).__name__})", fix) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _damaged(d, f"{MANIFEST} is not a megacrystal checkpoint manifest", fix)
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        # Not damage: `--resume auto` must not skip it silently, so this is the plain (fatal) error.
        raise CheckpointError(f"checkpoint {d}: {MANIFEST} has format version {manifest.get('version')!r}, "
                                f"newer than this megacrystal reads ({VERSION}); upgrade megacrystal")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != hashlib.sha256(_canonical(body)).hexdigest():
        raise _damaged(d, f"{MANIFEST} is corrupt (its own checksum does not match)", fix)
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("metadata"), dict):
        raise _damaged(d, f"{MANIFEST} lacks its file list or metadata", fix)
    for rel, entry in files.items():
        if not _safe_rel(rel) or not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            raise _damaged(d, f"{MANIFEST} has an invalid entry {rel!r}", fix)
    return manifest


def metadata_diff(actual: dict[str, Any], expect: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences of `expect` against `actual`, by dotted key (keys absent from expect ignored)."""
    out = []
    for key, want in expect.items():
        name = f"{prefix}{key}"
        if key not in actual:
            out.append(f"{name} is absent from the checkpoint, {want!r} expected")
        elif isinstance(want, dict) and isinstance(actual[key], dict):
            out.extend(metadata_diff(actual[key], want, prefix=f"{name}."))
        elif actual[key] != want:
            out.append(f"{name} is {actual[key]!r} in the checkpoint, {want!r} expected")
    return out


def _check_sizes(d: Path, files: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(path, problem) for each listed file that is missing or has another size."""
    problems = []
    for rel, entry in sorted(files.items()):
        try:
            actual = (d / rel).stat().st_size
        except FileNotFoundError:
            problems.append((rel, f"{rel} is missing"))
            continue
        if actual < entry["size"]:
            problems.append((rel, f"{rel} is truncated ({actual} of {entry['size']} bytes)"))
        elif actual > entry["size"]:
            problems.append((rel, f"{rel} has {actual} bytes, {entry['size']} expected"))
    return problems


def _check_hashes(d: Path, files: dict[str, dict[str, Any]], rels: Iterable[str],
                  workers: int | None) -> list[tuple[str, str]]:
    """(path, problem) for each of `rels` whose sha256 differs from the manifest."""
    rels = sorted(rels)
    with ThreadPoolExecutor(_workers(len(rels), workers)) as pool:
        hashed = list(pool.map(lambda rel: hash_file(d / rel), rels))
    return [(rel, f"{rel} is corrupt (sha256 differs from {MANIFEST})")
            for rel, (_, digest) in zip(rels, hashed) if digest != files[rel].get("sha256")]


def verify(ckpt_dir: str | os.PathLike, expect: dict[str, Any] | None = None, deep: bool = True,
           workers: int | None = None) -> dict[str, Any]:
    """Check the manifest, `expect`ed metadata, every listed file's size and (if deep) sha256; return the manifest.

    Files not in the manifest are ignored with a CheckpointWarning: nothing may read them as checkpoint data.
    """
    d = Path(ckpt_dir)
    manifest = read_manifest(d)
    if expect:
        diffs = metadata_diff(manifest["metadata"], json.loads(json.dumps(expect)))
        if diffs:
            more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
            raise CheckpointMismatch(f"checkpoint {d} is of another model or config: {diffs[0]}{more}; resume "
                                     "from a checkpoint of this model and config, or start over with --resume none")
    files = manifest["files"]
    problems = _check_sizes(d, files)
    if deep:
        sized_bad = {rel for rel, _ in problems}
        problems += _check_hashes(d, files, (rel for rel in files if rel not in sized_bad), workers)
        problems.sort()  # report the first damaged file by path, whatever the kind of damage
    if problems:
        more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
        raise _damaged(d, problems[0][1] + more)
    extra = sorted(set(list_files(d)) - set(files))
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        warnings.warn(f"checkpoint {d}: ignoring files not in {MANIFEST}: {shown}", CheckpointWarning, stacklevel=2)
    return manifest
