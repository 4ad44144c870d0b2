#!/usr/bin/env bash
# The main job on the embedded default: set up the environment, then train the tiny Crystal.
# Extra arguments are passed to `megacrystal train` (e.g. --set train.steps=20).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/megacrystal" train --config configs/crystal-tiny.yaml "$@"
