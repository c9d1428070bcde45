"""Prepacked CPU Linear weights (fastlm.packed_linear): the packed matmul equals F.linear in
float32 and stays within bf16's own error, a model's logits and greedy tokens do not change,
and it never serves stale or wrong math (weights changed since packing, autograd, other dtypes)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlm.generate.decode import BatchDecoder, SamplingParams
from fastlm.models.packed_linear import (
    is_packed,
    pack_linears,
    unavailable_reason,
    unpack_linears,
)
from tests.lm_fixtures import tiny_model
from tests.utils import assert_close, assert_lowp_close

pytestmark = pytest.mark.skipif(unavailable_reason(torch.float32) is not None,
                                reason=f"packed linears unavailable: "
                                       f"{unavailable_reason(torch.float32)}")

SHAPES = [(1, 1, 7, 5), (3, 1, 64, 96), (2, 17, 129, 63), (1, 1025, 31, 257)]  # B, T, in, out


@pytest.mark.parametrize("B,T,n_in,n_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_linear_float32(B, T, n_in, n_out, bias):
    lin = nn.Linear(n_in, n_out, bias=bias)
    x = torch.randn(B, T, n_in)
    want = F.linear(x.double(), lin.weight.double(), None if lin.bias is None
                    else lin.bias.double())
    assert pack_linears(lin) == 1 and is_packed(lin)
    with torch.no_grad():
        got = lin(x)
    assert_close(got, want.float(), "packed linear (float32)")


@pytest.mark.parametrize("B,T,n_in,n_out", SHAPES[:3])
def test_packed_linear_bfloat16(B, T, n_in, n_out):
    if unavailable_reason(torch.bfloat16) is not None:
        pytest.skip(unavailable_reason(torch.bfloat16))
    lin = nn.Linear(n_in, n_out).to(torch.bfloat16)
    x = torch.randn(B, T, n_in).to(torch.bfloat16)
    reference = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    torch_lowp = F.linear(x, lin.weight, lin.bias)
    pack_linears(lin)
    with torch.no_grad():
        assert_lowp_close(lin(x), reference, torch_lowp, "packed linear (bfloat16)")


def test_changed_weights_are_repacked_and_grad_falls_back():
    lin = nn.Linear(16, 8)
    pack_linears(lin)
    x = torch.randn(4, 16)
    with torch.no_grad():
        lin.weight.mul_(-2)  # in place: version counter moves
        assert_close(lin(x), F.linear(x, lin.weight, lin.bias), "after an in-place update")
        lin.weight = nn.Parameter(torch.randn(8, 16))  # replaced: new storage
        assert_close(lin(x), F.linear(x, lin.weight, lin.bias), "after replacing the weight")
    y = lin(x)  # grad mode: the plain path, so backward works
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == (8, 16)
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        lin(x.double())  # another dtype: F.linear's own error, as without packing
    assert unpack_linears(lin) == 1 and not is_packed(lin)


def test_model_logits_and_greedy_unchanged():
    for arch in ("gpt2", "llama"):
        model = tiny_model(arch)
        idx = torch.randint(0, 256, (2, 19))
        with torch.no_grad():
            want = model(idx)[0]
        greedy = SamplingParams(max_new_tokens=10, temperature=0)
        ref = BatchDecoder(model, [[1, 2, 3], [9]], greedy)
        while not ref.done:
            ref.step()
        n = pack_linears(model)
        assert n == sum(isinstance(m, nn.Linear) for m in model.modules())
        with torch.no_grad():
            got = model(idx)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        dec = BatchDecoder(model, [[1, 2, 3], [9]], greedy)
        while not dec.done:
            dec.step()
        assert dec.tokens == ref.tokens
        assert model.state_dict().keys() == tiny_model(arch).state_dict().keys()
        unpack_linears(model)


def test_other_dtypes_left_alone():
    lin = nn.Linear(8, 8).to(torch.float16)
    assert pack_linears(lin) == 0 and not is_packed(lin)
    assert "float16" in unavailable_reason(torch.float16)
