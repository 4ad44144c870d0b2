#!/usr/bin/env bash
# The main job on the embedded default: set up the environment, build the offline corpus, tokenizer and
# indexed datasets (skipped when unchanged), then train the tiny Crystal through its three phases.
# Extra arguments go to both commands (e.g. --set run.dir=/tmp/run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
"$ROOT/.venv/bin/megacrystal" prepare --config configs/crystal-tiny.yaml "$@"
exec "$ROOT/.venv/bin/megacrystal" train --config configs/crystal-tiny.yaml "$@"
