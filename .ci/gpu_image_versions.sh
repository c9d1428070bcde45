#!/usr/bin/env bash
# The GPU image's versions on this CPU machine: Python 3.12, torch 2.11.0 (its CUDA 13.0 build)
# and triton 3.6.0, in a venv of their own. It builds fastlm against them (the C++ kernels and,
# where nvcc exists, the CUDA kernels and their torch glue for sm_90, the H100/H200's arch) and
# runs the Triton interpreter tests, so a kernel or a build that only works with the project's
# own CPU torch fails here, not in a short GPU window.
#
# Cost (measured on the 2-core CI machine, 2026-12-07): torch 2.11 imports only with its CUDA
# libraries (without the nvidia-* wheels it stops at libcudnn.so.9), so the venv holds 4.8 GB
# (2.7 GB of nvidia-* wheels, 1.2 GB of torch); installing it took 2.5 minutes with the wheels
# on local disk (8.4 minutes with the machine loaded 10-19 on its 2 cores), the build with CUDA
# 170 CPU-seconds. The venv is kept between runs and made again only when its versions
# differ (GPU_IMAGE_VENV names it; delete it to start over).
#
#   bash .ci/gpu_image_versions.sh            # venv (if needed), build, Triton tests
#   bash .ci/gpu_image_versions.sh --build    # venv and build only
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
TORCH=2.11.0 TRITON=3.6.0
VENV=${GPU_IMAGE_VENV:-$repo/.ci-gpu-image-venv}
# the image's Python 3.12 where this machine has one (pyenv's shim answers only when selected)
PY=python3
for c in python3.12 "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)"; do
  if [ -n "$c" ] && "$c" -c pass 2>/dev/null; then PY=$c; break; fi
done
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
start=$SECONDS
say() { echo; echo "=== $* ($((SECONDS - start)) s)"; }

say "venv with torch ${TORCH} and triton ${TRITON} (${VENV})"
if ! "$VENV/bin/python" -c "import sys, torch, triton; sys.exit(not (torch.__version__.split('+')[0] \
== '$TORCH' and triton.__version__ == '$TRITON'))" 2>/dev/null; then
  rm -rf "$VENV" && "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH" "triton==$TRITON" numpy pytest hypothesis \
    pybind11 ninja "setuptools>=64" wheel tqdm safetensors matplotlib
fi
"$VENV/bin/python" -c "import sys, torch, triton; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"

say "build against them, in a copy (the checkout's fastlm/_C*.so belong to the main venv's torch)"
src=$(mktemp -d /tmp/fastlm-gpu-image.XXXXXX)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"; done | tar -c --null -T - | tar -x -C "$src"
cd "$src"
# nvcc at /usr/local/bin makes torch guess CUDA_HOME=/usr/local; the toolkit's headers are here
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/include ] && export CUDA_HOME=/usr/local/cuda
# the install bench/gpu_check.sh makes on a GPU (editable: fastlm.kernels and fastlm.bench map to
# kernels/ and bench/ only through it)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$VENV/bin/pip" install -v --no-build-isolation --no-deps -e . > build.log 2>&1 \
  || { tail -40 build.log; exit 1; }
grep '^fastlm: building' build.log || true
"$VENV/bin/python" - <<'PY'
import torch
import fastlm.ops as ops
from fastlm.ops import native
assert "cpu" in ops.available_backends("layer_norm", "cpu"), native.cpu_unavailable_reason(
    torch.device("cpu"))
cuda = "built" if torch.version.cuda and native.cuda_unavailable_reason(
    torch.device("cuda")) is None else native.cuda_unavailable_reason(torch.device("cuda"))
print("fastlm built against torch", torch.__version__, "- C++ CPU kernels load; CUDA kernels:",
      cuda)
PY
[ "${1:-}" = "--build" ] && exit 0

say "Triton interpreter tests under triton ${TRITON} and torch ${TORCH}"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" -k triton \
  tests/test_layer_norm.py tests/test_rms_norm.py tests/test_cross_entropy.py \
  tests/test_attention.py tests/test_adamw_step.py tests/test_linear_cross_entropy.py \
  tests/test_triton_launch.py
say "done"
