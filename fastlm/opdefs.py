"""torch.library glue shared by every native backend of an op: fake (meta) kernels and autograd.

The C++ ops (fastlm::<op>_fwd / _bwd, CPU and CUDA kernels) and the Triton ops
(fastlm::<op>_fwd_triton / _bwd_triton) have the same schemas, so one fake kernel and one autograd
formula per op serve both: `register_<op>(fwd_name, bwd_name)` attaches them to a pair of ops.
The backward is itself an op, so torch.compile(fullgraph=True) traces through training steps.
Fake outputs are contiguous (x.new_empty(x.shape), not empty_like) because every backend returns
contiguous tensors, also for strided inputs; per-row statistics are marked non-differentiable.
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
        return x.new_empty(x.shape), _row_stats(x), _row_stats(x)

    @torch.library.register_fake(bwd)
    def _bwd_fake(dy, x, weight, mean, rstd, has_bias):
        dbias = weight.new_empty(weight.shape) if has_bias else weight.new_empty(0)
        return x.new_empty(x.shape), weight.new_empty(weight.shape), dbias

    bwd_op = _op(bwd)

    def setup_context(ctx, inputs, output):
        x, weight, bias, _eps = inputs
        _y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
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
        return x.new_empty(x.shape), _row_stats(x)

    @torch.library.register_fake(bwd)
    def _bwd_fake(dy, x, weight, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    bwd_op = _op(bwd)

    def setup_context(ctx, inputs, output):
        x, weight, _eps = inputs
        _y, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(x, weight, rstd)

    def backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = bwd_op(dy, x, weight, rstd)
        return dx, dweight, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------
# cross_entropy: fwd(logits, target, ignore_index, label_smoothing, z_loss) -> (loss (N,), lse (N,))
# both float32; bwd(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss) -> dlogits.
# The op returns per-row losses and the public function reduces them with plain torch ops, so the
# gradient of every reduction ("mean", "sum", "none") is autograd's, and the kernel only ever sees
# a per-row upstream gradient.
def register_cross_entropy(fwd: str, bwd: str) -> None:
    @torch.library.register_fake(fwd)
    def _fwd_fake(logits, target, ignore_index, label_smoothing, z_loss):
        return _row_stats(logits), _row_stats(logits)

    @torch.library.register_fake(bwd)
    def _bwd_fake(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss):
        return torch.empty_like(logits)

    bwd_op = _op(bwd)

    def setup_context(ctx, inputs, output):
        logits, target, ignore_index, label_smoothing, z_loss = inputs
        ctx.save_for_backward(logits, target, output[1])
        ctx.args = (ignore_index, label_smoothing, z_loss)

    def backward(ctx, dloss, _dlse):
        logits, target, lse = ctx.saved_tensors
        return bwd_op(dloss, logits, target, lse, *ctx.args), None, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy: fwd(hidden, weight, target, scale, ignore_index, chunk_rows, with_grad)
# -> (loss 0-dim float32, dhidden, dweight): the gradients of `loss` itself, computed in the
# forward. loss is a scalar, so the upstream gradient is one number and the backward is a product.
def register_linear_cross_entropy(fwd: str) -> None:
    @torch.library.register_fake(fwd)
    def _fwd_fake(hidden, weight, target, scale, ignore_index, chunk_rows, with_grad):
        loss = hidden.new_empty((), dtype=torch.float32)
        if not with_grad:
            return loss, hidden.new_empty(0), weight.new_empty(0)
        return loss, torch.empty_like(hidden), torch.empty_like(weight)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1], output[2])

    def backward(ctx, dloss, _ddhidden, _ddweight):
        dhidden, dweight = ctx.saved_tensors
        if dhidden.numel() == 0 and dweight.numel() == 0:
            raise RuntimeError("fastlm::linear_cross_entropy: the forward ran with with_grad=False "
                               "(under no_grad or on inputs that need no gradient)")
        return (dhidden * dloss.to(dhidden.dtype), dweight * dloss.to(dweight.dtype),
                None, None, None, None, None)

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------
# adamw_step(params!, grads, exp_avgs!, exp_avg_sqs!, step, lr, beta1, beta2, eps, wd) -> ():
# in place, no outputs, no autograd (optimizer steps run under no_grad).
def register_adamw_step(name: str) -> None:
    @torch.library.register_fake(name)
    def _fake(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
        return None


# ---------------------------------------------------------------------------------------------
# attention: fwd(q, k, v, causal, scale, window) -> (out, lse); bwd(dout, q, k, v, out, lse,
# causal, scale, window) -> (dq, dk, dv). q (B, H, Tq, D), k and v (B, H_kv, Tk, D), lse
# (B, H, Tq) float32: the backward recomputes the scores from q, k and lse (flash attention).
def register_attention(fwd: str, bwd: str) -> None:
    @torch.library.register_fake(fwd)
    def _fwd_fake(q, k, v, causal, scale, window):
        out = q.new_empty(q.shape)  # contiguous, like the kernels' outputs
        return out, q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake(bwd)
    def _bwd_fake(dout, q, k, v, out, lse, causal, scale, window):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    bwd_op = _op(bwd)

    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale, window = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, window)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default
