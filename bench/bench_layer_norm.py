"""layer_norm benchmark: fastlm's backends against PyTorch eager, torch.compile and Liger-Kernel.

    python -m fastlm.bench --ops layer_norm [--sizes small|medium|large] [--dtypes bfloat16,...]

Bytes counted per mode (the fewest an ideal kernel moves): fwd reads x and writes y; bwd reads
x and dy and writes dx; full is both. The per-row statistics and the weights are negligible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastlm.ops as ops
from fastlm.bench import utils

OP = "layer_norm"
# (rows, features): GPT-2 small/medium/large and Llama-7B/13B-like widths at realistic token counts.
SHAPES = {
    "small": [(4096, 768)],
    "medium": [(8192, 1024), (8192, 4096)],
    "large": [(32768, 4096), (16384, 8192)],
}


def make_case(shape, dtype, device) -> utils.Case:
    rows, cols = shape

    def make():
        x = torch.randn(rows, cols, device=device, dtype=dtype).requires_grad_(True)
        w = (1 + 0.1 * torch.randn(cols, device=device)).requires_grad_(True)
        b = (0.1 * torch.randn(cols, device=device)).requires_grad_(True)
        return [x, w, b]

    n = rows * cols * torch.finfo(dtype).bits // 8
    return utils.Case(shape, dtype, make, {"fwd": 2 * n, "bwd": 3 * n, "full": 5 * n})


def providers(device: torch.device) -> list[utils.Provider]:
    def eager(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w.to(x.dtype), b.to(x.dtype), 1e-5)

    out = [utils.Provider("torch", eager), utils.Provider("torch-compile", utils.compiled(eager))]
    out += utils.fastlm_providers(
        OP, device, lambda backend: lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, backend=backend))
    out.append(utils.liger_provider(device, _liger))
    return out


def _liger():
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return lambda x, w, b: LigerLayerNormFunction.apply(x, w.to(x.dtype), b.to(x.dtype), 1e-5)


def run(args) -> list[dict]:
    return utils.run_grid(OP, args, SHAPES[args.sizes], make_case, providers)
