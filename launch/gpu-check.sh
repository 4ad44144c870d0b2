#!/usr/bin/env bash
# Check megacrystal's GPU path on a CUDA machine (one GPU is enough; more are used), and report what it measured.
#
#   bash launch/gpu-check.sh            after: bash launch/setup_env.sh --cuda [--te] [--apex]
#
# 1. the environment: torch and its CUDA/NCCL, the GPUs, megatron-core, DeepSpeed, Transformer Engine, apex;
# 2. the CUDA parity tests (tests/gpu, marked `cuda`): every tp/pp/dp layout that fits the GPUs gives the
#    single-GPU losses, fused kernels the torch path's, bf16 tracks fp32 within the CPU tests' tolerance;
# 3. `megacrystal bench` sweeps of the tiny and small configs (fp32 and bf16, 1 GPU and all of them);
# 4. a report in docs/benchmarks/gpu-<date>/ (README.md: tokens/s, MFU against the GPU's dense bf16/fp32 peak,
#    peak memory; the bench reports and logs beside it).
# Without a CUDA GPU it says so in one line and exits 0, having run nothing. A failed step is reported as failed
# and the script exits 1; nothing is skipped silently.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${MEGACRYSTAL_PYTHON:-$ROOT/.venv/bin/python}"
STEPS="${MEGACRYSTAL_GPU_CHECK_STEPS:-30}"

gpus_by_driver() {  # GPUs the NVIDIA driver lists (0 without nvidia-smi)
    local listed=0
    command -v nvidia-smi >/dev/null && listed=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
    echo "${listed:-0}"
}

if [[ ! -x "$PY" ]]; then
    if [[ "$(gpus_by_driver)" -gt 0 ]]; then
        echo "gpu-check: error: no env at $PY; build it with bash launch/setup_env.sh --cuda" >&2
        exit 1
    fi
    echo "gpu-check: no CUDA GPU on this machine (no nvidia-smi GPUs, no env to ask); nothing run"
    exit 0
fi
PROBE="$("$PY" -c 'import torch
print(torch.__version__, torch.version.cuda, int(torch.cuda.is_available()), torch.cuda.device_count())' 2>&1)" \
    || { echo "gpu-check: error: $PY cannot import torch: ${PROBE##*$'\n'}" >&2; exit 1; }
read -r TORCH_VERSION TORCH_CUDA CUDA_OK GPUS <<<"$PROBE"
if [[ "$CUDA_OK" != 1 ]]; then
    if [[ "$(gpus_by_driver)" -gt 0 ]]; then
        echo "gpu-check: error: this machine has GPUs but torch $TORCH_VERSION (CUDA build: $TORCH_CUDA) cannot" \
             "use them; rebuild the env with bash launch/setup_env.sh --cuda, or check the driver" >&2
        exit 1
    fi
    echo "gpu-check: no CUDA GPU here (torch $TORCH_VERSION, CUDA build: $TORCH_CUDA, 0 GPUs visible); nothing run"
    exit 0
fi

DATE="$(date -u +%Y-%m-%d)"
OUT="${MEGACRYSTAL_GPU_CHECK_OUT:-$ROOT/docs/benchmarks/gpu-$DATE}"
mkdir -p "$OUT"
cd "$ROOT" || exit 1
# megatron-core overlaps tensor-parallel communication with compute only if kernels run in launch order
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
log() { printf '[gpu-check %s] %s\n' "$(date -u +%T)" "$*"; }
STATUS=()  # "step: ok|FAILED (log)" lines for the report
run_step() {  # run_step NAME LOGFILE COMMAND...: run, keep its output, record the outcome
    local name="$1" logfile="$2"; shift 2
    log "$name: $*"
    if "$@" >"$logfile" 2>&1; then STATUS+=("$name: ok"); log "$name: ok"
    else STATUS+=("$name: FAILED (exit $?, see $(basename "$logfile"))"); log "$name: FAILED, see $logfile"; fi
}

log "$GPUS GPU(s), torch $TORCH_VERSION (CUDA $TORCH_CUDA); report in $OUT"
run_step environment "$OUT/environment.log" "$PY" - "$OUT/environment.json" <<'EOF'
import importlib, json, sys
import torch
nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None  # a tuple, or an int in old torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
       "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
       "bf16_supported": torch.cuda.is_bf16_supported(),
       "gpus": [{"name": torch.cuda.get_device_name(i), "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                 "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                for i in range(torch.cuda.device_count())]}
for name, module in (("megatron_core", "megatron.core"), ("deepspeed", "deepspeed"),
                     ("transformer_engine", "transformer_engine.pytorch"), ("apex", "apex"),
                     ("apex_fused_layer_norm", "fused_layer_norm_cuda"), ("flash_attn", "flash_attn")):
    try:
        mod = importlib.import_module(module)
        top = importlib.import_module(module.split(".")[0])
        env[name] = getattr(mod, "__version__", None) or getattr(top, "__version__", None) or "importable"
    except Exception as error:  # an optional extra: absent is a fact to report, not a failure
        env[name] = f"not importable ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
if not env["nccl"]:
    sys.exit("this torch has no NCCL")
EOF
cat "$OUT/environment.log"

run_step "parity tests (tests/gpu)" "$OUT/parity.log" \
    "$PY" -m pytest tests/gpu -m cuda -q -rs -p no:cacheprovider --junitxml="$OUT/parity.xml"

SWEEP="precision=fp32,bf16;dp=1"
[[ "$GPUS" -gt 1 ]] && SWEEP="precision=fp32,bf16;dp=1,$GPUS"
for size in tiny small; do
    run_step "bench $size" "$OUT/bench-$size.log" "$PY" -m megacrystal bench --config "configs/crystal-$size.yaml" \
        --sweep "$SWEEP" --steps "$STEPS" --warmup 10 --out "$OUT/bench-$size"
done

# The summary: every measured point of the bench reports, with the outcome of each step above.
"$PY" - "$OUT" "${STATUS[@]}" <<'EOF'
import json, os, sys
from pathlib import Path
out, status = Path(sys.argv[1]), sys.argv[2:]
env = json.loads((out / "environment.json").read_text()) if (out / "environment.json").exists() else {}
lines = [f"# GPU check, {out.name[4:]}", "", "Written by `bash launch/gpu-check.sh` (no numbers edited by hand).", "",
         "## Outcome", "", *[f"- {s}" for s in status], "", "## Environment", "",
         "| item | value |", "| --- | --- |"]
for key, value in env.items():
    lines.append(f"| {key} | {json.dumps(value) if isinstance(value, list) else value} |")
lines += ["", "## Throughput (megacrystal bench)", "",
          "MFU is against the GPU's dense peak for the point's precision (megacrystal/bench/peaks.py; n/a where the "
          "GPU is not in the table). Memory: torch.cuda.max_memory_allocated of rank 0.", "",
          "| config | point | GPUs | tokens/s | tokens/s per GPU | MFU | peak TFLOP/s | peak memory (MiB) | loss (last 10) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for size in ("tiny", "small"):
    path = out / f"bench-{size}" / "report.json"
    if not path.exists():
        lines.append(f"| {size} | (no report: the bench failed, see bench-{size}.log) | | | | | | | |")
        continue
    for p in json.loads(path.read_text())["points"]:
        m = p["measured"]
        mfu = f"{100 * p['mfu']:.1f}%" if p.get("mfu") is not None else "n/a"
        peak = f"{p['peak_tflops_per_device']:.4g}" if p.get("peak_tflops_per_device") else "n/a"
        lines.append(f"| {size} | {p['name']} | {p['world_size']} | {p['tokens_per_s']:,.0f} | "
                     f"{p['tokens_per_s_per_device']:,.0f} | {mfu} | {peak} | {m.get('memory_mb') or 0:,.0f} | "
                     f"{m['loss_tail_mean']:.4f} |")
lines += ["", "Details: bench-tiny/report.md, bench-small/report.md (with plots), parity.log, environment.json.", ""]
tmp = out / "README.md.tmp"
tmp.write_text("\n".join(lines))
os.replace(tmp, out / "README.md")
EOF
log "report: $OUT/README.md"
for line in "${STATUS[@]}"; do
    [[ "$line" == *FAILED* ]] && { log "some steps failed (above); the report says which"; exit 1; }
done
log "all steps passed"
