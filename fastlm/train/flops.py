"""Model FLOPs and accelerator peaks: the two sides of MFU (model FLOPs utilisation).

MFU = tokens/s * flops_per_token / peak FLOP/s, as the PaLM paper defines it (appendix B) and
nanoGPT computes it: FLOPs per token = 6 N + 12 L T C (N parameters in matmuls, the tied output
head counted; L layers, T the sequence length, C the width: the attention scores and weighted
sums, non-causal count), see GPT.flops_per_token. fastlm.train logs it per step (GPU runs) and
fastlm.profile reports it.
"""
from __future__ import annotations

import re

import torch

from fastlm import models
from fastlm.config import ModelConfig

# Peak FLOP/s of known accelerators: dense (no 2:4 sparsity) tensor-core bf16 and fp16 with
# float32 accumulation, from the vendors' datasheets (SXM/OAM boards at boost clock unless the
# name says otherwise). Patterns are tried in order on the lowercased device name, so the more
# specific ones (PCIe, NVL) come first. Entries with no bf16 support have bf16 None.
_T = 1e12
PEAKS: list[tuple[str, dict[str, float | None]]] = [
    (r"\bgh200\b", {"bfloat16": 989.4 * _T, "float16": 989.4 * _T}),
    (r"\bh200\b.*\bnvl\b", {"bfloat16": 835.5 * _T, "float16": 835.5 * _T}),
    (r"\bh200\b", {"bfloat16": 989.4 * _T, "float16": 989.4 * _T}),
    (r"\bh100\b.*\bnvl\b", {"bfloat16": 835.5 * _T, "float16": 835.5 * _T}),
    (r"\bh100\b.*\bpcie\b", {"bfloat16": 756.5 * _T, "float16": 756.5 * _T}),
    (r"\bh100\b", {"bfloat16": 989.4 * _T, "float16": 989.4 * _T}),  # SXM5 (HBM3)
    (r"\bb200\b", {"bfloat16": 2250 * _T, "float16": 2250 * _T}),
    (r"\ba100\b", {"bfloat16": 312 * _T, "float16": 312 * _T}),  # SXM4 and PCIe alike
    (r"\bl40s\b", {"bfloat16": 362.05 * _T, "float16": 362.05 * _T}),
    (r"\bl40\b", {"bfloat16": 181.05 * _T, "float16": 181.05 * _T}),
    (r"\bl4\b", {"bfloat16": 121 * _T, "float16": 121 * _T}),
    (r"\ba10\b", {"bfloat16": 125 * _T, "float16": 125 * _T}),
    (r"\brtx a6000\b", {"bfloat16": 154.8 * _T, "float16": 154.8 * _T}),
    (r"\brtx 4090\b", {"bfloat16": 165.2 * _T, "float16": 165.2 * _T}),
    (r"\brtx 3090\b", {"bfloat16": 71 * _T, "float16": 71 * _T}),
    (r"\bv100\b", {"bfloat16": None, "float16": 125 * _T}),
    (r"\bt4\b", {"bfloat16": None, "float16": 65 * _T}),
    (r"\bmi300x\b", {"bfloat16": 1307.4 * _T, "float16": 1307.4 * _T}),
    (r"\bmi250x\b", {"bfloat16": 383 * _T, "float16": 383 * _T}),
]


def dtype_name(dtype) -> str:
    """"bfloat16", "float16" or "float32" for a torch dtype or a short name (bf16, half, ...)."""
    name = str(dtype).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32"}.get(name, name)


def peak_flops(device_name: str, dtype) -> float | None:
    """Dense peak FLOP/s of the named GPU at dtype (torch.bfloat16 / torch.float16 or their
    names); None for unknown devices, CPUs and float32 (MFU is quoted against the tensor-core
    peak of the 16-bit type a model trains in)."""
    name = device_name.lower()
    for pattern, peaks in PEAKS:
        if re.search(pattern, name):
            return peaks.get(dtype_name(dtype))
    return None


def flops_per_token(model_config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at this sequence length: 6 N + 12 L T C,
    computed by GPT.flops_per_token on a meta-device model (no memory, exact parameter count)."""
    if seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len must be >= 1, got {seq_len}")
    with torch.device("meta"):
        model = models.build(model_config)
    return float(model.flops_per_token(seq_len))


def gpu_peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense 16-bit tensor-core peak of this GPU for train.precision, the denominator of MFU.
    None on CPUs and unknown GPUs: MFU is reported as unknown, never against a guessed peak.
    fp32 runs are measured against the bf16 peak (what they forgo)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device),
                      "float16" if precision == "fp16" else "bfloat16")
