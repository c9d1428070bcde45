"""rms_norm benchmark: fastlm's backends against PyTorch eager, torch.compile and Liger-Kernel.

    python -m fastlm.bench --ops rms_norm [--sizes small|medium|large] [--dtypes bfloat16,...]

Bytes counted per mode as in bench_layer_norm.py: fwd reads x and writes y; bwd reads x and dy
and writes dx; full is both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastlm.ops as ops
from fastlm.bench import utils
from fastlm.bench.bench_layer_norm import SHAPES

OP = "rms_norm"


def make_case(shape, dtype, device) -> utils.Case:
    rows, cols = shape

    def make():
        x = torch.randn(rows, cols, device=device, dtype=dtype).requires_grad_(True)
        w = (1 + 0.1 * torch.randn(cols, device=device)).requires_grad_(True)
        return [x, w]

    n = rows * cols * torch.finfo(dtype).bits // 8
    return utils.Case(shape, dtype, make, {"fwd": 2 * n, "bwd": 3 * n, "full": 5 * n})


def providers(device: torch.device) -> list[utils.Provider]:
    def eager(x, w):
        return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), 1e-6)

    out = [utils.Provider("torch", eager), utils.Provider("torch-compile", utils.compiled(eager))]
    out += utils.fastlm_providers(
        OP, device, lambda backend: lambda x, w: ops.rms_norm(x, w, 1e-6, backend=backend))
    out.append(utils.liger_provider(device, _liger))
    return out


def _liger():
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return lambda x, w: LigerRMSNormFunction.apply(x, w.to(x.dtype), 1e-6)


def run(args) -> list[dict]:
    return utils.run_grid(OP, args, SHAPES[args.sizes], make_case, providers)
