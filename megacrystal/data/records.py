"""Raw items to documents: JSON parsing, UTF-8 checks, the text field, metadata filters, bad-record accounting."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import orjson

from megacrystal.data.errors import DataError
from megacrystal.data.readers import Batch

MAX_EXAMPLES = 10  # bad records quoted (file:line: reason) in the report and the error
MIN_RECORDS_FOR_CHECK = 1000  # the bad fraction is judged mid-run only once it rests on this many records


@dataclass
class Parsed:
    """The documents of one batch, in order, and what was dropped."""

    texts: list[str]
    bad: list[tuple[str, str]]  # (file:line, reason)
    where: list[str] = field(default_factory=list)  # file:line (or file:row N, or file) of each text
    filtered: int = 0
    blank: int = 0
    documents: int = 0  # len(texts), kept when the texts are dropped after tokenizing
    repaired: int = 0  # documents whose lone surrogates became U+FFFD (set by the tokenizing step)


def load_json(raw: bytes) -> Any:
    """One JSON value: orjson's fast parser, and the standard library's for whatever orjson rejects.

    The stdlib parser is the more lenient one (NaN, a lone surrogate, a BOM, UTF-16) and its verdict and error
    messages are the documented ones, so every record the stdlib accepts is read as before. The one value orjson
    reads differently is an integer over 64 bits, which it returns as a float: as a text field it is a bad record
    either way (reported as float), and only a filter on such an integer would see the difference.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def get_field(record: Any, dotted: str) -> Any:
    """`a.b.c` of nested dicts, or None where a level is missing."""
    for key in dotted.split("."):
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def _blank(text: str | bytes) -> bool:
    """Empty or only whitespace; isspace() stops at the first other character, strip() would copy the text."""
    return not text or text.isspace()


def _keep(values: Mapping[str, Any], filters: Mapping[str, Sequence[str]]) -> bool:
    return all(values.get(f) in allowed for f, allowed in filters.items())


def _take(out, where: str, text, reason: str | None, kept) -> None:
    """Count one record as bad, filtered out or blank, or keep its text; `kept()` applies the metadata filters."""
    if reason:
        out.bad.append((where, reason))
    elif not kept():
        out.filtered += 1
    elif _blank(text):
        out.blank += 1
    else:
        out.texts.append(text)
        out.where.append(where)


def _text_or_reason(value: Any, text_field: str) -> tuple[str | None, str | None]:
    if value is None:
        return None, f"no field '{text_field}'"
    if not isinstance(value, str):
        return None, f"field '{text_field}' is {type(value).__name__}, not a string"
    return value, None


def parse_batch(batch: Batch, text_field: str, filters: Mapping[str, Sequence[str]]) -> Parsed:
    """Documents of a batch; malformed items become (where, reason) entries instead of errors."""
    out = Parsed([], [])
    if batch.kind == "jsonl":
        for i, raw in enumerate(batch.items):
            where = f"{batch.file}:{batch.first + i}"
            if _blank(raw):
                continue
            try:
                record = load_json(raw)
            except UnicodeDecodeError:
                out.bad.append((where, "invalid UTF-8"))
                continue
            except json.JSONDecodeError as e:
                out.bad.append((where, f"invalid JSON ({e.msg})"))
                continue
            if not isinstance(record, dict):
                out.bad.append((where, f"a JSON {type(record).__name__}, not an object"))
                continue
            _take(out, where, *_text_or_reason(get_field(record, text_field), text_field),
                  lambda: not filters or _keep({f: get_field(record, f) for f in filters}, filters))
    elif batch.kind == "text":
        names = (batch.extra or {}).get("files") or [batch.file] * len(batch.items)
        for name, raw in zip(names, batch.items):
            if b"\x00" in raw[:8192]:
                out.bad.append((name, "binary file (NUL bytes)"))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.bad.append((name, f"invalid UTF-8 at byte {e.start}"))
                continue
            if not _blank(text):
                out.texts.append(text)
                out.where.append(name)
            else:
                out.blank += 1
    else:  # column
        for i, value in enumerate(batch.items):
            where = f"{batch.file}:row {batch.first + i}"
            _take(out, where, *_text_or_reason(value, text_field),
                  lambda: not filters or _keep({f: batch.extra[f][i] for f in filters}, filters))
    if batch.error:
        line = batch.first + len(batch.items)
        where = batch.file if batch.kind == "text" else \
            f"{batch.file}:{'row ' if batch.kind == 'column' else ''}{line}"
        out.bad.append((where, batch.error))
    out.documents = len(out.texts)
    return out


@dataclass
class BadRecords:
    """Counts of good and bad records of one dataset, with the first few bad ones quoted."""

    dataset: str
    max_fraction: float
    documents: int = 0
    bad: int = 0
    filtered: int = 0
    blank: int = 0
    repaired: int = 0
    examples: list[str] = field(default_factory=list)
    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, parsed: Parsed) -> None:
        """Count one parsed batch."""
        self.documents += parsed.documents
        self.filtered += parsed.filtered
        self.blank += parsed.blank
        self.repaired += parsed.repaired
        for where, reason in parsed.bad:
            self.bad += 1
            kind = reason.split(" (")[0]
            self.by_reason[kind] = self.by_reason.get(kind, 0) + 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{where}: {reason}")

    def merge(self, other: Mapping) -> None:
        """Add the counts of a finished shard (its `bad` section)."""
        self.documents += other["documents"]
        self.bad += other["bad"]
        self.filtered += other.get("filtered", 0)
        self.blank += other.get("blank", 0)
        self.repaired += other.get("repaired", 0)
        for k, v in other.get("by_reason", {}).items():
            self.by_reason[k] = self.by_reason.get(k, 0) + v
        self.examples += other.get("examples", [])[:max(0, MAX_EXAMPLES - len(self.examples))]

    @property
    def fraction(self) -> float:
        """Bad records over all records read (bad or not)."""
        total = self.documents + self.bad + self.filtered + self.blank
        return self.bad / total if total else 0.0

    def check(self, final: bool) -> None:
        """DataError past max_fraction (mid-run only once enough records were read to judge)."""
        total = self.documents + self.bad + self.filtered + self.blank
        if not self.bad or (not final and total < MIN_RECORDS_FOR_CHECK):
            return
        if self.fraction > self.max_fraction:
            first = self.examples[0] if self.examples else "?"
            raise DataError(f"dataset '{self.dataset}': {self.bad} of {total} records are bad "
                            f"({self.fraction:.1%} > data.max_bad_fraction {self.max_fraction:g}), first {first}; "
                            f"fix or remove that input, check text_field, or raise data.max_bad_fraction")

    def as_dict(self) -> dict:
        """The counts for a meta file."""
        return {"documents": self.documents, "bad": self.bad, "filtered": self.filtered, "blank": self.blank,
                "repaired": self.repaired, "by_reason": dict(sorted(self.by_reason.items())),
                "examples": list(self.examples)}
