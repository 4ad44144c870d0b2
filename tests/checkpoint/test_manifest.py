"""The manifest: sizes and sha256 of every file, self-checked, and one clear error per kind of damage."""
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacrystal.checkpoint import manifest as mf
from megacrystal.checkpoint.errors import (CheckpointDamaged, CheckpointError, CheckpointMismatch,
                                           CheckpointWarning, NotACheckpoint)

FILES = {".metadata": b"meta", "__0_0.distcp": b"a" * 5000, "__1_0.distcp": b"b" * 3000,
         "common.pt": b"common", "trainer/state.json": b'{"step": 3}'}
META = {"step": 3, "tokens": 1536, "model_fingerprint": {"num_layers": 2, "hidden_size": 64}}


def make_ckpt(d: Path, files: dict[str, bytes] = FILES, metadata: dict = META) -> dict:
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return mf.write_manifest(d, metadata)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    manifest = make_ckpt(tmp_path)
    assert sorted(manifest["files"]) == sorted(FILES)  # hidden and nested files too, not the manifest itself
    for rel, data in FILES.items():
        assert manifest["files"][rel] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["metadata"] == META and manifest["version"] == mf.VERSION
    assert json.loads((tmp_path / mf.MANIFEST).read_text()) == manifest
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert mf.verify(tmp_path, expect={"step": 3}) == manifest


def test_hash_streams_files_larger_than_a_chunk(tmp_path):
    data = bytes(range(256)) * (mf.CHUNK * 5 // 2 // 256 + 7)
    (tmp_path / "big").write_bytes(data)
    assert mf.hash_file(tmp_path / "big", fsync=True) == (len(data), hashlib.sha256(data).hexdigest())


def test_unserialisable_metadata_writes_no_manifest(tmp_path):
    with pytest.raises(TypeError):
        make_ckpt(tmp_path, metadata={"bad": object()})
    assert not (tmp_path / mf.MANIFEST).exists()


def flip_bit(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "__0_0.distcp is truncated (100 of 5000 bytes)"),
    (lambda p: flip_bit(p, 4321), "__0_0.distcp is corrupt (sha256 differs from manifest.json)"),
    (lambda p: p.unlink(), "__0_0.distcp is missing"),
    (lambda p: p.write_bytes(p.read_bytes() + b"x"), "__0_0.distcp has 5001 bytes, 5000 expected"),
])
def test_each_kind_of_damage_has_its_own_message(tmp_path, damage, words):
    make_ckpt(tmp_path)
    damage(tmp_path / "__0_0.distcp")
    with pytest.raises(CheckpointDamaged) as exc:
        mf.verify(tmp_path)
    assert one_line(exc) == (f"checkpoint {tmp_path} is damaged: {words}; resume from an earlier checkpoint "
                             "(`--resume auto` skips damaged ones) or restore the file")
    assert exc.value.problem == words


def test_shallow_verify_checks_sizes_only(tmp_path):
    make_ckpt(tmp_path)
    flip_bit(tmp_path / "common.pt")
    mf.verify(tmp_path, deep=False)  # same size: the fast path cannot see a flipped bit
    (tmp_path / "__1_0.distcp").write_bytes(b"short")
    with pytest.raises(CheckpointDamaged, match="__1_0.distcp is truncated"):
        mf.verify(tmp_path, deep=False)


def test_several_damaged_files_name_the_first_and_count_the_rest(tmp_path):
    make_ckpt(tmp_path)
    flip_bit(tmp_path / "common.pt")
    (tmp_path / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointDamaged, match=r": __1_0.distcp is missing \(and 1 more damaged files\);"):
        mf.verify(tmp_path)


def test_a_directory_without_manifest_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"weights")
    with pytest.raises(NotACheckpoint) as exc:
        mf.verify(tmp_path)
    assert one_line(exc).startswith(f"{tmp_path} is not a checkpoint (no manifest.json); pass a directory")
    with pytest.raises(NotACheckpoint, match="no such directory"):
        mf.verify(tmp_path / "nope")


def rewrite_manifest(d: Path, edit) -> None:
    """Edit the manifest and re-seal it with a valid self-checksum (a deliberate, not an accidental, change)."""
    manifest = json.loads((d / mf.MANIFEST).read_text())
    manifest.pop("manifest_sha256")
    edit(manifest)
    manifest["manifest_sha256"] = hashlib.sha256(mf._canonical(manifest)).hexdigest()
    (d / mf.MANIFEST).write_text(json.dumps(manifest))


def test_damaged_manifest_is_reported_as_such(tmp_path):
    make_ckpt(tmp_path)
    path = tmp_path / mf.MANIFEST
    text = path.read_text()
    path.write_text(text.replace('"step": 3', '"step": 8'))  # still valid JSON: only the self-checksum sees it
    with pytest.raises(CheckpointDamaged, match="manifest.json is corrupt \\(its own checksum does not match\\)"):
        mf.verify(tmp_path)
    path.write_text(text[:-20])
    with pytest.raises(CheckpointDamaged, match="manifest.json is not valid JSON"):
        mf.verify(tmp_path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointDamaged, match="manifest.json is not valid JSON"):
        mf.verify(tmp_path)


def test_manifest_paths_cannot_leave_the_checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    make_ckpt(d)
    (tmp_path / "outside").write_bytes(b"x")
    rewrite_manifest(d, lambda m: m["files"].update({"../outside": {"size": 1, "sha256": "0"}}))
    with pytest.raises(CheckpointDamaged, match="manifest.json has an invalid entry '../outside'"):
        mf.verify(d)


def test_newer_format_is_fatal_not_damage(tmp_path):
    make_ckpt(tmp_path)
    rewrite_manifest(tmp_path, lambda m: m.update(version=mf.VERSION + 1))
    with pytest.raises(CheckpointError, match="newer than this megacrystal reads") as exc:
        mf.verify(tmp_path)
    assert not isinstance(exc.value, CheckpointDamaged)  # so `--resume auto` stops instead of skipping it


def test_expect_metadata_mismatch_names_the_differing_key(tmp_path):
    make_ckpt(tmp_path)
    with pytest.raises(CheckpointMismatch) as exc:
        mf.verify(tmp_path, expect={"model_fingerprint": {"num_layers": 4, "hidden_size": 64}})
    assert one_line(exc) == (f"checkpoint {tmp_path} is of another model or config: model_fingerprint.num_layers "
                             "is 2 in the checkpoint, 4 expected; resume from a checkpoint of this model and "
                             "config, or start over with --resume none")
    with pytest.raises(CheckpointMismatch, match=r"config_hash is absent from the checkpoint.*\(and 1 more\)"):
        mf.verify(tmp_path, expect={"config_hash": "abc", "tokens": 0})
    # Expected values go through JSON like the stored ones: a tuple equals the list it was saved as.
    make_ckpt(tmp_path, metadata={"shape": (2, 3)})
    mf.verify(tmp_path, expect={"shape": (2, 3)})


def test_metadata_is_checked_before_hashing(tmp_path):
    make_ckpt(tmp_path)
    flip_bit(tmp_path / "common.pt")
    with pytest.raises(CheckpointMismatch):  # the cheap, more fundamental answer first
        mf.verify(tmp_path, expect={"step": 4})


def test_unlisted_files_are_ignored_with_a_warning(tmp_path):
    manifest = make_ckpt(tmp_path)
    (tmp_path / "notes.txt").write_text("added by hand")
    with pytest.warns(CheckpointWarning, match="ignoring files not in manifest.json: notes.txt"):
        assert mf.verify(tmp_path) == manifest
    assert "notes.txt" not in manifest["files"]


names = st.text(alphabet="abcdefgh_.0123456789", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))
trees = st.dictionaries(st.lists(names, min_size=1, max_size=3).map("/".join), st.binary(min_size=1, max_size=300),
                        min_size=1, max_size=6)


def _consistent(files: dict[str, bytes]) -> bool:
    """No path is both a file and a directory of another path, and the manifest's own name is not used."""
    paths = set(files)
    return mf.MANIFEST not in paths and not any(p.startswith(q + "/") for p in paths for q in paths)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=trees.filter(_consistent), data=st.data())
def test_any_flipped_byte_in_any_file_is_found_and_named(tmp_path_factory, files, data):
    d = tmp_path_factory.mktemp("prop")
    make_ckpt(d, files)
    assert mf.verify(d)["files"].keys() == files.keys()
    rel = data.draw(st.sampled_from(sorted(files)))
    flip_bit(d / rel, data.draw(st.integers(0, len(files[rel]) - 1)))
    with pytest.raises(CheckpointDamaged) as exc:
        mf.verify(d)
    assert exc.value.problem == f"{rel} is corrupt (sha256 differs from manifest.json)"
