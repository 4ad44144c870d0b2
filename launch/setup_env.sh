#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv at .venv with every dependency installed.
# Idempotent: a stamp of setup.py's hash skips the work when nothing changed.
#
#   bash launch/setup_env.sh                      the CPU build of torch (the default; what CI uses)
#   bash launch/setup_env.sh --cuda [VERSION]     the CUDA build of the same torch for CUDA VERSION (default 13.0;
#                                                 also MEGACRYSTAL_CUDA=VERSION), for GPU nodes
#       --te                                      + Transformer Engine (fused kernels; builds against this torch)
#       --apex                                    + NVIDIA apex (fused LayerNorm / Adam; built from source)
#   --dry-run                                     print the index, versions and commands; install nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGACRYSTAL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

TORCH=2.13.0
DEEPSPEED=0.19.8
# CUDA builds of torch 2.13 (pytorch/pytorch RELEASE.md, "Release Compatibility Matrix", PR #187075): CUDA 12.6
# and 13.0 stable, 13.2 experimental; each is a wheel index under download.pytorch.org/whl/cu<MAJOR><MINOR>.
CUDA_VERSIONS="12.6 13.0 13.2"
CUDA_DEFAULT=13.0
# The newest Transformer Engine that megatron-core 0.16.1 declares (its dev extra:
# transformer-engine[core_cu13,pytorch]>=2.9.0a0,<2.12.0); its torch extension compiles against this torch.
TE_VERSION=2.11.0
# apex has no releases on PyPI: a pinned commit of its repository, built with its C++/CUDA extensions.
APEX_REF="${MEGACRYSTAL_APEX_REF:-1bcf66dc11c3f614d6a071b1bb39854189ea3110}"

die() { echo "[setup] error: $*" >&2; exit 2; }
CUDA="${MEGACRYSTAL_CUDA:-}"
WITH_TE=0 WITH_APEX=0 DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda)
            if [[ $# -gt 1 && "$2" != --* ]]; then CUDA="$2"; shift; else CUDA="${CUDA:-$CUDA_DEFAULT}"; fi ;;
        --cuda=*) CUDA="${1#--cuda=}" ;;
        --te) WITH_TE=1 ;;
        --apex) WITH_APEX=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) die "unknown option $1; see bash launch/setup_env.sh --help" ;;
    esac
    shift
done
if [[ -n "$CUDA" && " $CUDA_VERSIONS " != *" $CUDA "* ]]; then
    die "--cuda $CUDA: torch $TORCH ships CUDA builds for ${CUDA_VERSIONS// /, } only; pick one (default $CUDA_DEFAULT)"
fi
if [[ -z "$CUDA" && ( $WITH_TE == 1 || $WITH_APEX == 1 ) ]]; then
    die "--te and --apex are GPU extras; add --cuda [VERSION]"
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
NVCC="$(command -v nvcc || true)"
[[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] && NVCC="$CUDA_HOME/bin/nvcc"
if [[ -n "$CUDA" ]]; then
    TAG="cu${CUDA/./}"
    INDEX="https://download.pytorch.org/whl/$TAG"
    TORCH_SPEC="torch==$TORCH+$TAG"
    CORE="core_cu${CUDA%%.*}"  # Transformer Engine's core library for this CUDA major version
    # DeepSpeed's fused Adam is compiled now only where a CUDA compiler is; elsewhere its ops stay JIT-built
    # on first use (which needs nvcc on the nodes), as on the CPU path.
    if [[ -n "$NVCC" ]]; then DS_ENV="DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1"; else DS_ENV="DS_BUILD_OPS=0"; fi
    COMMANDS=(
        "pip install '$TORCH_SPEC' --index-url $INDEX --extra-index-url https://pypi.org/simple"
        "$DS_ENV pip install --no-build-isolation 'deepspeed==$DEEPSPEED'"
        "pip install -e '$ROOT[test]'"
    )
    [[ $WITH_TE == 1 ]] && COMMANDS+=("pip install --no-build-isolation 'transformer_engine[pytorch,$CORE]==$TE_VERSION'")
    [[ $WITH_APEX == 1 ]] && COMMANDS+=("APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation 'apex @ git+https://github.com/NVIDIA/apex.git@$APEX_REF'")
    MODE="cuda $CUDA"
    [[ $WITH_TE == 1 ]] && MODE="$MODE te"
    [[ $WITH_APEX == 1 ]] && MODE="$MODE apex"
else
    COMMANDS=(
        "pip install 'torch==$TORCH'"
        "DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed==$DEEPSPEED'"
        "pip install -e '$ROOT[test]'"
    )
fi

if [[ $DRY_RUN == 1 ]]; then
    echo "venv: $VENV"
    if [[ -n "$CUDA" ]]; then
        echo "torch: $TORCH_SPEC (CUDA $CUDA) from $INDEX"
        echo "nvcc: ${NVCC:-not found (DeepSpeed ops are JIT-built on first use; --te and --apex need it)}"
        [[ $WITH_TE == 1 ]] && echo "transformer-engine: $TE_VERSION ($CORE)"
        [[ $WITH_APEX == 1 ]] && echo "apex: git $APEX_REF"
    else
        echo "torch: torch==$TORCH (CPU build)"
    fi
    echo "deepspeed: $DEEPSPEED"
    printf 'run: %s\n' "${COMMANDS[@]}"
    exit 0
fi
if [[ -n "$CUDA" && -z "$NVCC" && ( $WITH_TE == 1 || $WITH_APEX == 1 ) ]]; then
    die "--te/--apex compile CUDA code, but nvcc is not on PATH (nor in \$CUDA_HOME/bin); load the CUDA $CUDA toolkit first"
fi

STAMP="$VENV/.megacrystal-stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/launch/setup_env.sh" | sha256sum | cut -d' ' -f1)"
[[ -n "$CUDA" ]] && WANT="$WANT $MODE"  # the CPU stamp stays the bare hash
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi

echo "[setup] creating virtualenv at $VENV${CUDA:+ (torch for CUDA $CUDA)}" >&2
# A venv built for another torch (CPU <-> CUDA, another CUDA, other extras) starts afresh: pip keeps an installed
# torch 2.13.0 whatever its build. Same kind, new setup.py: installed over, as always.
CLEAR=()
if [[ -f "$STAMP" ]]; then
    OLD="$(cat "$STAMP")"
    [[ "${OLD#* }" == "$OLD" ]] && OLD_MODE="" || OLD_MODE="${OLD#* }"
    [[ "$OLD_MODE" != "${MODE:-}" ]] && CLEAR=(--clear)
fi
"$PYTHON" -m venv ${CLEAR[@]+"${CLEAR[@]}"} "$VENV"
if [[ -z "$CUDA" ]]; then
    # The CPU torch goes in first: any later requirement it satisfies installs nothing more, so pip never
    # resolves a multi-GB CUDA build of torch.
    "${PIP[@]}" install "torch==$TORCH" 2> >(grep -v "is ignored: it is neither" >&2)
    # DeepSpeed ships only an sdist whose setup.py imports torch: build it against the CPU torch above, with
    # no C++ ops compiled at install time (megacrystal needs none).
    DS_BUILD_OPS=0 "${PIP[@]}" install --no-build-isolation "deepspeed==$DEEPSPEED" 2> >(grep -v "is ignored: it is neither" >&2)
    "${PIP[@]}" install -e "$ROOT[test]" 2> >(grep -v "is ignored: it is neither" >&2)
    "$VENV/bin/python" -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'" \
        || { echo "[setup] error: a CUDA build of torch was installed; remove $VENV and retry" >&2; exit 1; }
else
    # The exact local version (+cuXYZ) from the PyTorch index: the same torch as the CPU path, built for CUDA.
    "${PIP[@]}" install "$TORCH_SPEC" --index-url "$INDEX" --extra-index-url https://pypi.org/simple
    env $DS_ENV "${PIP[@]}" install --no-build-isolation "deepspeed==$DEEPSPEED"
    "${PIP[@]}" install -e "$ROOT[test]"
    if [[ $WITH_TE == 1 ]]; then
        "${PIP[@]}" install --no-build-isolation "transformer_engine[pytorch,$CORE]==$TE_VERSION"
    fi
    if [[ $WITH_APEX == 1 ]]; then
        APEX_CPP_EXT=1 APEX_CUDA_EXT=1 "${PIP[@]}" install -v --no-build-isolation \
            "apex @ git+https://github.com/NVIDIA/apex.git@$APEX_REF"
    fi
    "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda != '$CUDA')" \
        || { echo "[setup] error: the installed torch is not the CUDA $CUDA build; remove $VENV and retry" >&2; exit 1; }
fi
echo "$WANT" > "$STAMP"
echo "[setup] done" >&2
