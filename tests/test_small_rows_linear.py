"""fastlm::small_rows_linear, the C++ CPU product of decode steps (a few rows of x times a
row-major weight): equal to F.linear in float32, within 2x torch's own bfloat16 error, on
awkward shapes (K not a multiple of the 16-float step, odd N, more rows than one pass takes),
with a clear error for bad input; and the packed Linear of a decoding model takes it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlm.models import packed_linear
from tests.utils import assert_close, assert_lowp_close, cpu_has_avx512_bf16, require_backend

CASES = [(1, 1, 1), (1, 7, 5), (2, 8, 3), (3, 15, 33), (4, 16, 1031), (5, 17, 9), (9, 771, 257),
         (1, 768, 2304), (0, 8, 4)]  # (M rows of x, K, N)


@pytest.fixture(autouse=True)
def _native():
    require_backend("layer_norm", "cpu", torch.device("cpu"))  # fastlm._C built and loaded


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,K,N", CASES, ids=str)
def test_float32_equals_linear(M, K, N, bias):
    x, w = torch.randn(M, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    got = torch.ops.fastlm.small_rows_linear(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (M, N) and got.is_contiguous()
    assert_close(got, F.linear(x.double(), w.double(), None if b is None else b.double()),
                 "small_rows_linear (float32 vs float64)", dtype=torch.float32)


# "default": vdpbf16ps where the CPU has AVX512-BF16, else the widening path; "widening": the
# widening path everywhere (FASTLM_NO_AVX512BF16=1), so an AVX512-BF16 machine tests both.
@pytest.mark.parametrize("path", ["default", "widening"])
@pytest.mark.parametrize("M,K,N", CASES, ids=str)
def test_bfloat16_within_torchs_own_error(M, K, N, path, monkeypatch):
    if path == "widening":
        monkeypatch.setenv("FASTLM_NO_AVX512BF16", "1")
    x, w, b = (torch.randn(*s).bfloat16() for s in ((M, K), (N, K), (N,)))
    got = torch.ops.fastlm.small_rows_linear(x, w, b)
    assert got.dtype == torch.bfloat16
    reference = F.linear(x.double(), w.double(), b.double())
    assert_lowp_close(got, reference, F.linear(x, w, b), "small_rows_linear (bfloat16)")


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")
def test_bfloat16_runs_the_dot_product_instruction_where_the_cpu_has_it(monkeypatch):
    """vdpbf16ps reads denormal inputs as zero (its documented DAZ), the widening path does not:
    a denormal x tells which one ran, so the dispatch to the instruction cannot silently rot."""
    monkeypatch.delenv("FASTLM_NO_AVX512BF16", raising=False)  # the default path first
    x, w = torch.full((1, 40), 1e-39).bfloat16(), torch.ones(3, 40).bfloat16()
    assert x.float().abs().min() > 0  # representable as a bf16 denormal
    op = torch.ops.fastlm.small_rows_linear
    assert torch.equal(op(x, w, None), torch.zeros(1, 3, dtype=torch.bfloat16))
    monkeypatch.setenv("FASTLM_NO_AVX512BF16", "1")
    assert (op(x, w, None).float() > 0).all()


def test_strided_inputs_and_empty_k():
    x = torch.randn(3, 40)[:, ::2]  # (3, 20), not contiguous
    w = torch.randn(20, 11).t()  # (11, 20), transposed
    assert_close(torch.ops.fastlm.small_rows_linear(x, w, None), F.linear(x, w),
                 "strided x and weight")
    b = torch.randn(6)
    assert torch.equal(torch.ops.fastlm.small_rows_linear(torch.randn(2, 0), torch.randn(6, 0), b),
                       b.expand(2, 6))


def test_bad_input_is_a_clear_error():
    op = torch.ops.fastlm.small_rows_linear
    with pytest.raises(RuntimeError, match="must share a dtype"):
        op(torch.randn(1, 8), torch.randn(4, 8).bfloat16(), None)
    with pytest.raises(RuntimeError, match=r"x must be \(M, K\) and weight \(N, K\)"):
        op(torch.randn(1, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match=r"bias must be \(N,\)"):
        op(torch.randn(1, 8), torch.randn(4, 8), torch.randn(5))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(torch.randn(1, 8).half(), torch.randn(4, 8).half(), None)


def test_fake_kernel_shapes():
    torch.library.opcheck(torch.ops.fastlm.small_rows_linear.default,
                          (torch.randn(3, 17), torch.randn(5, 17), torch.randn(5)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_linear_takes_it_for_decode_rows_only(monkeypatch, dtype):
    calls = []
    real = torch.ops.fastlm.small_rows_linear
    monkeypatch.setattr(packed_linear, "_small_rows_op",
                        lambda: lambda *a: calls.append(a[0].shape) or real(*a))
    lin = nn.Linear(24, 10).to(dtype)
    assert packed_linear.pack_linears(lin) == 1  # also where oneDNN cannot pack bfloat16
    with torch.no_grad():
        for shape in [(1, 1, 24), (4, 1, 24), (2, 2, 24), (8, 1, 24), (1, 5, 24)]:
            x = torch.randn(*shape).to(dtype)
            got, want = lin(x), F.linear(x.double(), lin.weight.double(), lin.bias.double())
            if dtype == torch.float32:
                assert_close(got, want, f"packed linear {shape}", dtype=torch.float32)
            else:
                assert_lowp_close(got, want, F.linear(x, lin.weight, lin.bias), f"{shape}")
    assert calls == [(1, 24), (4, 24), (4, 24)]  # rows <= SMALL_ROWS only
