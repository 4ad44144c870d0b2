"""The embedded default corpus: prose, Python and web-code documents built offline from this machine's Python.

Every machine of this kind has the interpreter's standard library and the project's installed packages, so the
tiny end-to-end pipeline needs no download. Three domains, one JSONL file each, mirroring Crystal's phase-3 mix
of English text, Python and HTML/CSS/JS on a small scale.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from megacrystal.data.errors import DataError

DOMAINS = ("prose", "python", "web")
CORPUS_VERSION = 1  # bump when the selection rules change, so provenance tells old and new builds apart
DEFAULT_MAX_BYTES = 3_000_000
MAX_FILE_BYTES = 200_000  # larger stdlib files are generated tables (pydoc topics, unicode data), not code
MAX_LINE_CHARS = 2_000  # a longer line means minified web code, which teaches little
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"})
WEB_EXTENSIONS = (".html", ".htm", ".css", ".js", ".mjs")
MIN_DOCSTRING_WORDS = 8
# Pure-Python stdlib modules without import side effects, documented by pydoc when the machine ships too
# little real HTML; kept fixed so the fallback is the same on every machine with this Python.
PYDOC_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip",
    "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies", "imaplib", "inspect", "ipaddress",
    "json", "keyword", "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes",
    "numbers", "operator", "optparse", "pathlib", "pickle", "pprint", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socketserver",
    "statistics", "string", "stringprep", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "types", "typing", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zipimport",
)


@dataclass(frozen=True)
class Doc:
    """One corpus document and where it came from."""

    source: str
    text: str

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


def _roots() -> dict[str, Path]:
    """The labelled roots documents are taken from: the stdlib and the running environment's site-packages."""
    paths = sysconfig.get_paths()
    return {"stdlib": Path(paths["stdlib"]), "site-packages": Path(paths["purelib"])}


def _walk(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files under root with one of the extensions, in sorted order, skipping test and cache dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(extensions)]
    return found


def _read(path: Path) -> str | None:
    """The file's text, or None when it is too big, not UTF-8 or minified."""
    if path.stat().st_size > MAX_FILE_BYTES:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    if not text.strip() or max(map(len, text.splitlines()), default=0) > MAX_LINE_CHARS:
        return None
    return text


def _label(path: Path, root_label: str, root: Path) -> str:
    return f"{root_label}/{path.relative_to(root).as_posix()}"


def _spread(docs: list[Doc], max_bytes: int) -> list[Doc]:
    """Keep sorted order but take every k-th document so a byte cap samples the whole tree, not its first letters."""
    total = sum(d.nbytes for d in docs)
    step = max(1, total // max_bytes) if max_bytes > 0 else 1
    return docs[::step]


def _fill(groups: Iterable[list[Doc]], max_bytes: int) -> list[Doc]:
    """Concatenate groups in order, skipping any document that would overflow the byte cap."""
    out, used = [], 0
    for group in groups:
        for doc in group:
            if used + doc.nbytes <= max_bytes:
                out.append(doc)
                used += doc.nbytes
    return out


def _docstrings(path: Path, label: str) -> Doc | None:
    """A module's prose: its module, class and function docstrings with enough words to be sentences."""
    text = _read(path)
    if text is None:
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.split()) >= MIN_DOCSTRING_WORDS:
                parts.append(doc if isinstance(node, ast.Module) else f"{node.name}\n\n{doc}")
    return Doc(f"{label}#docstrings", "\n\n".join(parts)) if parts else None


def _prose(max_bytes: int) -> tuple[list[Doc], dict]:
    """pydoc topic texts, license texts (deduplicated), then docstrings of stdlib modules."""
    import pydoc_data.topics  # ships with every CPython: the language reference's help() texts

    roots = _roots()
    topics = [Doc(f"stdlib/pydoc_data/topics.py:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    licenses, seen = [], set()
    candidates = [(roots["stdlib"] / "LICENSE.txt", "stdlib")]
    site = roots["site-packages"]
    if site.is_dir():
        for info in sorted(site.glob("*.dist-info")):
            found = [*info.glob("LICEN[CS]E*"), *info.glob("licenses/LICEN[CS]E*")]
            candidates += [(p, "site-packages") for p in sorted(found)]
    for path, root_label in candidates:
        text = _read(path) if path.is_file() else None
        if text is not None and (digest := hashlib.sha256(text.encode()).digest()) not in seen:
            seen.add(digest)
            licenses.append(Doc(_label(path, root_label, roots[root_label]), text))
    module_docs = [d for p in _walk(roots["stdlib"], (".py",))
                   if (d := _docstrings(p, _label(p, "stdlib", roots["stdlib"]))) is not None]
    budget = max_bytes - sum(d.nbytes for d in topics + licenses)
    docs = _fill([topics, licenses, _spread(module_docs, budget)], max_bytes)
    return docs, {"sources": ["pydoc_data.topics", "LICENSE texts", "stdlib docstrings (ast)"]}


def _python(max_bytes: int) -> tuple[list[Doc], dict]:
    """Standard-library Python sources, tests and generated tables excluded."""
    root = _roots()["stdlib"]
    docs = [Doc(_label(p, "stdlib", root), t) for p in _walk(root, (".py",)) if (t := _read(p)) is not None]
    return _fill([_spread(docs, max_bytes)], max_bytes), {"sources": ["stdlib .py files"]}


# Runs in a fresh interpreter: importing ~90 modules must not leak into the caller, and a fixed hash seed keeps
# any set ordering in the rendered pages stable.
_PYDOC_SCRIPT = r"""
import importlib, json, pydoc, re, sys
root, budget, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
used = 0
for name in names:
    try:
        mod = importlib.import_module(name)
        page = pydoc.html.page(pydoc.describe(mod), pydoc.html.docmodule(mod))
    except Exception:
        continue
    # Object reprs carry memory addresses, which differ on every run.
    page = re.sub(r"(?: |&nbsp;)at(?: |&nbsp;)0x[0-9a-fA-F]+", "", page).replace(root, "stdlib")
    size = len(page.encode("utf-8"))
    if used + size > budget:
        break  # stop at the first page that does not fit: rendering the rest would cost seconds for nothing
    used += size
    print(json.dumps({"source": "pydoc-html/" + name, "text": page}))
"""


def _pydoc_html(budget: int) -> list[Doc]:
    """HTML pages rendered by pydoc.HTMLDoc for a fixed list of stdlib modules, up to `budget` bytes."""
    if budget <= 0:
        return []
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-s", "-P", "-c", _PYDOC_SCRIPT, str(_roots()["stdlib"]), str(budget),
                           *PYDOC_MODULES], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise DataError(f"rendering pydoc HTML for the web corpus failed: {proc.stderr.strip().splitlines()[-1:]}; "
                        f"build with a smaller max_bytes_per_domain or report this Python ({sys.version.split()[0]})")
    return [Doc(**json.loads(line)) for line in proc.stdout.splitlines() if line]


def _web(max_bytes: int) -> tuple[list[Doc], dict]:
    """HTML/CSS/JS shipped in the stdlib and installed packages, topped up with pydoc HTML when that is too little."""
    docs = []
    for label, root in _roots().items():
        if root.is_dir():
            files = _walk(root, WEB_EXTENSIONS)
            docs += [Doc(_label(p, label, root), t) for p in files if (t := _read(p)) is not None]
    real = _fill([_spread(docs, max_bytes)], max_bytes)
    real_bytes = sum(d.nbytes for d in real)
    generated = _pydoc_html(max_bytes - real_bytes)
    info = {"sources": ["HTML/CSS/JS files in stdlib and site-packages"], "real_files": len(real),
            "real_files_bytes": real_bytes,
            "pydoc_html_fallback": {"used": bool(generated), "modules": len(generated),
                                    "bytes": sum(d.nbytes for d in generated),
                                    "why": "the machine ships less real web code than max_bytes_per_domain"}}
    if generated:
        info["sources"].append("pydoc.HTMLDoc pages of stdlib modules (generated, not real web code)")
    return real + generated, info


_BUILDERS = {"prose": _prose, "python": _python, "web": _web}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see a half-written corpus file


def provenance_path(jsonl_path: str | os.PathLike) -> Path:
    """Where the provenance of `<dir>/<domain>.jsonl` lives: `<dir>/<domain>.provenance.json`."""
    p = Path(jsonl_path)
    return p.with_name(p.name.removesuffix(".jsonl") + ".provenance.json")


def build_corpus(out_dir: str | os.PathLike, max_bytes_per_domain: int = DEFAULT_MAX_BYTES,
                 domains: Iterable[str] = DOMAINS) -> dict[str, Path]:
    """Write `<domain>.jsonl` ({"text", "source"} per line) and `<domain>.provenance.json` for each domain."""
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise DataError(f"unknown corpus domain(s) {unknown}; choose from {list(DOMAINS)}")
    if max_bytes_per_domain <= 0:
        raise DataError(f"max_bytes_per_domain must be positive, got {max_bytes_per_domain}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for domain in domains:
        docs, info = _BUILDERS[domain](max_bytes_per_domain)
        if not docs:
            raise DataError(f"corpus domain '{domain}' came out empty from {_roots()}; "
                            f"check the Python installation or raise max_bytes_per_domain")
        data = "".join(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n" for d in docs)
        data_bytes = data.encode("utf-8")
        listing = "".join(f"{d.source}\t{d.nbytes}\n" for d in docs).encode("utf-8")
        provenance = {
            "domain": domain, "corpus_version": CORPUS_VERSION,
            "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
            "max_bytes_per_domain": max_bytes_per_domain, "documents": len(docs),
            "text_bytes": sum(d.nbytes for d in docs), "jsonl_bytes": len(data_bytes),
            "file_list_sha256": hashlib.sha256(listing).hexdigest(),
            "jsonl_sha256": hashlib.sha256(data_bytes).hexdigest(),
            **info,
        }
        path = out / f"{domain}.jsonl"
        _write_atomic(path, data_bytes)
        _write_atomic(provenance_path(path), (json.dumps(provenance, indent=2, sort_keys=True) + "\n").encode())
        paths[domain] = path
    return paths
