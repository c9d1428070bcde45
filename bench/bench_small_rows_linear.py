"""small_rows_linear benchmark: a decode step's products on a CPU, fastlm's small-rows kernel
against oneDNN's prepacked matmul (what pack_linears used before it) and F.linear.

    python -m fastlm.bench --ops small_rows_linear [--sizes small|medium|large|1x768x2304,...]
                           [--dtypes float32,bfloat16]

A shape is rows x in_features x out_features: one decode step of `rows` sequences through one
weight matrix. The presets are gpt2-124m's matrices (qkv, attention out, MLP up and down, the
50257-token head) at 1 to 4 rows, the rows fastlm.models.packed_linear sends to the kernel.
Forward only: decoding runs under no_grad. Every input set holds its own weight, rotated so
the weights come from memory as in a real decode step (the whole model does not fit in cache);
bytes counted: the weight, x, bias and y once each, so GB/s is the weight-streaming rate.
oneDNN's packed copy is made once per input set, outside the timing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.bench import utils
from fastlm.models import packed_linear

OP = "small_rows_linear"
MODES = ("fwd",)  # inference only: there is no backward to time
_GPT2 = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of one block
SHAPES = {
    "small": [(1, 768, 2304), (4, 768, 2304), (1, 3072, 768), (1, 768, 50257)],
    "medium": [(m, k, n) for m in (1, 2, 3, 4) for k, n in _GPT2 + [(768, 50257)]],
    "large": [(m, k, n) for m in (1, 4) for k, n in ((1024, 4096), (4096, 1024), (1024, 50257))],
}


def make_case(shape, dtype, device) -> utils.Case:
    rows, k, n = shape
    packable = packed_linear.unavailable_reason(dtype) is None

    def make():
        x = torch.randn(rows, k, device=device, dtype=dtype)
        w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
        b = torch.randn(n, device=device, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16) if packable else None
        return [x, w, b, packed]

    size = torch.finfo(dtype).bits // 8
    moved = (n * k + rows * k + n + rows * n) * size
    return utils.Case(shape, dtype, make, {"fwd": moved})


def providers(device: torch.device) -> list[utils.Provider]:
    out = [utils.Provider("torch", lambda x, w, b, packed: F.linear(x, w, b))]
    small = packed_linear._small_rows_op()
    out.append(utils.Provider(
        "fastlm-cpu", small and (lambda x, w, b, packed: small(x, w, b)),
        None if small else "fastlm._C is not built (pip install -e .)"))

    def onednn(x, w, b, packed):
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")

    out.append(utils.Provider("onednn-packed", onednn))
    return out


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if device.type != "cpu":
        return [{"op": OP, "provider": "fastlm-cpu", "mode": "fwd",
                 "skipped": "a CPU kernel (decode on CPU): run it with --device cpu",
                 **utils.environment(device)}]
    modes = [m for m in args.modes if m in MODES]
    rows = []
    for shape in SHAPES[args.sizes]:
        for dtype in args.dtypes:
            case = make_case(shape, dtype, device)
            found = providers(device)
            why = packed_linear.unavailable_reason(dtype)
            if why is not None:  # keep the row in the table with the reason
                found = [p if p.name != "onednn-packed" else utils.Provider(p.name, None, why)
                         for p in found]
            rows += utils.bench_kernel(OP, case, found, modes, device, budget_s=args.budget)
    return rows
