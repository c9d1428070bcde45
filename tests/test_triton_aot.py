"""Ahead-of-time checks of the GPU kernels for sm_80 (A100) and sm_90 (H100), without a GPU
(fastlm.bench.aot_check): the attention pruner's promises, the CI verdict on synthetic results,
the ptxas parser, and real compiles.

The compiling tests run in a subprocess: under TRITON_INTERPRET=1 (how tests run on CPU) the
kernels are interpreter functions that cannot be compiled.
"""
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from fastlm.bench import aot_check
from fastlm.bench.aot import check, table
from fastlm.bench.aot.capture import ARCHS
from fastlm.bench.aot.compile import Resources, parse_ptxas
from fastlm.kernels import attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_DIMS = (16, 32, 64, 128, 256)  # every padded head dim the attention accepts
KERNELS = ("fwd", "dkdv", "dq")


def run_aot(code: str):
    """Run `code` (which prints JSON last) in a fresh Python without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("elsize", [4, 2], ids=["fp32", "16-bit"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_attention_keeps_a_config_for_every_head_dim(kernel, elsize, arch):
    """For every dtype and padded head dim on A100 and H100 the pruner keeps a config that fits
    shared memory and whose measured bound says it does not spill."""
    configs = attention._configs(kernel, interpret=False)
    for block_d in HEAD_DIMS:
        kept = attention.kept_configs(kernel, configs, block_d, elsize, ARCHS[arch])
        assert kept
        for c in kept:
            assert attention.runs_without_spilling(kernel, c, block_d, elsize)
            assert attention.shared_memory_need(kernel, c, block_d, elsize) <= ARCHS[arch]


@pytest.mark.parametrize("kernel", KERNELS)
def test_attention_keeps_big_tiles_for_16_bit_at_common_head_dims(kernel):
    """Not everything tiny: at head dims 64 and 128 with 16-bit inputs several configs of at
    least 32 x 64 tiles survive on both architectures."""
    configs = attention._configs(kernel, interpret=False)
    for arch in ARCHS:
        for block_d in (64, 128):
            kept = attention.kept_configs(kernel, configs, block_d, 2, ARCHS[arch])
            big = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 32 * 64]
            assert len(big) >= 2, (arch, block_d, kept)


def test_attention_float32_gets_only_small_tiles():
    """float32 takes the ieee FMA path (operands in registers): no tile above 512 scores."""
    for kernel in KERNELS:
        for c in attention._configs(kernel, interpret=False):
            if any(attention.runs_without_spilling(kernel, c, d, 4) for d in HEAD_DIMS):
                assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 1024, c


def test_attention_no_fitting_config_is_a_clear_error():
    configs = attention._configs("fwd", interpret=False)
    with pytest.raises(RuntimeError, match="no block configuration fits .* head dim 256"):
        attention.kept_configs("fwd", configs, 256, 2, 16 * 1024)


@pytest.mark.parametrize("shared, spill, error, pruned, status", [
    (1024, 0, None, False, check.OK),
    (1024, 8, None, False, check.SPILL),             # a register spill fails
    (ARCHS[80] + 1, 0, None, False, check.OVER),     # one byte over the A100's limit fails
    (ARCHS[80], 0, None, False, check.OK),           # exactly the limit fits
    (None, None, "CompilationError: x", False, check.ERROR),
    (10 ** 6, 4096, None, True, check.PRUNED),       # what the pruner drops never fails
])
def test_verdict(shared, spill, error, pruned, status):
    assert check.verdict(80, shared, spill, error, pruned) == status
    assert bool(check.failures([{"status": status}])) == (status in check.FAILING)


def _fake_rows(resources: dict) -> list[dict]:
    return [table.make_row(arch, {"kernel": name, "dtype": "bf16", "config": "BLOCK=1",
                                  "num_warps": 4, "num_stages": 3}, res, pruned=False,
                           seconds=0.0) for (name, arch), res in resources.items()]


@pytest.mark.parametrize("bad, expect", [(None, 0), (Resources(1024, 255, 16, 16), 1),
                                         (Resources(ARCHS[90] + 1024, 64, 0, 0), 1),
                                         ("CompilationError: out of resources", 1)])
def test_ci_exit_status_and_files(bad, expect, tmp_path, monkeypatch):
    """aot_check.run on synthetic compile results: exit 1 exactly when a launchable config
    spills, exceeds shared memory or fails to compile; the table files are written either way."""
    good = Resources(4096, 64, 0, 0)
    results = {("k1", 80): good, ("k1", 90): good, ("k2", 90): bad or good}
    monkeypatch.setattr(table, "triton_table", lambda *a, **k: _fake_rows(results))
    status = aot_check.run(str(tmp_path), False, 2, ("attention",), cuda=False)
    assert status == expect
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failures"] == expect
    rows = json.loads((tmp_path / "triton.json").read_text())
    assert len(rows) == 3
    assert ("## Failing" in (tmp_path / "triton.md").read_text()) == bool(expect)


NVCC_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 6144 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 3.1 ms
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, 352 bytes cmem[0]
"""


def test_parse_ptxas():
    assert parse_ptxas(NVCC_SAMPLE) == [("_Z3fooPf", 255, 8, 8, 6144), ("_Z3barv", 32, 0, 0, 0)]
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        parse_ptxas("ptxas fatal   : Unresolved extern function")


@pytest.mark.slow
def test_real_compile_of_recorded_launches():
    """An adamw launch its launcher makes and the largest bf16 attention forward tile the
    pruner keeps at head dim 128 on both archs, recorded and compiled for sm_80 and sm_90:
    registers read, shared memory within the limit, no spill."""
    rows = run_aot("""
from fastlm.bench.aot import table, compile as c
r = table.record(("adamw_step", "attention"))
adamw = next(l for l in r.launches if l.kernel.endswith("_adamw_kernel"))
fwd = [l for l in r.launches if l.kernel.endswith("_attention_fwd_kernel")
       and dict(l.signature)["q_ptr"] == "*bf16" and table.constexprs(l)["BLOCK_D"] == 128
       and not r.pruned.get(l)]
big = max(fwd, key=lambda l: table.constexprs(l)["BLOCK_M"] * table.constexprs(l)["BLOCK_N"])
print(json.dumps([[l.kernel, a, c.compile_launch(l, a)] for l in (adamw, big) for a in (80, 90)]))
""")
    assert len(rows) == 4
    for kernel, arch, (shared, regs, spill, _stack) in rows:
        assert 0 < regs <= 255 and spill == 0 and shared <= ARCHS[arch], (kernel, arch)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, block_v, num_warps", [("bfloat16", 8192, 16),
                                                        ("float32", 2048, 8)])
def test_cross_entropy_fused_kernel_waits_before_overwriting(dtype, block_v, num_warps):
    """In the compiled fused kernel a barrier separates the loss store (which needs x[target])
    from the first gradient store over the row: else another warp may overwrite x[target]
    before it is read. The loss is the kernel's first global store, the gradient its next."""
    ptx = run_aot(f"from fastlm.bench import aot_check\n"
                  f"print(json.dumps(aot_check.cross_entropy_fused_ptx("
                  f"{dtype!r}, {block_v}, {num_warps}, 90)))")
    body = ptx[ptx.index("st.global"):]  # from the loss store
    first_grad_store = re.search(r"\n[^\n]*st\.global", body[len("st.global"):]).start()
    assert "bar.sync" in body[:first_grad_store + len("st.global")], \
        "no barrier between the loss store and the gradient stores"


def test_results_report_summarises_the_aot_check(tmp_path, monkeypatch):
    """bench/RESULTS.md gets the AOT summary as its own section, not as a device folder."""
    from fastlm.bench import report

    monkeypatch.setattr(table, "triton_table", lambda *a, **k: _fake_rows(
        {("k1", 80): Resources(4096, 64, 0, 0), ("k1", 90): Resources(4096, 64, 8, 8)}))
    assert aot_check.run(str(tmp_path / "aot"), False, 2, ("attention",), cuda=False) == 1
    text = report.build(str(tmp_path))
    assert "## Ahead-of-time resource check" in text and "## aot" not in text
    assert "Triton: 2 kernel configurations (1 SPILL, 1 ok)" in text
    assert "failing (a config a launcher can pick" in text and ": 1" in text


def test_only_ci_mode_fails_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(aot_check, "run", lambda *a, **k: 1)  # a failing check
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert aot_check.main(["--ci", "--out", str(tmp_path)]) == 1
    assert aot_check.main(["--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit):
        aot_check.main(["--ops", "nonsense"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit):
        aot_check.main(["--ci"])
