"""Triton cross_entropy, forward and backward: the ops fastlm::cross_entropy_fwd_triton,
fastlm::cross_entropy_bwd_triton and fastlm::cross_entropy_fwd_inplace_triton (same schemas and
semantics as the C++ fastlm::cross_entropy_*; the last one is the fused forward + backward that
overwrites the logits with their gradient, for ops.cross_entropy(..., inplace_backward=True)),
and loss_and_grad_(), the same fused kernel for linear_cross_entropy, whose chunks of logits are
scratch.

Per row x (V,), target t, lse = logsumexp(x), eps = label_smoothing, z = z_loss:
    loss       = (1 - eps) * (lse - x_t) + eps * (lse - mean(x)) + z * lse^2
    dloss/dx_j = p_j * (1 + 2 z lse) - eps / V - (1 - eps) [j == t],   p_j = exp(x_j - lse)
Rows whose target is ignore_index have loss 0 and gradient 0. Loads are converted to float32 at
once; lse is found in one sweep over the row with an online (running max) sum of exponentials.
"""
import torch
import triton
import triton.language as tl

from fastlm.ops import autograd as opdefs
from fastlm.ops import triton_support
from fastlm.kernels import utils


# ---------------------------------------------------------------------------------------------
# Kernels
#
# Row layout. Row r of a contiguous (N, V) tensor starts at element r * V, so with an odd V (GPT-2's
# 50257) most rows start off a 16-byte boundary and the compiler, unable to prove any alignment,
# emits one scalar load per element. Each row is therefore split into
#   head  the elements up to the next multiple of VEC elements (VEC = 16 bytes / element size),
#   body  n_body elements from there, a multiple of VEC: aligned whenever the tensor's base is (a
#         torch allocation is), so tl.multiple_of on its start and length lets the compiler use
#         16-byte vector accesses (ld.global.v4.b32), and
#   tail  the rest, fewer than VEC;
# head and tail ("edges", < 2 * VEC elements) are read and written by one small masked block.
# The hints hold for any base: they are about element offsets, and the compiler combines them
# with the base pointer's own alignment (Triton specialises pointers on 16-byte divisibility).
# PTX for sm_90, bf16, V = 50257 (BLOCK_V 2048, 8 warps), global accesses vector / scalar, as
# bench.bench_cross_entropy.ptx_accesses counts them (tests/test_cross_entropy.py checks them):
#   before: fwd loads 0 / 10; fused fwd+grad loads 0 / 19, stores 0 / 9
#   after:  fwd loads 1 / 3;  fused fwd+grad loads 2 / 5,  stores 1 / 2 (the same as V = 50304;
#           the scalars are the edges, the target column and the per-row values)
@triton.jit
def _row_split(row_start, V, VEC: tl.constexpr):
    """(body_start, head, n_body) of the row whose first element is row_start (see above)."""
    head = tl.minimum((VEC - row_start % VEC) % VEC, V)
    n_body = tl.multiple_of((V - head) // VEC * VEC, VEC)
    body_start = tl.multiple_of(row_start + head, VEC)
    return body_start, head, n_body


@triton.jit
def _edge_cols(head, n_body, V, VEC: tl.constexpr):
    """(cols, mask) of a row's head and tail, columns counted from the row's start: lanes
    [0, VEC) are the head's candidates, lanes [VEC, 2 VEC) the tail's."""
    lane = tl.arange(0, 2 * VEC)
    cols = tl.where(lane < VEC, lane, head + n_body + lane - VEC)
    return cols, tl.where(lane < VEC, lane < head, cols < V)


@triton.jit
def _lse_update(m, s, xs, x, mask, HAS_SMOOTHING: tl.constexpr):
    """Fold a block x (masked lanes -inf) into the running max m, sum s of exp(x - m) and sum xs
    of x (only when HAS_SMOOTHING)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # -inf while every logit so far is -inf (masked tokens): exp(-inf - -inf) would be NaN.
    # Subtracting 0 instead adds exp(-inf) = 0 and keeps s = 0 until a finite logit comes.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
    if HAS_SMOOTHING:
        xs += tl.sum(tl.where(mask, x, 0.0), axis=0)
    return m_new, s, xs


@triton.jit
def _row_lse(x_ptr, row_start, V, BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """(lse, sum of x) of the row at x_ptr + row_start, float32; the sum only when HAS_SMOOTHING
    (else 0)."""
    VEC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    body_start, head, n_body = _row_split(row_start, V, VEC)
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    m = tl.full([], float("-inf"), tl.float32)  # running max
    s = tl.full([], 0.0, tl.float32)            # sum of exp(x - m)
    xs = tl.full([], 0.0, tl.float32)
    for start in range(0, n_body, BLOCK_V):
        mask = start + cols < n_body
        x = tl.load(x_ptr + body_start + start + cols, mask=mask,
                    other=float("-inf")).to(tl.float32)
        m, s, xs = _lse_update(m, s, xs, x, mask, HAS_SMOOTHING)
    ecols, emask = _edge_cols(head, n_body, V, VEC)
    x = tl.load(x_ptr + row_start + ecols, mask=emask, other=float("-inf")).to(tl.float32)
    m, s, xs = _lse_update(m, s, xs, x, emask, HAS_SMOOTHING)
    return m + tl.log(s), xs


@triton.jit
def _row_loss(x_row, target, ignore_index, lse, xs, V, label_smoothing, z_loss,
              HAS_SMOOTHING: tl.constexpr):
    ignored = target == ignore_index
    x_t = tl.load(x_row + tl.where(ignored, 0, target)).to(tl.float32)
    loss = (1.0 - label_smoothing) * (lse - x_t) + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss += label_smoothing * (lse - xs / V)
    return tl.where(ignored, 0.0, loss)


@triton.jit
def _grad_of(x, cols, target, lse, a, b, c):
    """a * p - b - c [col == target] for a block x at row columns cols (see the module doc)."""
    return a * tl.exp(x - lse) - b - tl.where(cols == target, c, 0.0)


@triton.jit
def _row_grad(x_ptr, g_ptr, row_start, target, ignore_index, lse, dloss, V, label_smoothing,
              z_loss, BLOCK_V: tl.constexpr):
    """Writes dloss * dloss_row/dx of the row at x_ptr + row_start into g_ptr + row_start (g_ptr
    may be x_ptr: each element is read before the same program overwrites it)."""
    VEC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    body_start, head, n_body = _row_split(row_start, V, VEC)
    cols = tl.arange(0, BLOCK_V)
    ignored = target == ignore_index
    d = tl.where(ignored, 0.0, dloss)  # ignored rows: every term below vanishes
    a = d * (1.0 + 2.0 * z_loss * lse)
    b = d * label_smoothing / V
    c = d * (1.0 - label_smoothing)
    for start in range(0, n_body, BLOCK_V):
        mask = start + cols < n_body
        x = tl.load(x_ptr + body_start + start + cols, mask=mask, other=0.0).to(tl.float32)
        g = _grad_of(x, head + start + cols, target, lse, a, b, c)
        tl.store(g_ptr + body_start + start + cols, g.to(g_ptr.dtype.element_ty), mask=mask)
    ecols, emask = _edge_cols(head, n_body, V, VEC)
    x = tl.load(x_ptr + row_start + ecols, mask=emask, other=0.0).to(tl.float32)
    g = _grad_of(x, ecols, target, lse, a, b, c)
    tl.store(g_ptr + row_start + ecols, g.to(g_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _ce_fwd_kernel(
    x_ptr,     # (N, V) logits' dtype
    t_ptr,     # (N,) int64
    loss_ptr,  # (N,) float32
    lse_ptr,   # (N,) float32
    V, ignore_index, label_smoothing, z_loss,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one program per row; int64: N * V may pass 2**31
    target = tl.load(t_ptr + row)
    lse, xs = _row_lse(x_ptr, row * V, V, BLOCK_V, HAS_SMOOTHING)
    loss = _row_loss(x_ptr + row * V, target, ignore_index, lse, xs, V, label_smoothing, z_loss,
                     HAS_SMOOTHING)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_bwd_kernel(
    dloss_ptr,  # (N,) float32
    x_ptr,      # (N, V) logits' dtype
    t_ptr,      # (N,) int64
    lse_ptr,    # (N,) float32
    g_ptr,      # (N, V) logits' dtype
    V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _row_grad(x_ptr, g_ptr, row * V, tl.load(t_ptr + row), ignore_index,
              tl.load(lse_ptr + row), tl.load(dloss_ptr + row), V, label_smoothing, z_loss,
              BLOCK_V)


@triton.jit
def _ce_fwd_grad_kernel(
    x_ptr,      # (N, V) logits, overwritten with their gradient
    t_ptr,      # (N,) int64
    loss_ptr,   # (N,) float32
    scale_ptr,  # () float32: the upstream gradient of every row's loss
    V, ignore_index, label_smoothing, z_loss,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(t_ptr + row)
    lse, xs = _row_lse(x_ptr, row * V, V, BLOCK_V, HAS_SMOOTHING)
    tl.store(loss_ptr + row, _row_loss(x_ptr + row * V, target, ignore_index, lse, xs, V,
                                       label_smoothing, z_loss, HAS_SMOOTHING))
    # The thread that stored the loss read x[target] first, but the warps run apart: without a
    # barrier the warp owning the target column may overwrite it with its gradient before that
    # read (the CUDA kernel's __syncthreads). tests/test_triton_aot.py checks the compiled order.
    tl.debug_barrier()
    _row_grad(x_ptr, x_ptr, row * V, target, ignore_index, lse, tl.load(scale_ptr), V,
              label_smoothing, z_loss, BLOCK_V)


# ---------------------------------------------------------------------------------------------
# Launchers
def _check(op: str, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    reason = triton_support.unavailable_reason(logits.device)
    if reason is not None:
        raise RuntimeError(f"fastlm::{op}: {reason}")
    if logits.dtype not in utils.KERNEL_DTYPES:
        raise TypeError(f"fastlm::{op}: 'logits' must be float32, bfloat16 or float16, "
                        f"got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"fastlm::{op}: 'logits' must be (N, V) with V >= 1, "
                         f"got {tuple(logits.shape)}")
    if target.dtype != torch.int64 or target.shape != logits.shape[:1]:
        raise ValueError(f"fastlm::{op}: 'target' must be int64 of shape ({logits.shape[0]},), "
                         f"got {target.dtype} {tuple(target.shape)}")
    if target.device.type == "cpu":  # a check that costs no device sync (the GPU kernel trusts it)
        bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
        if bad.any():
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"fastlm::{op}: target[{r}] = {int(target[r])} is neither "
                             f"ignore_index ({ignore_index}) nor a class in [0, {logits.shape[1]})")


def _block_v(V: int, max_block_v: int = utils.MAX_BLOCK_C) -> tuple[int, int]:
    blocks = utils.row_blocks(V, max_block_v)
    return blocks.block_c, blocks.num_warps


@torch.library.custom_op("fastlm::cross_entropy_fwd_triton", mutates_args=())
def cross_entropy_fwd_triton(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                             label_smoothing: float, z_loss: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), target (N,) int64 -> per-row loss and lse, (N,) float32 each."""
    _check("cross_entropy_fwd_triton", logits, target, ignore_index)
    N, V = logits.shape
    x = logits.contiguous()
    loss = utils.empty_output((N,), torch.float32, x.device)
    lse = utils.empty_output((N,), torch.float32, x.device)
    if N == 0:
        return loss, lse
    block_v, num_warps = _block_v(V)
    with utils.on_device(x.device):
        _ce_fwd_kernel[(N,)](x, target.contiguous(), loss, lse, V, ignore_index, label_smoothing,
                             z_loss, HAS_SMOOTHING=label_smoothing != 0.0, BLOCK_V=block_v,
                             num_warps=num_warps)
    return loss, lse


@torch.library.custom_op("fastlm::cross_entropy_bwd_triton", mutates_args=())
def cross_entropy_bwd_triton(dloss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                             lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                             z_loss: float) -> torch.Tensor:
    """dloss (N,) (the upstream gradient of each row's loss), logits (N, V), target (N,), lse
    (N,) from the forward -> dlogits (N, V) in logits' dtype."""
    op = "cross_entropy_bwd_triton"
    _check(op, logits, target, ignore_index)
    N, V = logits.shape
    if dloss.shape != (N,) or lse.shape != (N,):
        raise ValueError(f"fastlm::{op}: 'dloss' and 'lse' must have shape ({N},), got "
                         f"{tuple(dloss.shape)} and {tuple(lse.shape)}")
    x = logits.contiguous()
    g = utils.empty_output((N, V), x.dtype, x.device)
    if N == 0:
        return g
    block_v, num_warps = _block_v(V, utils.BWD_MAX_BLOCK_C)
    # dloss: autograd hands an expanded (stride 0) tensor for "sum"/"mean": make it real.
    with utils.on_device(x.device):
        _ce_bwd_kernel[(N,)](dloss.float().contiguous(), x, target.contiguous(),
                             lse.float().contiguous(), g, V, ignore_index, label_smoothing, z_loss,
                             BLOCK_V=block_v, num_warps=num_warps)
    return g


def loss_and_grad_(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                   ignore_index: int, loss_out: torch.Tensor, label_smoothing: float = 0.0,
                   z_loss: float = 0.0, op: str = "linear_cross_entropy_fwd_triton") -> None:
    """Fused forward + backward, in place: writes each row's loss into loss_out (n,) float32 and
    overwrites logits (n, V), contiguous, with scale * dloss/dlogits. scale: 0-dim float32
    tensor (read on the device: no sync). Not an op: the kernel call shared by the ops
    cross_entropy_fwd_inplace_triton and linear_cross_entropy_fwd_triton (`op` names the caller
    in errors)."""
    _check(op, logits, target, ignore_index)
    assert logits.is_contiguous() and loss_out.is_contiguous()
    N, V = logits.shape
    if N == 0:
        return
    block_v, num_warps = _block_v(V)
    with utils.on_device(logits.device):
        _ce_fwd_grad_kernel[(N,)](logits, target, loss_out, scale, V, ignore_index, label_smoothing,
                                  z_loss, HAS_SMOOTHING=label_smoothing != 0.0, BLOCK_V=block_v,
                                  num_warps=num_warps)


@torch.library.custom_op("fastlm::cross_entropy_fwd_inplace_triton", mutates_args=("logits",))
def cross_entropy_fwd_inplace_triton(logits: torch.Tensor, target: torch.Tensor,
                                     scale: torch.Tensor, ignore_index: int,
                                     label_smoothing: float, z_loss: float) -> torch.Tensor:
    """logits (N, V) contiguous, target (N,) int64, scale one float32 value on the logits'
    device -> per-row loss (N,) float32; scale * dloss/dlogits is written over logits."""
    op = "cross_entropy_fwd_inplace_triton"
    if not logits.is_contiguous():
        raise ValueError(f"fastlm::{op}: 'logits' must be contiguous (their gradient is written "
                         "into their own storage)")
    if scale.numel() != 1 or scale.device != logits.device:
        raise ValueError(f"fastlm::{op}: 'scale' must be one value on {logits.device}, got shape "
                         f"{tuple(scale.shape)} on {scale.device}")
    loss = utils.empty_output((logits.shape[0],), torch.float32, logits.device)
    loss_and_grad_(logits, target.contiguous(), scale.float().reshape(()), ignore_index, loss,
                   label_smoothing, z_loss, op)
    return loss


opdefs.register_cross_entropy("fastlm::cross_entropy_fwd_triton",
                              "fastlm::cross_entropy_bwd_triton",
                              "fastlm::cross_entropy_fwd_inplace_triton")
