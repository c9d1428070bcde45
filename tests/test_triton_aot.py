"""Ahead-of-time checks of the Triton kernels for sm_80 (A100) and sm_90 (H100), without a GPU
(issue 23, items 1 and 4): what the compiled kernels need, read from triton.compile with a
GPUTarget (bench/aot_check.py), and the attention autotuner's shared-memory pruning.

The compiling tests run bench.aot_check in a subprocess: under TRITON_INTERPRET=1 (how tests run
on CPU) the kernels are interpreter functions that cannot be compiled.
"""
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from bench.aot_check import ARCHS
from fastlm.kernels import attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_DIMS = (16, 32, 64, 128, 256)  # padded head dims up to 256 (beyond: pruning may keep none)


def run_aot(code: str):
    """Run `code` (which prints JSON) with bench.aot_check in a fresh interpreter-free Python."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", "import json; from bench import aot_check; "
                          + code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("elsize", [4, 2], ids=["fp32", "16-bit"])
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_attention_keeps_a_config_for_every_head_dim(kernel, elsize, arch):
    """The pruner keeps at least one config for every dtype and head dim on A100 and H100
    (before: fp32 at head dim 129-256 on H100 and 16-bit at 256 on A100 had none)."""
    configs = attention._configs("fwd" if kernel == "fwd" else "bwd", interpret=False)
    for block_d in HEAD_DIMS:
        assert attention.fitting_configs(kernel, configs, block_d, elsize, ARCHS[arch])


def test_attention_no_fitting_config_is_a_clear_error():
    configs = attention._configs("fwd", interpret=False)
    with pytest.raises(RuntimeError, match="no block configuration fits .* head dim 256"):
        attention.fitting_configs("fwd", configs, 256, 4, 48 * 1024)


@pytest.mark.slow
def test_attention_kept_configs_fit_when_compiled():
    """The least config the pruner keeps at head dim 256, compiled for sm_80 and sm_90: its real
    shared memory is at most the estimate, and so within the architecture's limit."""
    rows = run_aot("print(json.dumps(aot_check.check_survivors()))")
    assert len(rows) == 2 * 3 * 2
    bad = [r for r in rows if not r["shared"] <= r["estimate"] <= r["limit"]]
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("dtype, block_v, num_warps", [("bfloat16", 8192, 16),
                                                        ("float32", 2048, 8)])
def test_cross_entropy_fused_kernel_waits_before_overwriting(dtype, block_v, num_warps):
    """In the compiled fused kernel a barrier separates the loss store (which needs x[target])
    from the first gradient store over the row: else another warp may overwrite x[target]
    before it is read. The loss is the kernel's first global store, the gradient its next."""
    ptx = run_aot(f"print(json.dumps(aot_check.cross_entropy_fused_ptx("
                  f"{dtype!r}, {block_v}, {num_warps}, 90)))")
    body = ptx[ptx.index("st.global"):]  # from the loss store
    first_grad_store = re.search(r"\n[^\n]*st\.global", body[len("st.global"):]).start()
    assert "bar.sync" in body[:first_grad_store + len("st.global")], \
        "no barrier between the loss store and the gradient stores"
