"""25+ malformed or unusual inputs through `megacrystal prepare`: each is skipped and counted, read correctly, or
stopped with one line naming the file and the fix; never a traceback. docs/data-inputs.md lists the same cases."""
import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pytest
import yaml

from megacrystal.cli import main

from .conftest import stdlib_docs
from .formats import write_gz, write_hf_dir, write_jsonl, write_parquet, write_zst

ROOT = Path(__file__).resolve().parents[2]
GOOD = [{"text": t} for t in stdlib_docs(30)]


def good(d: Path) -> Path:
    return write_jsonl(d / "good.jsonl", GOOD)


def lines_with(d: Path, bad: bytes) -> Path:
    p = d / "mixed.jsonl"
    p.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD[:10]) + bad + b"\n" +
                  b"".join(json.dumps(r).encode() + b"\n" for r in GOOD[10:]))
    return p


def _truncated(path: Path, cut: int) -> Path:
    path.write_bytes(path.read_bytes()[:-cut])
    return path


def _arrow_file(d: Path) -> Path:
    table = pa.Table.from_pylist(GOOD)
    with pa.OSFile(str(d / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return d / "x.arrow"


def _source_tree(d: Path) -> Path:
    (d / "tree").mkdir()
    (d / "tree" / "a.py").write_text("def a():\n    return 1\n")
    (d / "tree" / "latin.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    (d / "tree" / "a.cpython-311.pyc").write_bytes(b"\x00\x01\x02")
    return d / "tree"


def _unreadable(d: Path) -> Path:
    p = good(d)
    p.chmod(0)
    return p


# (case, what the input is, make(dir) -> inputs, extra dataset/data fields, expected: "ok", "ok, N bad" or
# "error: <text of the one line>")
CASES = [
    ("bad-json", "one malformed JSON line among 30 good", lambda d: [lines_with(d, b"{not json")], {},
     "ok, 1 bad"),
    ("bad-utf8", "one line of latin-1 bytes", lambda d: [lines_with(d, b'{"text": "caf\xe9"}')], {}, "ok, 1 bad"),
    ("lone-surrogate", "one record whose text escapes a lone surrogate (\\ud800)",
     lambda d: [lines_with(d, b'{"text": "bad \\ud800 pair"}')], {}, "ok, 0 bad, 1 repaired"),
    ("missing-field", "one record without the text field", lambda d: [lines_with(d, b'{"body": "x"}')], {},
     "ok, 1 bad"),
    ("int-field", "one record whose text is a number", lambda d: [lines_with(d, b'{"text": 5}')], {}, "ok, 1 bad"),
    ("json-array", "one line that is a JSON array", lambda d: [lines_with(d, b'["text"]')], {}, "ok, 1 bad"),
    ("wrong-text-field", "every record lacks the configured field", lambda d: [good(d)], {"text_field": "content"},
     "error: 30 of 30 records are bad"),
    ("too-many-bad", "4 bad lines of 34 (above max_bad_fraction 0.1)",
     lambda d: [lines_with(d, b"{x\n{y\n{z\n{w")], {"max_bad_fraction": 0.1}, "error: raise data.max_bad_fraction"),
    ("binary-file", "an ELF binary named .txt beside a good file",
     lambda d: [good(d), (d / "b.txt").write_bytes(b"\x7fELF\x00\x00\x01") and d / "b.txt"], {}, "ok, 1 bad"),
    ("empty-file", "an empty .jsonl alone", lambda d: [(d / "e.jsonl").write_bytes(b"") or d / "e.jsonl"], {},
     "error: hold no non-blank document"),
    ("empty-beside-good", "an empty file beside a good one",
     lambda d: [(d / "e.jsonl").write_bytes(b"") or d / "e.jsonl", good(d)], {}, "ok, 0 bad"),
    ("truncated-zst", "a .jsonl.zst cut 9 bytes short", lambda d: [good(d), _truncated(write_zst(
        d / "t.jsonl.zst", GOOD, frames=1), 9)], {}, "ok, 1 bad"),
    ("corrupt-zst", "zstd magic followed by garbage",
     lambda d: [good(d), (d / "c.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 9) and d / "c.zst"], {},
     "ok, 1 bad"),
    ("gzip-named-jsonl", "a gzip file named .jsonl", lambda d: [write_gz(d / "g.jsonl", GOOD)], {}, "ok, 0 bad"),
    ("truncated-gz", "a .jsonl.gz cut 20 bytes short",
     lambda d: [good(d), _truncated(write_gz(d / "t.jsonl.gz", GOOD), 20)], {}, "ok, 1 bad"),
    ("truncated-gz-text", "a gzipped plain-text file cut short, beside a good file",
     lambda d: [good(d), (d / "t.txt.gz").write_bytes(gzip.compress(b"plain text " * 5000)[:-30]) and
                d / "t.txt.gz"], {}, "ok, 1 bad"),
    ("missing-file", "a path that does not exist", lambda d: [d / "nope.jsonl"], {}, "error: does not exist"),
    ("unreadable", "a file with mode 000 (root reads it anyway)", lambda d: [_unreadable(d)], {},
     "ok, 0 bad" if os.geteuid() == 0 else "error: is not readable (permissions)"),
    ("empty-glob", "a glob that matches nothing", lambda d: [str(d / "none-*.jsonl.zst")], {},
     "error: matches no file"),
    ("empty-dir", "a directory with no corpus or source files",
     lambda d: [(d / "empty").mkdir() or d / "empty"], {}, "error: holds no corpus file"),
    ("hf-no-train", "a Hugging Face DatasetDict without a train split", lambda d: [
        (d / "dd").mkdir() or (d / "dd" / "dataset_dict.json").write_text('{"splits": ["test"]}') and d / "dd"],
     {}, "error: without a 'train' split"),
    ("parquet-no-column", "a Parquet file without the text column",
     lambda d: [write_parquet(d / "p.parquet", [{"content": "x"}])], {}, "error: no column 'text'"),
    ("parquet-nulls", "a Parquet column with 2 nulls among 30 texts",
     lambda d: [write_parquet(d / "p.parquet", GOOD[:15] + [{"text": None}] * 2 + GOOD[15:])], {}, "ok, 2 bad"),
    ("truncated-parquet", "a Parquet file cut in half, beside a good file", lambda d: [good(d), _truncated(
        write_parquet(d / "p.parquet", GOOD), (d / "p.parquet").stat().st_size // 2 if (d / "p.parquet").exists()
        else 1)], {}, "ok, 1 bad"),
    ("blank-docs", "blank lines and whitespace-only texts",
     lambda d: [write_jsonl(d / "b.jsonl", GOOD + [{"text": "  \n "}]) and
                (d / "b.jsonl").write_bytes((d / "b.jsonl").read_bytes() + b"\n\n") and d / "b.jsonl"], {},
     "ok, 0 bad"),
    ("filter-matches-nothing", "a metadata filter no record passes", lambda d: [good(d)],
     {"filters": {"lang": ["Rust"]}}, "error: 30 filtered out"),
    ("crlf", "JSONL with CRLF line ends",
     lambda d: [(d / "c.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\r\n" for r in GOOD))
                and d / "c.jsonl"], {}, "ok, 0 bad"),
    ("bom", "JSONL starting with a UTF-8 BOM",
     lambda d: [(d / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + write_jsonl(d / "x.jsonl", GOOD).read_bytes())
                and d / "b.jsonl"], {}, "ok, 0 bad"),
    ("huge-line", "one 5 MB document", lambda d: [write_jsonl(d / "h.jsonl", [{"text": "x = 1\n" * 900_000}])],
     {}, "ok, 0 bad"),
    ("arrow-file", "an Arrow IPC file (not stream)", lambda d: [_arrow_file(d)], {}, "ok, 0 bad"),
    ("hf-dir", "a Hugging Face save_to_disk directory", lambda d: [write_hf_dir(d / "hf", GOOD)], {}, "ok, 0 bad"),
    ("source-tree", "a source tree with a latin-1 .py and a .pyc", lambda d: [_source_tree(d)],
     {"max_bad_fraction": 0.5}, "ok, 1 bad"),
    ("missing-tokenizer", "tokenizer.model points nowhere", lambda d: [good(d)], {"tokenizer": "/nope/m.model"},
     "error: tokenizer model /nope/m.model not found"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input(case, tmp_path, small_tok, capsys):
    name, _, make, extra, outcome = case
    extra = dict(extra)
    inputs = [str(p) for p in make(tmp_path)]
    raw = yaml.safe_load((ROOT / "configs" / "crystal-tiny.yaml").read_text())
    ds = {"inputs": inputs, **{k: extra.pop(k) for k in ("text_field", "filters") if k in extra}}
    raw["data"] = {"source": "indexed", "dir": str(tmp_path / "data"),
                   "tokenizer": {"model": extra.pop("tokenizer", small_tok.source)}, "datasets": {"d": ds},
                   "phases": {"one": {"tokens": 4096, "weights": {"d": 1.0}, "lr": {"peak": 0.01}}},
                   "workers": 1, "max_bad_fraction": 0.2, **extra}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    code = main(["prepare", "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if outcome.startswith("error: "):
        errors = [line for line in err.splitlines() if line.startswith("megacrystal: error: ")]
        assert code == 2 and len(errors) == 1 and outcome[len("error: "):] in errors[0], err
    else:
        assert code == 0, err
        meta = json.loads((tmp_path / "data" / "d.meta.json").read_text())
        counts = {part.split()[1]: int(part.split()[0]) for part in outcome.split(", ")[1:]}
        assert meta["records"]["bad"] == counts["bad"], meta["records"]
        assert meta["records"]["repaired"] == counts.get("repaired", 0), meta["records"]
        assert meta["documents"] >= 1


def test_the_docs_table_lists_every_case():
    table = (ROOT / "docs" / "data-inputs.md").read_text()
    assert len(CASES) >= 25
    for name, what, _, extra, outcome in CASES:
        assert f"| {name} |" in table, name
