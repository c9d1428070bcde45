"""torch.library glue shared by every native backend of an op: fake (meta) kernels and autograd.

The C++ ops (fastlm::<op>_fwd / _bwd, CPU and CUDA kernels) and the Triton ops
(fastlm::<op>_fwd_triton / _bwd_triton) have the same schemas, so one fake kernel and one autograd
formula per op serve both: `register_<op>(fwd_name, bwd_name)` attaches them to a pair of ops.
The backward is itself an op, so torch.compile(fullgraph=True) traces through training steps.
"""
from __future__ import annotations

import torch


def _row_stats(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# layer_norm: fwd(x, weight, bias?, eps) -> (y, mean, rstd); bwd(dy, x, weight, mean, rstd,
# has_bias) -> (dx, dweight, dbias), dbias empty when has_bias is False.
def register_layer_norm(fwd: str, bwd: str) -> None:
    @torch.library.register_fake(fwd)
    def _fwd_fake(x, weight, bias, eps):
        return torch.empty_like(x), _row_stats(x), _row_stats(x)

    @torch.library.register_fake(bwd)
    def _bwd_fake(dy, x, weight, mean, rstd, has_bias):
        dbias = torch.empty_like(weight) if has_bias else weight.new_empty(0)
        return torch.empty_like(x), torch.empty_like(weight), dbias

    bwd_op = _op(bwd)

    def setup_context(ctx, inputs, output):
        x, weight, bias, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, dy, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = bwd_op(dy, x, weight, mean, rstd, ctx.has_bias)
        return dx, dweight, (dbias.to(ctx.bias_dtype) if ctx.has_bias else None), None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------
# rms_norm: fwd(x, weight, eps) -> (y, rstd); bwd(dy, x, weight, rstd) -> (dx, dweight).
def register_rms_norm(fwd: str, bwd: str) -> None:
    @torch.library.register_fake(fwd)
    def _fwd_fake(x, weight, eps):
        return torch.empty_like(x), _row_stats(x)

    @torch.library.register_fake(bwd)
    def _bwd_fake(dy, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)

    bwd_op = _op(bwd)

    def setup_context(ctx, inputs, output):
        x, weight, _eps = inputs
        _y, rstd = output
        ctx.save_for_backward(x, weight, rstd)

    def backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = bwd_op(dy, x, weight, rstd)
        return dx, dweight, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default
