#!/usr/bin/env bash
# The first run of fastlm on a GPU, in stages that each fit one call of at most 6 minutes on
# one H100 (a GPU window here is 15 minutes in all, at most 10 per command, 8 files back).
# Run them in order; each is useful alone and writes its results as it goes:
#
#   bash bench/gpu_check.sh --stage a --out DIR   # build for this GPU, gpu_subset tests vs the
#                                                 # reference, compute-sanitizer, other cuda tests
#   bash bench/gpu_check.sh --stage b --out DIR   # kernel benches vs peers + DISPATCH proposal
#   bash bench/gpu_check.sh --stage c --out DIR   # fastlm.profile gpt2-124m / llama-125m
#   bash bench/gpu_check.sh --stage a --smoke --out DIR   # the same plumbing on a CPU, tiny
#   bash bench/gpu_check.sh --out DIR             # a, b and c one after the other
#
# All stages together write at most 7 files into DIR (summary.json, summary.md, a.log, b.log,
# c.log, b.json, c.json; see bench/gpu_check_stage.py), so one folder can come back from every
# call. Each stage stops its steps before its budget (STAGE_BUDGET, default 330 s) and writes the
# summary even when a step was cut off. Works offline: nothing is downloaded.
# Knobs: STAGE_BUDGET, MAX_JOBS (build; default all cores), BENCH_BUDGET (seconds per bench row,
# default 0.2), GPU_CHECK_OPS (stage b's ops), PROFILE_PRESETS, PROFILE_STEPS (default 20),
# GPU_CHECK_SMOKE_K (the smoke run's pytest -k), PYTHON.
# Exit status: 0 when every step passed, 1 when a step failed or was cut off, 2 on bad usage.
set -uo pipefail

usage() {
    echo "usage: bash bench/gpu_check.sh [--stage a|b|c] [--out DIR] [--smoke] [--budget S]" >&2
    exit 2
}
cd "$(dirname "$0")/.."
STAGES=(a b c)
OUT=/tmp/fastlm-gpu-check
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --stage) [[ $# -ge 2 && "$2" =~ ^[abc]$ ]] || usage; STAGES=("$2"); shift 2 ;;
        --out) [[ $# -ge 2 && -n "$2" ]] || usage; OUT=$2; shift 2 ;;
        --smoke) EXTRA+=(--smoke); shift ;;
        --budget) [[ $# -ge 2 ]] || usage; EXTRA+=(--budget "$2"); shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) usage ;;
    esac
done
PY=${PYTHON:-python}
if [[ " ${EXTRA[*]-} " != *" --smoke "* ]] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi finds no NVIDIA GPU here; on a machine without one run" \
         "'bash bench/gpu_check.sh --stage a --smoke --out DIR' to check the plumbing" >&2
    exit 2
fi
status=0
for stage in "${STAGES[@]}"; do
    "$PY" bench/gpu_check_stage.py --stage "$stage" --out "$OUT" "${EXTRA[@]}" || status=1
done
echo "gpu_check: results in ${OUT} (summary.md first); turn b.json into DISPATCH rows with:"
echo "  python -m fastlm.bench dispatch ${OUT}/b.json --tests ${OUT}/summary.json"
exit $status
