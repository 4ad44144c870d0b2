#!/usr/bin/env bash
# The test suite: set up the environment, then run every test (slow ones included; `-m "not slow"` skips them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
