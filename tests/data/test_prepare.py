"""prepare_dataset writes real megatron-core indexed datasets; check_dataset catches stale or foreign ones."""

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megacrystal.data.errors import DataError
from megacrystal.data.prepare import check_dataset, meta_path, prepare_dataset
from megacrystal.data.tokenizer import CrystalTokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def docs(n: int = 120) -> list[str]:
    """Real documents: functions and classes of stdlib modules, split at blank lines between top-level defs."""
    out = []
    for path in sorted(STDLIB.glob("*.py"))[:25]:
        out += [d for d in path.read_text(encoding="utf-8").split("\n\n\n") if d.strip()]
    return out[:n]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    (d / "train.txt").write_text("\n".join(docs(400)))
    train_tokenizer([d / "train.txt"], d / "a", 512)
    train_tokenizer([d / "train.txt"], d / "b", 520)  # another model, same padded size 544
    return d


@pytest.fixture(scope="module")
def tok(tok_dir) -> CrystalTokenizer:
    return CrystalTokenizer.load(tok_dir / "a.model")


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps({"text": t, "source": f"doc{i}"}) + "\n" for i, t in enumerate(docs())))
    path.with_name("code.provenance.json").write_text(json.dumps({"domain": "python", "documents": 120}))
    return path


def read_docs(prefix: str) -> list[list[int]]:
    """Documents of `<out>_<split>` read with megatron's IndexedDataset over every shard of the dataset."""
    out, split = str(prefix).rsplit("_", 1)
    meta = json.loads(meta_path(out).read_text())
    docs = []
    for shard in meta["shards"]:
        ds = IndexedDataset(str(Path(out).parent / f"{shard}_{split}"))
        docs += [ds[i].tolist() for i in range(len(ds))]
    return docs


def test_writes_indexed_datasets_with_eos_and_exact_counts(tmp_path, tok, corpus):
    result = prepare_dataset("code", [corpus], tok, tmp_path / "out" / "code", workers=2, progress=False)
    assert result.status == "built"
    expected = [tok.encode(t) + [tok.eos_id] for t in docs()]
    train, valid = read_docs(f"{tmp_path}/out/code_train"), read_docs(f"{tmp_path}/out/code_valid")
    assert all(d[-1] == tok.eos_id for d in train + valid)
    assert len(train) + len(valid) == 120 and len(valid) >= 1
    # Order is preserved within each split, and the split loses and duplicates nothing.
    assert sorted(map(tuple, train + valid)) == sorted(map(tuple, expected))
    assert train == [d for d in expected if d in train]
    meta = json.loads(meta_path(tmp_path / "out" / "code").read_text())
    assert meta["tokens"] == sum(map(len, expected))
    assert meta["splits"]["train"]["tokens"] == sum(map(len, train))
    assert meta["documents"] == 120 and meta["dtype"] == "uint16"
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert meta["provenance"][str(corpus)]["domain"] == "python"  # copied from the corpus provenance
    assert meta["tokens_per_s"] > 0
    assert check_dataset(tmp_path / "out" / "code", tok)["name"] == "code"


def test_workers_do_not_change_the_output(tmp_path, tok, corpus):
    prepare_dataset("a", [corpus], tok, tmp_path / "one", workers=1, progress=False)
    prepare_dataset("a", [corpus], tok, tmp_path / "two", workers=2, progress=False)
    for split in ("train", "valid"):
        for ext in ("bin", "idx"):
            one, two = Path(f"{tmp_path}/one-00000_{split}.{ext}"), Path(f"{tmp_path}/two-00000_{split}.{ext}")
            assert one.read_bytes() == two.read_bytes()


def test_valid_split_is_by_document_content(tmp_path, tok, corpus):
    prepare_dataset("a", [corpus], tok, tmp_path / "fwd", valid_fraction=0.2, workers=1, progress=False)
    reversed_input = tmp_path / "rev.jsonl"
    reversed_input.write_text("".join(reversed(corpus.read_text().splitlines(keepends=True))))
    prepare_dataset("a", [reversed_input], tok, tmp_path / "rev", valid_fraction=0.2, workers=1, progress=False)
    fwd, rev = read_docs(f"{tmp_path}/fwd_valid"), read_docs(f"{tmp_path}/rev_valid")
    assert 10 <= len(fwd) <= 40 and sorted(fwd) == sorted(rev)


def test_reads_txt_files_and_source_directories(tmp_path, tok):
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (src / "pkg" / "b.css").write_text("body { color: red; }\n")
    (src / "pkg" / "skip.bin").write_text("not source")
    (src / "pkg" / "__pycache__" / "c.py").write_text("cached = True\n")
    (tmp_path / "notes.txt").write_text("Plain prose.\n")
    result = prepare_dataset("mixed", [src, tmp_path / "notes.txt"], tok, tmp_path / "mixed",
                             valid_fraction=0.0, progress=False)
    assert read_docs(f"{tmp_path}/mixed_train") == [
        tok.encode(t) + [tok.eos_id]
        for t in ["def a():\n    return 1\n", "body { color: red; }\n", "Plain prose.\n"]]
    assert result.meta["splits"]["valid"]["documents"] == 0


def test_skips_unchanged_and_rebuilds_on_changes(tmp_path, tok_dir, tok, corpus):
    out = tmp_path / "ds"
    assert prepare_dataset("c", [corpus], tok, out, progress=False).status == "built"
    bin_mtime = os.stat(f"{out}-00000_train.bin").st_mtime_ns
    os.utime(corpus, ns=(1, 1))  # a rewrite with the same bytes (a corpus rebuild) is not a change
    assert prepare_dataset("c", [corpus], tok, out, progress=False).status == "skipped"
    assert os.stat(f"{out}-00000_train.bin").st_mtime_ns == bin_mtime
    other = CrystalTokenizer.load(tok_dir / "b.model", tok.vocab_size)
    assert prepare_dataset("c", [corpus], other, out, progress=False).status == "built"
    check_dataset(out, other)
    with corpus.open("a") as fh:
        fh.write(json.dumps({"text": "one more document"}) + "\n")
    assert prepare_dataset("c", [corpus], other, out, progress=False).status == "built"
    assert prepare_dataset("c", [corpus], other, out, valid_fraction=0.5, progress=False).status == "built"
    assert prepare_dataset("c", [corpus], other, out, valid_fraction=0.5, progress=False).status == "skipped"
    assert prepare_dataset("c", [corpus], other, out, valid_fraction=0.5, force=True, progress=False).status == "built"


def test_check_dataset_errors(tmp_path, tok_dir, tok, corpus):
    out = tmp_path / "ds"
    prepare_dataset("code", [corpus], tok, out, progress=False)
    other_model = CrystalTokenizer.load(tok_dir / "b.model", tok.vocab_size)
    with pytest.raises(DataError, match="'code'.*another tokenizer"):
        check_dataset(out, other_model)
    with pytest.raises(DataError, match="'code'.*vocabulary size 544 .* 576"):
        check_dataset(out, CrystalTokenizer.load(tok_dir / "a.model", 576))
    Path(f"{out}-00000_valid.idx").unlink()
    with pytest.raises(DataError, match=r"ds-00000_valid\.idx is missing; run `megacrystal prepare`"):
        check_dataset(out, tok)
    with pytest.raises(DataError, match=r"nothing-00000_train\.idx is missing"):
        check_dataset(tmp_path / "nothing", tok)


def test_check_dataset_catches_a_truncated_bin(tmp_path, tok, corpus):
    out = tmp_path / "ds"
    prepare_dataset("code", [corpus], tok, out, progress=False)
    with open(f"{out}-00000_train.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DataError, match="ds-00000_train: .* tokens in the index but 100 bytes"):
        check_dataset(out, tok)


def test_input_errors(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset("x", [tmp_path / "missing.jsonl"], tok, tmp_path / "x", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "code"}) + "\n")
    with pytest.raises(DataError, match=r"'x': 1 of 1 records are bad .*bad\.jsonl:1: no field 'text'"):
        prepare_dataset("x", [bad], tok, tmp_path / "x", progress=False)
    assert prepare_dataset("x", [bad], tok, tmp_path / "x", text_field="content", valid_fraction=0.0,
                           progress=False).meta["documents"] == 1
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: invalid JSON"):
        prepare_dataset("x", [bad], tok, tmp_path / "y", progress=False)
    with pytest.raises(DataError, match="valid_fraction"):
        prepare_dataset("x", [bad], tok, tmp_path / "y", valid_fraction=1.0, progress=False)


def test_megatron_gpt_dataset_accepts_the_output_and_tokenizer(tmp_path, tok, corpus):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prepare_dataset("code", [corpus], tok, tmp_path / "code", progress=False)
    config = GPTDatasetConfig(random_seed=1, sequence_length=32, blend=([f"{tmp_path}/code-00000_train"], None),
                              split="1,0,0", tokenizer=tok, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, 0, 0], lambda: True, config).build()
    sample = train[0]
    assert sample["tokens"].shape == (32,) and int(sample["tokens"].max()) < tok.vocab_size
    assert np.isin(tok.eos_id, np.concatenate([train[i]["tokens"].numpy() for i in range(len(train))]))


def test_reports_progress_and_tokens_per_second(tmp_path, tok, corpus, capsys):
    prepare_dataset("code", [corpus], tok, tmp_path / "code", workers=1)
    err = capsys.readouterr().err
    assert "prepared code: 120 documents" in err and "tokens/s" in err


def test_the_prepare_command_imports_no_torch_and_leaves_no_thread(tmp_path, tok, corpus):
    """`megacrystal prepare` is CPU data work on any host: importing torch would add ~1 s to every run, and
    OpenBLAS threads (numpy starts one per core unless told not to) spin beside the tokenizer threads."""
    import subprocess
    import sys

    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "crystal-tiny.yaml").read_text())
    raw["model"]["vocab_size"] = tok.vocab_size
    raw["data"] = {"source": "indexed", "dir": str(tmp_path / "data"), "tokenizer": {"model": tok.source},
                   "datasets": {"code": {"inputs": [str(corpus)]}},
                   "phases": {"one": {"tokens": 4096, "weights": {"code": 1.0}, "lr": {"peak": 0.01}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    script = ("import sys; from megacrystal.cli import main; code = main(['prepare', '--config', sys.argv[1]]); "
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3]); "
              "import os; print(len(os.listdir('/proc/self/task'))); sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.yaml")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[]", "1"], run.stdout  # no torch; the main thread is the only one left
    assert json.loads(meta_path(tmp_path / "data" / "code").read_text())["documents"] == 120
