"""records.load_json reads every record exactly as the standard library does (orjson first, json for the rest)."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacrystal.data.records import load_json

TEXT = st.text(st.characters(codec="utf-8") | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | TEXT,
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                      max_leaves=12)


def same(a, b) -> bool:
    """Equal, with NaN equal to NaN (the stdlib reads NaN; orjson refuses it and defers)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(VALUES, st.booleans())
def test_values_read_as_the_standard_library_reads_them(value, ascii_only):
    raw = json.dumps({"text": value}, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert same(load_json(raw), json.loads(raw))


@pytest.mark.parametrize("raw", [b'{"text":"\\ud800"}', b'{"a":NaN}', b'\xef\xbb\xbf{"a":1}', b'{"a":1e400}',
                                 b'{"a":"\xed\xa0\x80"}', '{"a":1}'.encode("utf-16"), b'{"a":1,"a":2}',
                                 b'  {"a":"\\u0000"}  \r\n'])
def test_lenient_records_fall_back_to_the_standard_library(raw):
    assert same(load_json(raw), json.loads(raw))


@pytest.mark.parametrize("raw", [b'{"a":1} x', b'{"text": "\xff"}', b"{not json", b""])
def test_bad_records_raise_what_the_standard_library_raises(raw):
    with pytest.raises(ValueError) as ours:
        load_json(raw)
    with pytest.raises(ValueError) as stdlib:
        json.loads(raw)
    assert type(ours.value) is type(stdlib.value) and str(ours.value) == str(stdlib.value)
