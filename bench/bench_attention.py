"""attention benchmark: fastlm's backends against torch SDPA (each of its backends) and naive
attention, forward, backward and forward+backward, in TFLOP/s.

    python -m fastlm.bench --ops attention [--sizes small|medium|large] [--dtypes ...]
    python -m fastlm.bench.bench_attention [same options]   (prints a TFLOP/s table)

Sizes: small = T 512..2048 at d64 (the CPU comparison), medium = T 512..4096, large = T 512..16k,
both at d64 and d128 (GPU). 16k tokens per batch (B = 16384 // T) and 2048 model width
(H = 2048 // D), causal and not, as FlashAttention's own benchmark does; the CPU set uses B = 1,
H = 4 so that a run fits in a few minutes on a small machine.

FLOPs: the forward is two matmuls, 4 * B * H * Tq * Tk * D, times the fraction of (query, key)
pairs the mask keeps (about half for causal: (T + 1) / 2T exactly); the backward counts 2.5x the
forward (five matmuls, the recomputed scores included), fwd+bwd 3.5x. Each row also gives the
share of a dense matmul's TFLOP/s measured in the same run at the same dtype (the compute peak
this machine reaches in practice).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

import fastlm.ops as ops
from fastlm.bench import utils

OP = "attention"
SIZES = {
    "small": {"T": [512, 1024, 2048], "D": [64]},
    "medium": {"T": [512, 1024, 2048, 4096], "D": [64, 128]},
    "large": {"T": [512, 1024, 2048, 4096, 8192, 16384], "D": [64, 128]},
}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "full": 3.5}


def shape_for(T: int, D: int, device: torch.device) -> tuple:
    """(B, H, T, D): FlashAttention's benchmark layout on a GPU, one small batch on a CPU."""
    if device.type == "cuda":
        return (max(1, 16384 // T), max(1, 2048 // D), T, D)
    return (1, 4, T, D)


def fwd_flops(shape, causal: bool) -> float:
    B, H, T, D = shape
    kept = (T + 1) / (2 * T) if causal else 1.0  # visible (query, key) pairs / T^2
    return 4.0 * B * H * T * T * D * kept


def make_case(shape, dtype, causal, device) -> utils.Case:
    B, H, T, D = shape

    def make():
        return [torch.randn(B, H, T, D, device=device, dtype=dtype).requires_grad_(True)
                for _ in range(3)]

    n = B * H * T * D * torch.finfo(dtype).bits // 8  # bytes of one (B, H, T, D) tensor
    return utils.Case(shape, dtype, make, {"fwd": 4 * n, "bwd": 8 * n, "full": 12 * n},
                      extra={"causal": causal})


def naive(q, k, v, causal):
    """What a user writes by hand: materialised (T, T) scores in the inputs' dtype."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[-2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def providers(device: torch.device, causal: bool) -> list[utils.Provider]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def sdpa_with(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)
        return fn

    out = [utils.Provider("torch", sdpa)]
    gpu_only = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), *gpu_only.items(),
                          ("math", SDPBackend.MATH)]:
        skip = ("no CPU kernel" if device.type == "cpu" and name in gpu_only else None)
        out.append(utils.Provider(f"torch-sdpa-{name}", sdpa_with(backend), skip))
    out.append(utils.Provider("naive", lambda q, k, v: naive(q, k, v, causal)))
    out += utils.fastlm_providers(
        OP, device, lambda b: lambda q, k, v: ops.attention(q, k, v, causal, backend=b))
    return out


# Dense matmul TFLOP/s at a dtype, measured now: the practical compute peak (shared harness).
matmul_tflops = utils.matmul_tflops


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cuda":  # float32 attention on a GPU is not what anyone trains with
        torch.backends.cuda.matmul.allow_tf32 = False
    sizes = SIZES[args.sizes]
    rows = []
    for D in sizes["D"]:
        for T in sizes["T"]:
            for causal in (True, False):
                for dtype in args.dtypes:
                    shape = shape_for(T, D, device)
                    case = make_case(shape, dtype, causal, device)
                    new = utils.bench_kernel(OP, case, providers(device, causal), args.modes,
                                             device, budget_s=args.budget)
                    peak = matmul_tflops(device, dtype)
                    for r in new:
                        if "median_ms" in r:
                            flops = fwd_flops(shape, causal) * FLOP_FACTOR[r["mode"]]
                            r["tflops"] = flops / (r["median_ms"] * 1e-3) / 1e12
                            r["matmul_tflops"] = peak
                            r["pct_of_matmul_peak"] = 100 * r["tflops"] / peak
                    rows += new
    return rows


def format_tflops(rows: list[dict]) -> str:
    """One line per row: case, provider, ms, TFLOP/s, % of the matmul peak, speed-up vs torch."""
    lines = [f"{'shape':<22}{'causal':<7}{'dtype':<9}{'mode':<5}{'provider':<22}{'ms':>9}"
             f"{'TFLOP/s':>9}{'%mm':>6}{'vs torch':>9}"]
    for r in rows:
        head = (f"{str(tuple(r['shape'])):<22}{str(r['causal']):<7}{r['dtype']:<9}{r['mode']:<5}"
                f"{r['provider']:<22}")
        if "median_ms" not in r:
            lines.append(head + f"skipped: {r['skipped'][:60]}")
            continue
        speedup = r.get("speedup_vs_torch", float("nan"))
        lines.append(head + f"{r['median_ms']:>9.2f}{r['tflops']:>9.3f}"
                     f"{r['pct_of_matmul_peak']:>6.0f}{speedup:>8.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    from fastlm.bench.__main__ import default_json_path, parse_args

    args = parse_args(["--ops", OP, *(argv if argv is not None else sys.argv[1:])])
    if args.dtypes == [torch.float32, torch.bfloat16] and args.device == "cpu":
        args.dtypes = [torch.float32]  # the CPU target is float32
    rows = run(args)
    print(format_tflops(rows))
    path = args.json or default_json_path(args)
    if path:
        utils.write_json(rows, path)
        print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
