"""The embedded corpus: three real-text domains, byte-identical across builds, with provenance."""

import json
import platform

import pytest

from megacrystal.data.corpus import DOMAINS, build_corpus, provenance_path
from megacrystal.data.errors import DataError

MAX_BYTES = 150_000


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    a = build_corpus(tmp_path_factory.mktemp("a"), max_bytes_per_domain=MAX_BYTES)
    b = build_corpus(tmp_path_factory.mktemp("b"), max_bytes_per_domain=MAX_BYTES)
    return a, b


def test_two_builds_are_byte_identical(builds):
    a, b = builds
    assert set(a) == set(DOMAINS)
    for domain in DOMAINS:
        assert a[domain].read_bytes() == b[domain].read_bytes()
        assert provenance_path(a[domain]).read_bytes() == provenance_path(b[domain]).read_bytes()


def test_domains_non_empty_and_capped(builds):
    for domain, path in builds[0].items():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) >= 2, domain
        assert all(set(r) == {"text", "source"} and r["text"].strip() for r in records)
        assert sum(len(r["text"].encode()) for r in records) <= MAX_BYTES
        # Sources are relative labels, never this machine's absolute paths.
        assert all(not r["source"].startswith("/") for r in records)


def test_domain_contents_look_right(builds):
    sources = {d: [json.loads(l)["source"] for l in p.read_text().splitlines()] for d, p in builds[0].items()}
    assert any(s.startswith("stdlib/pydoc_data/topics.py:") for s in sources["prose"])
    assert all(s.startswith("stdlib/") and s.endswith(".py") for s in sources["python"])
    assert not any("/test/" in s or "/tests/" in s for s in sources["python"])
    assert all(s.startswith("pydoc-html/") or s.endswith((".html", ".htm", ".css", ".js", ".mjs"))
               for s in sources["web"])


def test_provenance(builds):
    for domain, path in builds[0].items():
        prov = json.loads(provenance_path(path).read_text())
        assert prov["domain"] == domain
        assert prov["python"]["version"] == platform.python_version()
        assert prov["documents"] == len(path.read_text().splitlines())
        assert prov["jsonl_bytes"] == path.stat().st_size
        assert len(prov["file_list_sha256"]) == 64 and prov["sources"]
    web = json.loads(provenance_path(builds[0]["web"]).read_text())
    assert "pydoc_html_fallback" in web  # says whether generated HTML was added


def test_errors(tmp_path):
    with pytest.raises(DataError, match="unknown corpus domain"):
        build_corpus(tmp_path, domains=["prose", "rust"])
    with pytest.raises(DataError, match="positive"):
        build_corpus(tmp_path, max_bytes_per_domain=0)
