"""Shared fixtures of the data tests: real documents and one small sentencepiece model per session."""
import sysconfig
from pathlib import Path

import pytest

from megacrystal.data.tokenizer import CrystalTokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_docs(n: int = 120, skip: int = 0) -> list[str]:
    """Real documents: top-level chunks of stdlib modules (split at two blank lines)."""
    out = []
    for path in sorted(STDLIB.glob("*.py"))[skip:skip + 40]:
        out += [d for d in path.read_text(encoding="utf-8").split("\n\n\n") if d.strip()]
        if len(out) >= n:
            break
    return out[:n]


@pytest.fixture(scope="session")
def small_tok(tmp_path_factory) -> CrystalTokenizer:
    d = tmp_path_factory.mktemp("small_tok")
    (d / "train.txt").write_text("\n".join(stdlib_docs(300)))
    return CrystalTokenizer.load(train_tokenizer([d / "train.txt"], d / "m", 400))
