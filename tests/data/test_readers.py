"""Every shipped corpus format round-trips: the tokens in the shards equal encoding the documents directly."""
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megacrystal.data.errors import DataError
from megacrystal.data.prepare import meta_path, prepare_dataset

from .conftest import stdlib_docs
from .formats import write_gz, write_hf_dir, write_jsonl, write_parquet, write_zst

WRITERS = {"x.jsonl": write_jsonl, "x.jsonl.gz": write_gz, "x.jsonl.zst": write_zst, "x.parquet": write_parquet,
           "hf": write_hf_dir}


def shard_docs(out: Path, split: str = "train") -> list[list[int]]:
    """Documents of every shard of a prepared dataset, read back with megatron's own IndexedDataset."""
    meta = json.loads(meta_path(out).read_text())
    docs = []
    for shard in meta["shards"]:
        ds = IndexedDataset(str(out.parent / f"{shard}_{split}"))
        docs += [ds[i].tolist() for i in range(len(ds))]
    return docs


def expected(tok, texts) -> list[list[int]]:
    return [tok.encode(t) + [tok.eos_id] for t in texts if t.strip()]


def prepare(tok, inputs, out, **kw):
    kw = {"valid_fraction": 0.0, "workers": 1, "progress": False, **kw}
    return prepare_dataset("d", inputs, tok, out, **kw)


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_format_round_trips(tmp_path, small_tok, name):
    texts = stdlib_docs(40)
    records = [{"content": t, "lang": "Python", "meta": {"set": "x"}} for t in texts]
    path = WRITERS[name](tmp_path / name, records)
    result = prepare(small_tok, [path], tmp_path / "out", text_field="content", workers=2)
    assert shard_docs(tmp_path / "out") == expected(small_tok, texts)
    assert result.meta["records"]["bad"] == 0 and result.meta["documents"] == len(texts)


text_strategy = st.text(st.characters(blacklist_categories=["Cs"]), min_size=0, max_size=80)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(text_strategy, min_size=1, max_size=12), name=st.sampled_from(sorted(WRITERS)))
def test_any_text_round_trips_in_any_format(tmp_path_factory, small_tok, texts, name):
    d = tmp_path_factory.mktemp("prop")
    texts = texts + ["a non-blank document"]
    path = WRITERS[name](d / name, [{"text": t} for t in texts])
    prepare(small_tok, [path], d / "out")
    assert shard_docs(d / "out") == expected(small_tok, texts)


def test_format_comes_from_magic_bytes_not_the_suffix(tmp_path, small_tok):
    texts = stdlib_docs(10)
    gz_named_jsonl = write_gz(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    zst_named_txt = write_zst(tmp_path / "b.txt", [{"text": t} for t in texts])
    prepare(small_tok, [gz_named_jsonl, zst_named_txt], tmp_path / "out")
    assert shard_docs(tmp_path / "out") == expected(small_tok, texts + texts)


def test_globs_many_files_source_trees_and_filters(tmp_path, small_tok):
    texts = stdlib_docs(30)
    sets = ["RedPajamaC4", "RedPajamaGithub", "RedPajamaWikipedia"]
    records = [{"text": t, "meta": {"redpajama_set_name": sets[i % 3]}} for i, t in enumerate(texts)]
    for k in range(3):
        write_zst(tmp_path / f"chunk_{k}.jsonl.zst", records[k * 10:(k + 1) * 10])
    prepare(small_tok, [str(tmp_path / "chunk_*.jsonl.zst")], tmp_path / "c4",
            filters={"meta.redpajama_set_name": ["RedPajamaC4"]})
    assert shard_docs(tmp_path / "c4") == expected(small_tok, [r["text"] for r in records
                                                               if r["meta"]["redpajama_set_name"] == sets[0]])
    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    (src / "a.py").write_text("def a():\n    return 1\n")
    (src / "b.bin").write_bytes(b"\x00\x01")  # not a source extension: not read
    write_parquet(tmp_path / "src" / "code.parquet", [{"content": t, "lang": l} for t, l in
                                                      [("x = 1\n", "Python"), ("<p>hi</p>", "HTML")]])
    result = prepare(small_tok, [tmp_path / "src"], tmp_path / "tree", text_field="content",
                     filters={"lang": ["Python"]})
    # The .py file is a whole-file document (no text field); the parquet keeps its Python row only.
    assert shard_docs(tmp_path / "tree") == expected(small_tok, ["x = 1\n", "def a():\n    return 1\n"])
    assert result.meta["records"]["filtered"] == 1


def test_bad_records_are_skipped_counted_and_reported_up_to_the_limit(tmp_path, small_tok, capsys):
    texts = stdlib_docs(60)
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in texts]
    lines[3] = b"{not json\n"
    lines[7] = b'{"text": "caf\xe9"}\n'  # latin-1, not UTF-8
    lines[9] = json.dumps({"body": "x"}).encode() + b"\n"
    lines[11] = json.dumps({"text": 5}).encode() + b"\n"
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines))
    trunc = write_zst(tmp_path / "b.jsonl.zst", [{"text": t} for t in texts[:5]], frames=1)
    trunc.write_bytes(trunc.read_bytes()[:-7])
    (tmp_path / "c.txt").write_bytes(b"\x7fELF\x00\x00binary")
    inputs = [tmp_path / "a.jsonl", trunc, tmp_path / "c.txt"]
    with pytest.raises(DataError, match=r"dataset 'd': 6 of \d+ records are bad .*a\.jsonl:4: invalid JSON.*"
                                        r"raise data\.max_bad_fraction"):
        prepare(small_tok, inputs, tmp_path / "out")
    result = prepare(small_tok, inputs, tmp_path / "out", max_bad_fraction=0.2, progress=True)
    r = result.meta["records"]
    assert r["bad"] == 6
    assert r["examples"][:4] == [f"{tmp_path}/a.jsonl:4: invalid JSON (Expecting property name enclosed in "
                                 f"double quotes)", f"{tmp_path}/a.jsonl:8: invalid UTF-8",
                                 f"{tmp_path}/a.jsonl:10: no field 'text'",
                                 f"{tmp_path}/a.jsonl:12: field 'text' is int, not a string"]
    assert "truncated zstd archive" in r["examples"][4] and "binary file" in r["examples"][5]
    good = [t for i, t in enumerate(texts) if i not in (3, 7, 9, 11)]
    docs = shard_docs(tmp_path / "out")
    assert docs[:len(good)] == expected(small_tok, good)  # then whatever complete lines the cut zstd held
    assert "skipped " + r["examples"][0] in capsys.readouterr().err


def test_input_errors_are_one_line_before_work(tmp_path, small_tok):
    with pytest.raises(DataError, match="glob .*nothing_\\*.jsonl matches no file"):
        prepare(small_tok, [str(tmp_path / "nothing_*.jsonl")], tmp_path / "o")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(DataError, match="DatasetDict without a 'train' split"):
        prepare(small_tok, [tmp_path / "hf"], tmp_path / "o")
    write_parquet(tmp_path / "p.parquet", [{"content": "x"}])
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content\)"):
        prepare(small_tok, [tmp_path / "p.parquet"], tmp_path / "o")


def test_a_real_save_to_disk_directory(tmp_path, small_tok):
    """The directory Hugging Face `datasets` itself writes (when installed; our reader does not need it)."""
    datasets = pytest.importorskip("datasets")
    texts = stdlib_docs(25)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": texts, "lang": ["py"] * 25}),
                               "test": datasets.Dataset.from_dict({"content": ["x"], "lang": ["py"]})})
    dd.save_to_disk(str(tmp_path / "hf"), num_shards={"train": 3, "test": 1})
    prepare(small_tok, [tmp_path / "hf"], tmp_path / "out", text_field="content")
    assert shard_docs(tmp_path / "out") == expected(small_tok, texts)
