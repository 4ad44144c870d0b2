"""The packages import only downwards, as docs/architecture.md draws them; a new upward import fails here."""
from __future__ import annotations

import ast
from pathlib import Path

import megacrystal

ROOT = Path(megacrystal.__file__).parent

# package -> the megacrystal packages (or top-level modules) it may import; docs/architecture.md's table.
BELOW_TRAIN = {"config", "schedule", "distributed", "kernels", "model", "data", "checkpoint", "engines"}
MAY_IMPORT = {
    "config": set(),
    "schedule": {"config"},
    "distributed": {"config"},
    "kernels": {"config", "distributed"},
    "model": {"config", "distributed", "kernels"},
    "data": {"config", "schedule"},
    "checkpoint": {"config", "distributed"},
    "engines": {"config", "schedule", "distributed", "kernels", "model", "data", "checkpoint"},
    "train": BELOW_TRAIN,
    "export": BELOW_TRAIN | {"train"},
    "launch": {"config"},
    "bench": BELOW_TRAIN | {"train", "launch"},
    "lab": BELOW_TRAIN | {"train", "launch", "export"},
    "quiet": set(),
    "host_memory": set(),
}
# Entry points that run the command line in-process: they sit above everything by nature.
ENTRY_POINTS = {"__main__.py", "launch/worker.py"}


def _imported_packages(path: Path, root: Path = ROOT) -> set[str]:
    """The megacrystal packages or top-level modules that one source file imports (relative or absolute)."""
    package = list(path.relative_to(root.parent).parts[:-1])  # e.g. [megacrystal, data]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = package[:len(package) - node.level + 1] if node.level else []
            parts += node.module.split(".") if node.module else []
            names = [parts + [alias.name] for alias in node.names] if len(parts) == 1 else [parts]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        else:
            continue
        found |= {parts[1] for parts in names if parts[0] == root.name and len(parts) > 1}
    return found


def test_every_package_imports_only_what_the_architecture_allows():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        owner = rel.parts[0].removesuffix(".py")
        if str(rel) in ENTRY_POINTS or owner in ("cli", "__init__"):
            continue
        assert owner in MAY_IMPORT, f"{rel}: a package the architecture table does not list"
        for target in _imported_packages(path) - {owner}:
            if target not in MAY_IMPORT[owner]:
                wrong.append(f"{rel} imports megacrystal.{target}")
    assert not wrong, "imports against docs/architecture.md's direction:\n" + "\n".join(wrong)


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    pkg = tmp_path / "megacrystal"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "__init__.py").write_text("from .blend import x\nfrom ..schedule import plan\n")
    (pkg / "data" / "blend.py").write_text(
        "import os\nfrom . import fim\nfrom ..engines.base import Microbatch\nfrom .. import quiet\n"
        "import megacrystal.train.loop\nfrom megacrystal.model import crystal\n")
    assert _imported_packages(pkg / "data" / "__init__.py", pkg) == {"data", "schedule"}
    assert _imported_packages(pkg / "data" / "blend.py", pkg) == {"data", "engines", "quiet", "train", "model"}
