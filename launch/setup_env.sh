#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv at .venv with every dependency installed.
# Idempotent: a stamp of setup.py's hash skips the work when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGACRYSTAL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

STAMP="$VENV/.megacrystal-stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/launch/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi

echo "[setup] creating virtualenv at $VENV" >&2
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# The CPU torch goes in first: any later requirement it satisfies installs nothing more, so pip never
# resolves a multi-GB CUDA build of torch.
"${PIP[@]}" install "torch==2.13.0" 2> >(grep -v "is ignored: it is neither" >&2)
# DeepSpeed ships only an sdist whose setup.py imports torch: build it against the CPU torch above, with
# no C++ ops compiled at install time (megacrystal needs none).
DS_BUILD_OPS=0 "${PIP[@]}" install --no-build-isolation "deepspeed==0.19.8" 2> >(grep -v "is ignored: it is neither" >&2)
"${PIP[@]}" install -e "$ROOT[test]" 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'" \
    || { echo "[setup] error: a CUDA build of torch was installed; remove $VENV and retry" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "[setup] done" >&2
