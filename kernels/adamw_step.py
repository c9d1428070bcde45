"""Triton adamw_step: the in-place op fastlm::adamw_step_triton (same schema and semantics as the
C++ fastlm::adamw_step): one AdamW update of every (param, grad, exp_avg, exp_avg_sq) quadruple,
torch.optim.AdamW's formula with amsgrad and maximize off:

    p <- p * (1 - lr * wd);  m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)

Multi-tensor: one launch updates every tensor of a dtype group (parameter dtype, state dtype),
as torch's fused AdamW and the CUDA backend do, instead of one launch per tensor (a GPT-2 has
~150 parameter tensors, most of them small: per-launch overhead would dominate). The launcher
writes a (n_tensors, 7) int64 table of the tensors' addresses and sizes and the first block of
each tensor; program b finds its tensor by binary search over the first blocks and updates
BLOCK of its elements. Each element is read and written once, math in float32.

Variants, as ops of the same names as the C++ ones (+ _triton):
  adamw_step_master      float32 master weights: p in the formula is the master copy, which is
                         updated; the parameter receives it rounded to its dtype.
  adamw_step_capturable  step (one tensor per parameter) and lr are device tensors: the per-step
                         constants are computed from them by torch ops on the device, in double,
                         into a (n_tensors, 7) table the kernel reads. No host sync.
"""
import math

import torch
import triton
import triton.language as tl

from fastlm.ops import autograd as opdefs
from fastlm.ops import triton_support
from fastlm.kernels import utils

BLOCK = 1024


@triton.jit
def _to_storage(x, ptr):
    """float32 x -> ptr's element dtype, rounding to nearest even. For bfloat16 the rounding is
    done on the bits first: the interpreter's float32 -> bfloat16 cast truncates, and an
    optimizer's per-step truncation drifts (25 steps lose ~25 ulps); on a GPU this is exact."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


# Table row of a tensor (int64): the addresses of p, g, m, v and w (the master copy; p's when
# there is none), its number of elements and its index in the op's lists (its row of the
# capturable constants).
TABLE_COLUMNS = 7


@triton.jit
def _as_ptr(address, like):
    """An int64 address from the table as a pointer to like's element type."""
    return address.to(tl.pointer_type(like.dtype.element_ty), bitcast=True)


@triton.jit
def _block_ptrs(ptr, offs, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """ptr + offs; ALIGNED: the launcher checked every address is a multiple of 16 and offs is
    one contiguous block starting at a multiple of BLOCK, which lets the compiler use 16-byte
    vector accesses (it cannot see through the table's int-to-pointer casts)."""
    ptrs = ptr + offs
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, 16), BLOCK)
    return ptrs


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offs, mask, decay, one_minus_b1, beta2,
            one_minus_b2, step_size, inv_sqrt_bc2, eps, HAS_MASTER: tl.constexpr,
            ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    p_ptr = _block_ptrs(p_ptr, offs, ALIGNED, BLOCK)
    g_ptr = _block_ptrs(g_ptr, offs, ALIGNED, BLOCK)
    m_ptr = _block_ptrs(m_ptr, offs, ALIGNED, BLOCK)
    v_ptr = _block_ptrs(v_ptr, offs, ALIGNED, BLOCK)
    w_ptr = _block_ptrs(w_ptr, offs, ALIGNED, BLOCK)
    if HAS_MASTER:
        p = tl.load(w_ptr, mask=mask)
    else:
        p = tl.load(p_ptr, mask=mask).to(tl.float32)
    g = tl.load(g_ptr, mask=mask).to(tl.float32)
    m = tl.load(m_ptr, mask=mask).to(tl.float32)
    v = tl.load(v_ptr, mask=mask).to(tl.float32)
    m = m + one_minus_b1 * (g - m)
    v = beta2 * v + one_minus_b2 * g * g
    p = p * decay - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    if HAS_MASTER:
        tl.store(w_ptr, p, mask=mask)
    tl.store(p_ptr, _to_storage(p, p_ptr), mask=mask)
    tl.store(m_ptr, _to_storage(m, m_ptr), mask=mask)
    tl.store(v_ptr, _to_storage(v, v_ptr), mask=mask)


@triton.jit
def _adamw_kernel(
    table_ptr,   # (n_tensors, TABLE_COLUMNS) int64: see above
    starts_ptr,  # (n_tensors,) int64: each tensor's first block, ascending, starts[0] = 0
    p_like,      # a parameter of the group: its pointer type types the table's p and g
    m_like,      # one of its states: types m and v
    c_ptr,       # (n_all, 7) float32 constants in the order of the scalars below (CONSTS_IN_PTR)
    n_tensors, decay, one_minus_b1, beta2, one_minus_b2, step_size, inv_sqrt_bc2, eps,
    HAS_MASTER: tl.constexpr,
    CONSTS_IN_PTR: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # >= ceil(log2(n_tensors)): rounds of the binary search
    ALIGNED: tl.constexpr,       # every tensor of the group starts on 16 bytes (vector accesses)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # The tensor whose blocks hold pid: the last t with starts[t] <= pid.
    # Invariant: starts[lo] <= pid < starts[hi] (starts[n_tensors] counts as infinite).
    lo = tl.zeros([], tl.int64)
    hi = lo + n_tensors
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo + 1 < hi
        mid = (lo + hi) // 2
        below = tl.load(starts_ptr + mid, mask=active, other=0) <= pid
        lo = tl.where(active & below, mid, lo)
        hi = tl.where(active & ~below, mid, hi)
    row = table_ptr + lo * 7  # TABLE_COLUMNS (a jit function reads only constexpr globals)
    p_ptr = _as_ptr(tl.load(row + 0), p_like)
    g_ptr = _as_ptr(tl.load(row + 1), p_like)
    m_ptr = _as_ptr(tl.load(row + 2), m_like)
    v_ptr = _as_ptr(tl.load(row + 3), m_like)
    w_ptr = _as_ptr(tl.load(row + 4), c_ptr)  # float32
    n = tl.load(row + 5)
    if CONSTS_IN_PTR:  # capturable: this step's constants were computed on the device
        c = c_ptr + tl.load(row + 6) * 7  # the tensor's row of (n_all, 7) constants
        decay = tl.load(c)
        one_minus_b1 = tl.load(c + 1)
        beta2 = tl.load(c + 2)
        one_minus_b2 = tl.load(c + 3)
        step_size = tl.load(c + 4)
        inv_sqrt_bc2 = tl.load(c + 5)
        eps = tl.load(c + 6)
    block_start = (pid - tl.load(starts_ptr + lo)) * BLOCK
    offs = block_start + tl.arange(0, BLOCK)
    if block_start + BLOCK <= n:  # a full block: no mask, so the accesses can be vectors
        _update(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offs, None, decay, one_minus_b1, beta2,
                one_minus_b2, step_size, inv_sqrt_bc2, eps, HAS_MASTER, ALIGNED, BLOCK)
    else:
        _update(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offs, offs < n, decay, one_minus_b1, beta2,
                one_minus_b2, step_size, inv_sqrt_bc2, eps, HAS_MASTER, ALIGNED, BLOCK)


def _check(params, grads, exp_avgs, exp_avg_sqs) -> None:
    op = "adamw_step_triton"
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError(f"fastlm::{op}: params, grads, exp_avgs and exp_avg_sqs must have equal "
                         "lengths")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        reason = triton_support.unavailable_reason(p.device)
        if reason is not None:
            raise RuntimeError(f"fastlm::{op}: {reason}")
        if p.dtype not in utils.KERNEL_DTYPES or g.dtype != p.dtype:
            raise TypeError(f"fastlm::{op}: params[{i}] must be float32, bfloat16 or float16 and "
                            f"its grad the same dtype, got {p.dtype} and {g.dtype}")
        for name, t in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if t.shape != p.shape or t.device != p.device:
                raise ValueError(f"fastlm::{op}: the {name} of params[{i}] must match its shape "
                                 f"{tuple(p.shape)} and device {p.device}, got "
                                 f"{tuple(t.shape)} on {t.device}")
        if m.dtype != v.dtype or m.dtype not in (torch.float32, p.dtype):
            raise TypeError(f"fastlm::{op}: the states of params[{i}] must both be float32 or "
                            f"{p.dtype}, got {m.dtype} and {v.dtype}")
        for name, t in (("params", p), ("exp_avgs", m), ("exp_avg_sqs", v)):
            if not t.is_contiguous():
                raise ValueError(f"fastlm::{op}: {name}[{i}] must be contiguous (it is updated "
                                 "in place)")


def _check_master(params, exp_avgs, master_params) -> None:
    if len(master_params) != len(params):
        raise ValueError("fastlm::adamw_step_triton: master_params must have one tensor per "
                         f"parameter, got {len(master_params)} for {len(params)}")
    for i, (p, m, w) in enumerate(zip(params, exp_avgs, master_params)):
        if (w.dtype != torch.float32 or w.shape != p.shape or w.device != p.device
                or not w.is_contiguous() or m.dtype != torch.float32):
            raise ValueError(f"fastlm::adamw_step_triton: master_params[{i}] must be a contiguous "
                             f"float32 tensor of shape {tuple(p.shape)} on {p.device}, with "
                             f"float32 states; got {w.dtype} {tuple(w.shape)} on {w.device} and "
                             f"states in {m.dtype}")


def _launch(params, grads, exp_avgs, exp_avg_sqs, master_params, consts) -> None:
    """consts: a tuple of 7 floats for every tensor, or a (n_tensors, 7) float32 device table.
    One kernel launch per (parameter dtype, state dtype) group of non-empty tensors."""
    table = isinstance(consts, torch.Tensor)
    groups: dict[tuple, list[int]] = {}
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        if p.numel():
            groups.setdefault((p.dtype, m.dtype), []).append(i)
    grads = [g.contiguous() for g in grads]  # kept alive (by this list) until the launches
    for members in groups.values():
        rows, starts, blocks = [], [], 0
        for i in members:
            p = params[i]
            w = master_params[i] if master_params else p  # p: a placeholder never read
            rows.append([p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                         exp_avg_sqs[i].data_ptr(), w.data_ptr(), p.numel(), i])
            starts.append(blocks)
            blocks += triton.cdiv(p.numel(), BLOCK)
        aligned = all(a % 16 == 0 for row in rows for a in row[:5])
        p0 = params[members[0]]
        device = p0.device
        packed = _device_table([a for row in rows for a in row] + starts, device)
        n_table = len(rows) * TABLE_COLUMNS
        c_ptr = consts if table else _float32_placeholder(device)
        scalars = (1.0,) * 7 if table else consts
        with utils.on_device(device):
            _adamw_kernel[(blocks,)](
                packed[:n_table], packed[n_table:], p0, exp_avgs[members[0]], c_ptr, len(members),
                *scalars, HAS_MASTER=bool(master_params), CONSTS_IN_PTR=table,
                SEARCH_STEPS=len(members).bit_length(), ALIGNED=aligned,
                BLOCK=BLOCK)


# Device copies of recent tables, keyed by their contents (addresses, sizes): a training loop
# passes the same tensors every step, so it pays the host-to-device copy once, and a CUDA graph
# captured after a warm-up step finds its table here instead of copying during the capture.
_TABLES: dict[tuple, torch.Tensor] = {}
_TABLES_KEPT = 16


def _device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """The int64 tensor of `values` on `device` (the rows, then the first blocks)."""
    key = (str(device), *values)
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(values, dtype=torch.int64).to(device)
        if len(_TABLES) >= _TABLES_KEPT:
            del _TABLES[next(iter(_TABLES))]  # the oldest
        _TABLES[key] = table
    return table


def _float32_placeholder(device: torch.device) -> torch.Tensor:
    """A float32 pointer for c_ptr when the constants are scalars (it types the master weights'
    pointer; nothing is read from it)."""
    return torch.empty(1, dtype=torch.float32, device=device)


def _host_consts(step, lr, beta1, beta2, eps, weight_decay) -> tuple:
    """Per-step constants in double on the host, passed as float32 (as the C++ kernels do)."""
    if step < 1:
        raise ValueError(f"fastlm::adamw_step_triton: step counts from 1, got {step}")
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    return (1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, lr / bc1,
            1.0 / math.sqrt(bc2), eps)


def _device_consts(steps, lr, beta1, beta2, eps, weight_decay) -> torch.Tensor:
    """The same constants from device tensors, by torch ops in double: (n_tensors, 7) float32."""
    s = torch.stack([t.reshape(()) for t in steps]).double()  # (n,)
    lr = lr.reshape(()).double().expand_as(s)
    cols = [1.0 - lr * weight_decay, torch.full_like(s, 1.0 - beta1), torch.full_like(s, beta2),
            torch.full_like(s, 1.0 - beta2), lr / (1.0 - torch.pow(beta1, s)),
            1.0 / torch.sqrt(1.0 - torch.pow(beta2, s)), torch.full_like(s, eps)]
    return torch.stack(cols, dim=1).float()  # (n, 7)


@torch.library.custom_op("fastlm::adamw_step_triton",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def adamw_step_triton(params: list[torch.Tensor], grads: list[torch.Tensor],
                      exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], step: float,
                      lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float) -> None:
    _check(params, grads, exp_avgs, exp_avg_sqs)
    consts = _host_consts(step, lr, beta1, beta2, eps, weight_decay)
    _launch(params, grads, exp_avgs, exp_avg_sqs, [], consts)


@torch.library.custom_op("fastlm::adamw_step_master_triton",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "master_params"))
def adamw_step_master_triton(params: list[torch.Tensor], grads: list[torch.Tensor],
                             exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                             master_params: list[torch.Tensor], step: float, lr: float,
                             beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    _check(params, grads, exp_avgs, exp_avg_sqs)
    _check_master(params, exp_avgs, master_params)
    consts = _host_consts(step, lr, beta1, beta2, eps, weight_decay)
    _launch(params, grads, exp_avgs, exp_avg_sqs, master_params, consts)


@torch.library.custom_op("fastlm::adamw_step_capturable_triton",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "master_params"))
def adamw_step_capturable_triton(params: list[torch.Tensor], grads: list[torch.Tensor],
                                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                                 master_params: list[torch.Tensor], steps: list[torch.Tensor],
                                 lr: torch.Tensor, beta1: float, beta2: float, eps: float,
                                 weight_decay: float) -> None:
    _check(params, grads, exp_avgs, exp_avg_sqs)
    if master_params:
        _check_master(params, exp_avgs, master_params)
    if len(steps) != len(params):
        raise ValueError("fastlm::adamw_step_capturable_triton: steps must hold one tensor per "
                         f"parameter, got {len(steps)} for {len(params)}")
    if not params:
        return
    device = params[0].device
    for name, t in [("lr", lr)] + [(f"steps[{i}]", s) for i, s in enumerate(steps)]:
        if t.numel() != 1 or t.device != device:
            raise ValueError(f"fastlm::adamw_step_capturable_triton: {name} must be one value on "
                             f"the parameters' device {device}, got shape {tuple(t.shape)} on "
                             f"{t.device}")
    consts = _device_consts(steps, lr, beta1, beta2, eps, weight_decay)
    _launch(params, grads, exp_avgs, exp_avg_sqs, master_params, consts)


opdefs.register_adamw_step("fastlm::adamw_step_triton", "fastlm::adamw_step_master_triton",
                           "fastlm::adamw_step_capturable_triton")
