"""Triton linear_cross_entropy: the op fastlm::linear_cross_entropy_fwd_triton (same schema and
semantics as the C++ fastlm::linear_cross_entropy_fwd): the loss of cross_entropy(hidden @
weight^T, target) and its gradients, without the (N, V) logits.

Rows go through in chunks of chunk_rows. Per chunk: one torch matmul forms the (n, V) logits,
the fused Triton kernel of kernels/cross_entropy.py writes each row's loss and overwrites the
logits with their gradient in place (scaled by `scale`, the upstream gradient of each row's loss:
1/valid rows for "mean"), and two more matmuls give that chunk's rows of dhidden and its share of
dweight, accumulated in float32. Peak extra memory: one chunk of logits plus the float32 dweight.
The matmuls are cuBLAS's (tensor cores for bf16/fp16): a Triton GEMM would not beat them.
"""
import torch

from fastlm.ops import autograd as opdefs
from fastlm.kernels import cross_entropy as ce
from fastlm.kernels import utils


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b, in place: no (V, D) float32 temporary per chunk (154 MB at
    V = 50304, D = 768). On a GPU low-precision inputs accumulate into float32 directly (cuBLAS
    with a float32 output, no rounded intermediate); the interpreter's CPU tensors have no such
    kernel and add a float32 product instead (tests only)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b).float())


@torch.library.custom_op("fastlm::linear_cross_entropy_fwd_triton", mutates_args=())
def linear_cross_entropy_fwd_triton(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
    ignore_index: int, chunk_rows: int, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, D), weight (V, D), target (N,) int64, scale () float32 -> loss () float32 =
    scale * sum of the rows' losses, and its gradients dhidden (N, D) in hidden's dtype and
    dweight (V, D) in weight's dtype (empty (0,) each when with_grad is False)."""
    op = "linear_cross_entropy_fwd_triton"
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"fastlm::{op}: hidden must be (N, D) and weight (V, D), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype not in utils.KERNEL_DTYPES or weight.dtype not in utils.KERNEL_DTYPES:
        raise TypeError(f"fastlm::{op}: hidden and weight must be float32, bfloat16 or float16, "
                        f"got {hidden.dtype} and {weight.dtype}")
    if chunk_rows < 1:
        raise ValueError(f"fastlm::{op}: chunk_rows must be >= 1, got {chunk_rows}")
    if scale.numel() != 1:
        raise ValueError(f"fastlm::{op}: scale must hold one number, got shape {tuple(scale.shape)}")
    N, D = hidden.shape
    V = weight.shape[0]
    h = hidden.contiguous()
    w = weight.to(h.dtype).contiguous()  # (V, D): the matmuls run in hidden's dtype
    t = target.contiguous()
    s = scale.reshape(()).float().contiguous()
    losses = utils.empty_output((N,), torch.float32, h.device)  # (N,)
    dh = utils.empty_output((N, D), h.dtype, h.device) if with_grad else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=h.device) if with_grad else None
    for start in range(0, N, chunk_rows):
        hc = h[start:start + chunk_rows]  # (n, D)
        logits = torch.mm(hc, w.t())  # (n, V) hidden's dtype; becomes its gradient in place
        if with_grad:
            ce.loss_and_grad_(logits, t[start:start + chunk_rows], s, ignore_index,
                              losses[start:start + chunk_rows])
            torch.mm(logits, w, out=dh[start:start + chunk_rows])  # (n, D)
            _addmm_f32_(dw, logits.t(), hc)  # (V, D) float32
        else:
            loss_c, _ = ce.cross_entropy_fwd_triton(logits, t[start:start + chunk_rows],
                                                    ignore_index, 0.0, 0.0)
            losses[start:start + chunk_rows] = loss_c
    loss = losses.sum() * s
    if not with_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    return loss, dh, dw.to(weight.dtype)


opdefs.register_linear_cross_entropy("fastlm::linear_cross_entropy_fwd_triton")
