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
# fwd_inplace(logits!, target, scale, ignore_index, label_smoothing, z_loss) -> loss (N,): the
# loss and scale * dloss/dlogits written over logits. It has no autograd formula of its own (an
# op that mutates an input cannot have one): CrossEntropyInplace below is its autograd.
def register_cross_entropy(fwd: str, bwd: str, fwd_inplace: str | None = None) -> None:
    """fwd_inplace defaults to fwd + "_inplace" where that op exists (the C++ one)."""
    fwd_inplace = fwd_inplace or _sibling(fwd, "_inplace")

    @torch.library.register_fake(fwd)
    def _fwd_fake(logits, target, ignore_index, label_smoothing, z_loss):
        return _row_stats(logits), _row_stats(logits)

    @torch.library.register_fake(bwd)
    def _bwd_fake(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss):
        return logits.new_empty(logits.shape)

    if fwd_inplace is not None:
        @torch.library.register_fake(fwd_inplace)
        def _fwd_inplace_fake(logits, target, scale, ignore_index, label_smoothing, z_loss):
            return _row_stats(logits)

    bwd_op = _op(bwd)

    def setup_context(ctx, inputs, output):
        logits, target, ignore_index, label_smoothing, z_loss = inputs
        ctx.save_for_backward(logits, target, output[1])
        ctx.args = (ignore_index, label_smoothing, z_loss)

    def backward(ctx, dloss, _dlse):
        logits, target, lse = ctx.saved_tensors
        return bwd_op(dloss, logits, target, lse, *ctx.args), None, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


class CrossEntropyInplace(torch.autograd.Function):
    """Autograd of cross_entropy(..., inplace_backward=True): the forward runs a fused kernel
    that returns the per-row losses and writes their gradient (times the reduction's scale) over
    the logits; the backward only multiplies that stored gradient by the upstream gradient, in
    place, and hands the logits' own storage back as their gradient. So no (N, V) gradient
    buffer is ever allocated.

    apply(logits, fused, reduce, scale, per_row):
      fused(logits, scale) -> (N,) float32 losses, gradient written over logits
      reduce(losses) -> the returned loss ((N,) for "none", a scalar otherwise)
      scale: 0-dim float32 tensor on the logits' device (1/valid rows for "mean")
      per_row: the upstream gradient is (N,) ("none") rather than a scalar

    Safety: the logits' version counter is bumped, so any other autograd node that saved these
    logits (or a view of their storage) fails loudly in its backward instead of using gradient
    values as logits. One backward only (a second would rescale the gradient again). The logits
    (and their view base) are marked with their version after each write: while it is
    unchanged they hold a gradient, which holds_gradient() reports.
    """

    _MARK = "_fastlm_inplace_grad_version"

    @staticmethod
    def holds_gradient(t: torch.Tensor) -> bool:
        """Whether t (or its view base) still holds a gradient written by this function."""
        return any(u is not None and getattr(u, CrossEntropyInplace._MARK, None) == u._version
                   for u in (t, t._base))

    @staticmethod
    def _mark(t: torch.Tensor) -> None:
        for u in (t, t._base):
            if u is not None:
                setattr(u, CrossEntropyInplace._MARK, u._version)

    @staticmethod
    def forward(ctx, logits, fused, reduce, scale, per_row):
        losses = fused(logits, scale)
        torch.autograd.graph.increment_version(logits)
        CrossEntropyInplace._mark(logits)
        ctx.save_for_backward(logits)
        ctx.per_row = per_row
        ctx.done = False
        return reduce(losses)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.done:
            raise RuntimeError("fastlm.ops.cross_entropy(inplace_backward=True): the gradient was "
                               "written over the logits and is used up by the first backward; a "
                               "second backward (retain_graph=True) is not supported")
        ctx.done = True
        (grad,) = ctx.saved_tensors  # (N, V): already d(loss)/d(logits) for a unit upstream
        if ctx.per_row:
            grad.mul_(grad_out.unsqueeze(-1))  # (N, V) * (N, 1)
        elif grad_out.device.type != "cpu" or grad_out.item() != 1.0:
            # loss.backward() hands 1: skip the pass where checking is free (a CPU value); on a
            # GPU always multiply, since reading the value would cost a sync.
            grad.mul_(grad_out)
        CrossEntropyInplace._mark(grad)
        return grad, None, None, None, None


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
        return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1], output[2])
        # The gradients are results, not functions of the inputs to differentiate; and no zero
        # (V, D) upstream gradient is made for them at every backward (20 ms a GPT-2 CPU step).
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)

    def backward(ctx, dloss, _ddhidden, _ddweight):
        if dloss is None:  # only the gradient outputs were used downstream
            return None, None, None, None, None, None, None
        dhidden, dweight = ctx.saved_tensors
        if dhidden.numel() == 0 and dweight.numel() == 0:
            raise RuntimeError("fastlm::linear_cross_entropy: the forward ran with with_grad=False "
                               "(under no_grad or on inputs that need no gradient)")
        if _unit_upstream_freeing_graph(dloss):
            # loss.backward() hands 1: the gradients are the forward's as they are. The product
            # would allocate and write a second (V, D) tensor (GPT-2's lm head: 155 MB, ~0.4 s
            # a step on a 2-core CPU).
            return dhidden, dweight, None, None, None, None, None
        return (dhidden * dloss.to(dhidden.dtype), dweight * dloss.to(dweight.dtype),
                None, None, None, None, None)

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def _unit_upstream_freeing_graph(dloss: torch.Tensor) -> bool:
    """Whether a backward may hand out its saved gradients as they are: the upstream gradient
    is a plain CPU tensor equal to 1 (reading it is free there; on a GPU it would cost a sync)
    and the backward frees the graph after it. Under retain_graph the saved tensors must stay
    intact for the next backward, and autograd may accumulate into a handed-out gradient in
    place (p.grad += ...), so there the product runs. Traced backwards (fake or functional
    tensors under torch.compile) always take the product."""
    if type(dloss) is not torch.Tensor or dloss.device.type != "cpu":
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None:
        return False
    try:
        if keep_graph():
            return False
    except RuntimeError:  # not inside a backward pass
        return False
    return dloss.item() == 1.0


# ---------------------------------------------------------------------------------------------
# adamw_step(params!, grads, exp_avgs!, exp_avg_sqs!, step, lr, beta1, beta2, eps, wd) -> ():
# in place, no outputs, no autograd (optimizer steps run under no_grad). Its variants:
# adamw_step_master(params!, grads, exp_avgs!, exp_avg_sqs!, master_params!, step, lr, ...) and
# adamw_step_capturable(params!, grads, exp_avgs!, exp_avg_sqs!, master_params!, steps, lr
# tensor, ...) (see csrc/adamw_step/adamw_step_cpu.cpp).
def register_adamw_step(name: str, master: str | None = None,
                        capturable: str | None = None) -> None:
    """master and capturable default to name + "_master" / "_capturable" where those ops exist
    (the C++ ones)."""
    @torch.library.register_fake(name)
    def _fake(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
        return None

    master = master or _sibling(name, "_master")
    if master is not None:
        @torch.library.register_fake(master)
        def _master_fake(params, grads, exp_avgs, exp_avg_sqs, master_params, step, lr, beta1,
                         beta2, eps, weight_decay):
            return None

    capturable = capturable or _sibling(name, "_capturable")
    if capturable is not None:
        @torch.library.register_fake(capturable)
        def _capturable_fake(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, lr,
                             beta1, beta2, eps, weight_decay):
            return None


# ---------------------------------------------------------------------------------------------
# attention: fwd(q, k, v, causal, scale, window) -> (out, lse); bwd(dout, q, k, v, out, lse,
# causal, scale, window) -> (dq, dk, dv). q (B, H, Tq, D), k and v (B, H_kv, Tk, D), lse
# (B, H, Tq) float32: the backward recomputes the scores from q, k and lse (flash attention).
# heads_inner: the kernels return out, dq, dk and dv laid out (B, T, H, D) as (B, H, T, D) views
# (the C++ CPU kernels do, so the model's transpose + reshape around attention copies nothing).
def register_attention(fwd: str, bwd: str, heads_inner: bool = False) -> None:
    def new(t):  # an output of t's shape, laid out as the kernels lay it out
        if not heads_inner:
            return t.new_empty(t.shape)  # contiguous
        B, H, T, D = t.shape
        return t.new_empty((B, T, H, D)).transpose(1, 2)

    @torch.library.register_fake(fwd)
    def _fwd_fake(q, k, v, causal, scale, window):
        return new(q), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake(bwd)
    def _bwd_fake(dout, q, k, v, out, lse, causal, scale, window):
        return new(q), new(k), new(v)

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


# ---------------------------------------------------------------------------------------------
# small_rows_linear(x (M, K), weight (N, K), bias (N,)?) -> (M, N): inference only (decode steps,
# fastlm.models.packed_linear), so a fake kernel and no autograd formula.
def register_small_rows_linear(name: str) -> None:
    @torch.library.register_fake(name)
    def _fake(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))


def _sibling(qualname: str, suffix: str) -> str | None:
    """qualname + suffix if that op is registered (a native library built before it lacks it)."""
    namespace, name = qualname.split("::")
    return f"{qualname}{suffix}" if hasattr(getattr(torch.ops, namespace), name + suffix) else None


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default
