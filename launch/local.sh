#!/usr/bin/env bash
# Train on this machine with N processes: launch/local.sh N CONFIG [--set key=value ...]
# torchrun --standalone picks a free rendezvous port, so several runs can share a machine.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: launch/local.sh NPROC CONFIG [--set key=value ...]" >&2
    exit 2
fi
NPROC="$1"; CONFIG="$2"; shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
# One BLAS thread per rank by default (torchrun would otherwise warn that it sets this).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
exec "$ROOT/.venv/bin/torchrun" --standalone --nproc_per_node "$NPROC" -m megacrystal train --config "$CONFIG" "$@"
