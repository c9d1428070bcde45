#!/usr/bin/env bash
# One call on a GPU machine: build fastlm with CUDA, run the cuda-marked tests, the kernel
# benchmark suite and the training profiler at two presets, and write every JSON result under
# bench/results/<gpu-name>/ (then regenerate bench/RESULTS.md). Works offline: nothing is
# downloaded (the image must already hold torch, triton, pybind11, ninja, pytest).
#
#   bash bench/gpu_check.sh            # everything (about 15-25 minutes on an H100)
#   bash bench/gpu_check.sh --smoke    # plumbing check on any machine: no build, CPU, tiny sizes,
#                                      # results in a temporary folder
#
# Environment knobs: BENCH_SIZES (default large), BENCH_BUDGET (seconds per row, default 0.5),
# BENCH_OPS (default: every kernel op), PROFILE_PRESETS (default "gpt2-124m llama-125m"),
# PROFILE_STEPS (default 20), PROFILE_COMPILE (1 = also profile with --compile; default 1),
# TRACE_DIR (Chrome traces; default /tmp/fastlm-traces: they are large, do not commit them),
# MAX_JOBS (parallel compile jobs; default: all cores).
# Every step runs even when an earlier one failed; the exit status is 1 if any step failed, and
# the summary at the end names the failed steps and their logs.
set -uo pipefail

cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PY=${PYTHON:-python}
STAMP=$(date -u +%Y%m%d-%H%M%S)
FAILED=()

step() {  # step NAME LOG COMMAND...: run, tee the output to LOG, remember a failure
    local name=$1 log=$2
    shift 2
    echo
    echo "=== ${name}: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== ${name}: exit ${rc} after $((SECONDS - t0)) s (log ${log})"
    [[ $rc -eq 0 ]] || FAILED+=("${name} (exit ${rc}, log ${log})")
}

if [[ $SMOKE -eq 1 ]]; then
    DEVICE=cpu
    OUT=$(mktemp -d /tmp/fastlm-gpu-check-smoke.XXXXXX)/cpu-smoke
    SIZES=${BENCH_SIZES:-64x32}
    OPS=${BENCH_OPS:-layer_norm,rms_norm}
    BUDGET=${BENCH_BUDGET:-0.02}
    PRESETS=${PROFILE_PRESETS:-"tiny tiny-llama"}
    STEPS=${PROFILE_STEPS:-2}
    COMPILE=${PROFILE_COMPILE:-0}
else
    DEVICE=cuda
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
        echo "gpu_check: nvidia-smi finds no NVIDIA GPU here; on a machine without one run" \
             "'bash bench/gpu_check.sh --smoke' to check the plumbing" >&2
        exit 2
    fi
    nvidia-smi
    # Build first: the results folder name comes from torch, which the build does not change.
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    mkdir -p /tmp/fastlm-gpu-check
    BUILD_LOG=/tmp/fastlm-gpu-check/build-${STAMP}.log
    step build "$BUILD_LOG" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch sees no CUDA GPU (a CPU-only torch build?): $("$PY" -c \
             'import torch; print(torch.__version__)')" >&2
        exit 2
    fi
    SLUG=$("$PY" -c "import torch; from fastlm.bench.utils import device_slug; \
print(device_slug(torch.device('cuda')))")
    OUT=bench/results/${SLUG}
    SIZES=${BENCH_SIZES:-large}
    OPS=${BENCH_OPS:-}
    BUDGET=${BENCH_BUDGET:-0.5}
    PRESETS=${PROFILE_PRESETS:-"gpt2-124m llama-125m"}
    STEPS=${PROFILE_STEPS:-20}
    COMPILE=${PROFILE_COMPILE:-1}
fi
mkdir -p "$OUT/logs"
[[ -n "${BUILD_LOG:-}" ]] && cp "$BUILD_LOG" "$OUT/logs/"
TRACES=${TRACE_DIR:-/tmp/fastlm-traces}
mkdir -p "$TRACES"
echo "gpu_check: results in ${OUT}, traces in ${TRACES}"

"$PY" - "$OUT/environment-${STAMP}.json" "$DEVICE" <<'EOF'
import json, sys, torch
from fastlm.bench import utils
from fastlm import nvml
env = utils.environment(torch.device(sys.argv[2]))
env["nvml"] = None
if nvml.unavailable_reason() is None:
    env["nvml"] = nvml.device_info()
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
EOF

if [[ $SMOKE -eq 0 ]]; then
    step "cuda tests" "$OUT/logs/pytest-cuda-${STAMP}.log" \
        "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/logs/pytest-cuda-${STAMP}.xml" tests/
fi

OPS_ARG=()
[[ -n "$OPS" ]] && OPS_ARG=(--ops "$OPS")
step "kernel benchmarks" "$OUT/logs/bench-${STAMP}.log" \
    "$PY" -m fastlm.bench "${OPS_ARG[@]}" --device "$DEVICE" --sizes "$SIZES" \
    --budget "$BUDGET" --json "$OUT/kernels-${SIZES}-${STAMP}.json" --plot "$OUT/plots"

for preset in $PRESETS; do
    step "profile ${preset}" "$OUT/logs/profile-${preset}-${STAMP}.log" \
        "$PY" -m fastlm.profile --preset "$preset" --device "$DEVICE" --steps "$STEPS" \
        --json "$OUT/profile-${preset}-${STAMP}.json" --trace "$TRACES/${preset}-${STAMP}.json"
    if [[ "$COMPILE" == 1 ]]; then
        step "profile ${preset} --compile" "$OUT/logs/profile-${preset}-compile-${STAMP}.log" \
            "$PY" -m fastlm.profile --preset "$preset" --device "$DEVICE" --steps "$STEPS" \
            --compile --json "$OUT/profile-${preset}-compile-${STAMP}.json"
    fi
done

if [[ $SMOKE -eq 0 ]]; then
    step "RESULTS.md" "$OUT/logs/report-${STAMP}.log" "$PY" -m fastlm.bench report
else
    step "report" "$OUT/logs/report-${STAMP}.log" \
        "$PY" -m fastlm.bench report --results "$(dirname "$OUT")" --out "$OUT/RESULTS.md"
fi

echo
echo "gpu_check: JSON written under ${OUT}:"
ls -1 "$OUT"/*.json
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "gpu_check: FAILED steps:"
    printf '  %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu_check: all steps passed. Commit ${OUT}/*.json and bench/RESULTS.md (not the logs' build"
echo "output if you prefer; the traces stay in ${TRACES})."
