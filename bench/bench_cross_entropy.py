"""cross_entropy benchmark: fastlm's backends against F.cross_entropy eager, its torch.compile and
Liger-Kernel's fused cross-entropy.

    python -m fastlm.bench --ops cross_entropy [--sizes small|medium|large] [--dtypes ...]

Bytes counted per mode (the fewest an ideal kernel moves): fwd reads the logits once; bwd reads
them and writes their gradient; full is fwd + bwd (a fused kernel could do it in 2 passes, not 3).
The targets and per-row statistics are negligible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastlm.ops as ops
from fastlm.bench import utils

OP = "cross_entropy"
# (tokens, vocab): GPT-2's vocabulary at growing batch sizes, then Llama-3's.
SHAPES = {
    "small": [(1024, 50257)],
    "medium": [(4096, 50257)],
    "large": [(8192, 50304), (4096, 128256)],
}


def make_case(shape, dtype, device) -> utils.Case:
    rows, vocab = shape

    def make():
        logits = torch.randn(rows, vocab, device=device, dtype=dtype).requires_grad_(True)
        target = torch.randint(0, vocab, (rows,), device=device)
        target[::10] = -100  # some padding, as in real batches
        return [logits, target]

    n = rows * vocab * torch.finfo(dtype).bits // 8
    return utils.Case(shape, dtype, make, {"fwd": n, "bwd": 2 * n, "full": 3 * n})


def providers(device: torch.device) -> list[utils.Provider]:
    def eager(x, t):
        return F.cross_entropy(x.float(), t)

    out = [utils.Provider("torch", eager), utils.Provider("torch-compile", utils.compiled(eager))]
    out += utils.fastlm_providers(
        OP, device, lambda backend: lambda x, t: ops.cross_entropy(x, t, backend=backend))
    out.append(utils.liger_provider(device, _liger))
    return out


def _liger():
    from liger_kernel.transformers.functional import liger_cross_entropy

    return liger_cross_entropy


def run(args) -> list[dict]:
    return utils.run_grid(OP, args, SHAPES[args.sizes], make_case, providers)
