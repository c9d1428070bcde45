"""adamw_step benchmark: one optimizer step over a model-sized list of tensors, fastlm's backends
against torch.optim.AdamW's foreach and fused implementations.

    python -m fastlm.bench --ops adamw_step [--sizes small|medium|large] [--dtypes ...]

The parameter list mimics a GPT-2 stack (per layer: 4 matrices of D x D, 4 D x 4D, biases and
norm gains; plus a V x D embedding), so both per-tensor overhead and bandwidth count. Bytes per
element: read p, g, m, v and write p, m, v (7 accesses; states in the parameter dtype).

Variants of each native backend: "-capturable" (step and lr read from tensors on the device; the
same bytes) and, for bf16/fp16 parameters, "-master" (float32 master weights and states: p and g
in the parameter dtype, m, v and the master copy read and written in float32).

fastlm-triton makes one launch per dtype group (all tensors of the list) like torch-fused, so
"large" (GPT-2 124M's ~150 tensors) compares the two at their real per-tensor overhead. It is
timed on a GPU only: on a CPU Triton runs in its interpreter, a correctness tool whose time
means nothing at any size (tests/test_adamw_step.py checks it there on small tensors).
"""
from __future__ import annotations

import torch

import fastlm.ops as ops
from fastlm.bench import utils

OP = "adamw_step"
# (layers, width, vocab): ~12M, ~33M (the "30M+"), ~124M (GPT-2 small) parameters.
SHAPES = {
    "small": [(2, 512, 8192)],
    "medium": [(4, 768, 8192)],
    "large": [(12, 768, 50304)],
}
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def model_shapes(layers, width, vocab):
    shapes = [(vocab, width)]
    for _ in range(layers):
        shapes += [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
        shapes += [(3 * width,), (width,), (4 * width,), (width,), (width,), (width,), (width,),
                   (width,)]
    return shapes


def make_state(shape, dtype, device):
    tensors = [torch.randn(s, device=device, dtype=dtype) for s in model_shapes(*shape)]
    return ([t.clone() for t in tensors], [torch.randn_like(t) for t in tensors],
            [torch.zeros_like(t) for t in tensors], [torch.zeros_like(t) for t in tensors])


def providers(device, state):
    """Providers as closures over one state (params, grads, exp_avgs, exp_avg_sqs). torch's run
    as real torch.optim.AdamW instances over the same tensors (as Parameters with .grad set)."""
    params = [torch.nn.Parameter(p, requires_grad=False) for p in state[0]]
    for p, g in zip(params, state[1]):
        p.grad = g

    def torch_impl(**kind):
        opt = torch.optim.AdamW(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                                eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], **kind)
        return opt.step

    out = [utils.Provider("torch-foreach", torch_impl(foreach=True)),
           utils.Provider("torch-fused", torch_impl(fused=True))]
    steps = [torch.full((), 5.0, device=device) for _ in state[0]]
    lr = torch.tensor(HYPER["lr"], dtype=torch.float64, device=device)
    hyper = {k: v for k, v in HYPER.items() if k != "lr"}
    low_precision = state[0][0].dtype in (torch.bfloat16, torch.float16)
    if low_precision:  # float32 states and master copies for the -master rows
        m32, v32 = [m.float() for m in state[2]], [v.float() for v in state[3]]
        masters = [p.float() for p in state[0]]
    for backend in ("reference", "cpu", "cuda", "triton"):
        reason = ops.unavailable_reason(OP, backend, device)
        if backend == "triton" and device.type == "cpu" and reason is None:
            reason = "the Triton interpreter is a correctness tool, not timed"
        if backend in ("cuda", "triton") and device.type == "cpu" and reason:
            continue
        out.append(utils.Provider(
            f"fastlm-{backend}",
            lambda b=backend: ops.adamw_step(*state, 5, **HYPER, backend=b), reason))
        if backend == "reference":
            continue
        out.append(utils.Provider(
            f"fastlm-{backend}-capturable",
            lambda b=backend: ops.adamw_step(*state, steps, lr, **hyper, backend=b), reason))
        if low_precision:
            out.append(utils.Provider(
                f"fastlm-{backend}-master",
                lambda b=backend: ops.adamw_step(state[0], state[1], m32, v32, 5, **HYPER,
                                                 backend=b, master_params=masters), reason))
    return out


def run(args) -> list[dict]:
    device = torch.device(args.device)
    env = utils.environment(device)
    roofline = utils.copy_bandwidth_gbps(device)
    rows = []
    for shape in SHAPES[args.sizes]:
        for dtype in args.dtypes:
            state = make_state(shape, dtype, device)
            numel = sum(t.numel() for t in state[0])
            size = torch.finfo(dtype).bits // 8
            for p in providers(device, state):
                if not utils.wanted(p.name):
                    continue
                # -master: p, g in the parameter dtype (p read and written), m, v, w in float32
                nbytes = numel * (3 * size + 6 * 4 if p.name.endswith("-master") else 7 * size)
                row = {"op": OP, "provider": p.name, "shape": list(shape), "params": numel,
                       "dtype": str(dtype).removeprefix("torch."), "mode": "step"}
                if p.skip_reason:
                    rows.append({**row, "skipped": p.skip_reason, **env})
                    continue
                with torch.no_grad():
                    timing = utils.time_call(lambda _: p.fn(), device, budget_s=args.budget)
                gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
                rows.append({**row, "median_ms": timing.median_ms, "min_ms": timing.min_ms,
                             "max_ms": timing.max_ms, "runs": timing.runs, "gb_per_s": gbps,
                             "pct_of_copy_bw": 100 * gbps / roofline, **env})
    base = {(tuple(r["shape"]), r["dtype"]): r["median_ms"] for r in rows
            if r["provider"] == "torch-fused" and "median_ms" in r}
    for r in rows:
        key = (tuple(r["shape"]), r["dtype"])
        if "median_ms" in r and key in base:
            r["speedup_vs_torch"] = base[key] / r["median_ms"]  # vs torch's fused AdamW
    return rows
