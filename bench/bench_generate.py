"""Generation benchmark: prefill and decode tokens/s of fastlm's KV-cache decoder against
transformers' generate on the exported copy of the same model, and the server's aggregate
streaming throughput.

    python -m fastlm.bench.bench_generate [--preset gpt2-124m] [--batches 1,8] [--prompt 64]
        [--new 32] [--server-clients 16] [--dtype float32] [--threads 1] [--clock cpu]
        [--json PATH]

bench/results/cpu-amd-epyc/generate-gpt2-124m-<dtype>.json: --threads 1 --repeats 5 --clock
cpu --server-clients 16 on the shared 2-core machine.

Weights are random (speed does not depend on them); both sides run greedy in the same --dtype on
the same device with the same thread count, their runs interleaved. fastlm's model is prepared
as fastlm.generate.decode.load prepares it (CPU Linear weights packed, fastlm.packed_linear; --no-pack
measures without); transformers runs its model as from_pretrained gives it. Method, identical
for both providers: time a generation of 1 new token (= prefill + one sampling step) and one of
1 + N new tokens, each the median of --repeats runs; prefill tokens/s = B * prompt / t(1),
decode tokens/s = B * N / (t(1 + N) - t(1)). Subtracting t(1) leaves only the N cached decode
steps. transformers runs with
min_new_tokens = max_new_tokens so neither side stops early.

The server row starts fastlm.serve in-process on 127.0.0.1 (continuous batching, one slot per
client) and counts the tokens that --server-clients concurrent streaming clients receive per
second of wall time; every answer must arrive complete.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time

import torch
from fastlm.bench import utils

from fastlm.config import model_preset
from fastlm.export.hf import export_hf
from fastlm.generate.decode import BatchDecoder, SamplingParams
from fastlm.models.gpt import GPT
from fastlm.models.packed_linear import pack_linears

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _seconds(fn) -> float:
    t0 = _clock()
    fn()
    return _clock() - t0


def fastlm_run(model: GPT, prompts: torch.Tensor, new: int):
    def run():
        dec = BatchDecoder(model, prompts.tolist(), SamplingParams(max_new_tokens=new,
                                                                   temperature=0))
        while not dec.done:
            dec.step()
    return run


def hf_run(hf, prompts: torch.Tensor, new: int):
    mask = torch.ones_like(prompts)

    def run():
        with torch.no_grad():
            hf.generate(prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
    return run


def measure(makers: dict, prompts: torch.Tensor, new: int, repeats: int) -> list[dict]:
    """One row per provider. The providers' runs are interleaved (A1 B1 AN BN, repeated) so a
    load change on a shared machine hits every provider alike; the first round is warm-up."""
    B, P = prompts.shape
    runs = {name: (make(prompts, 1), make(prompts, 1 + new)) for name, make in makers.items()}
    times: dict[str, tuple[list, list]] = {name: ([], []) for name in makers}
    for r in range(repeats + 1):
        for name, (first, total) in runs.items():
            t1, tn = _seconds(first), _seconds(total)
            if r:
                times[name][0].append(t1)
                times[name][1].append(tn)
    rows = []
    for name, (t1s, tns) in times.items():
        t1, tn = statistics.median(t1s), statistics.median(tns)
        rows.append({"provider": name, "batch": B, "prompt": P, "new_tokens": new,
                     "prefill_tokens_per_s": B * P / t1,
                     "decode_tokens_per_s": B * new / (tn - t1) if tn > t1 else float("nan"),
                     "t_first_s": t1, "t_total_s": tn})
    return rows


def server_throughput(model: GPT, clients: int, new: int) -> dict:
    import socket
    import threading
    from pathlib import Path

    import httpx
    import uvicorn

    from fastlm.restore import Meta, Restored
    from fastlm.serve import Limits, create_app
    from fastlm.tokenizer import Tokenizer

    lm = Restored(model, Tokenizer.byte(), Meta(Path("bench"), {}))
    app = create_app(lm, limits=Limits(max_concurrency=clients, max_queue=clients,
                                       max_tokens=new))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def one(i: int) -> int:
        body = {"prompt": f"client {i} says", "max_tokens": new, "temperature": 0.8,
                "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        n = 0
        with httpx.stream("POST", url, json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    n = usage["completion_tokens"] if usage else n
        return n

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(one, range(clients)))
    dt = time.perf_counter() - t0
    server.should_exit = True
    thread.join(timeout=10)
    return {"provider": "fastlm.serve", "clients": clients, "tokens": sum(counts),
            "complete": sum(c == new for c in counts), "aggregate_tokens_per_s": sum(counts) / dt,
            "wall_s": dt, "max_rows_decoded_together": app.state.engine.max_rows_seen,
            "clock": "wall"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlm.bench.bench_generate")
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=32, help="decoded tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-clients", type=int, default=16, help="0 = skip the server row")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights and activations of both providers")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--backend", default="", help="fastlm.ops backend spec for fastlm's rows, "
                    "e.g. attention=torch (default: the dispatch table)")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                    help="wall: perf_counter; cpu: this process's CPU time (process_time), which "
                    "leaves out the time other processes held the cores of a shared machine "
                    "(use with --threads 1; the server row is always wall time)")
    ap.add_argument("--no-pack", action="store_true", help="fastlm without packed Linear "
                    "weights (what load(pack=False) gives)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock
    _clock = CLOCKS[args.clock]
    if args.backend:
        from fastlm import ops
        ops.set_backend(args.backend)
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = GPT(model_preset(args.preset)).eval().to(device)
    env = {**utils.environment(device), "preset": args.preset, "fastlm_backend": args.backend,
           "dtype": args.dtype, "clock": args.clock}
    hf = None
    if not args.no_hf:
        try:
            import transformers
        except ImportError:
            print("transformers not installed: skipping its rows", file=sys.stderr)
        else:
            with tempfile.TemporaryDirectory() as d:
                export_hf(model, d)
                hf = transformers.AutoModelForCausalLM.from_pretrained(
                    d, local_files_only=True).eval().to(device, dtype)
    model.to(dtype)
    env["fastlm_packed_linears"] = 0 if args.no_pack else pack_linears(model)
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(0, model.config.vocab_size, (B, args.prompt))
        makers = {"fastlm": lambda p, n: fastlm_run(model, p, n)}
        if hf is not None:
            makers["transformers"] = lambda p, n: hf_run(hf, p.to(device), n)
        pair = measure(makers, prompts, args.new, args.repeats)
        if hf is not None:
            pair[0]["decode_speedup_vs_transformers"] = (pair[0]["decode_tokens_per_s"]
                                                         / pair[1]["decode_tokens_per_s"])
        rows += pair
    for r in rows:
        extra = (f"  {r['decode_speedup_vs_transformers']:.2f}x transformers decode"
                 if "decode_speedup_vs_transformers" in r else "")
        print(f"{r['provider']:<13} B={r['batch']:<2} prompt={r['prompt']}  prefill "
              f"{r['prefill_tokens_per_s']:8.1f} tok/s  decode {r['decode_tokens_per_s']:7.1f} "
              f"tok/s{extra}")
    if args.server_clients:
        srv = server_throughput(model, args.server_clients, args.new)
        rows.append(srv)
        print(f"fastlm.serve  {srv['clients']} streaming clients: {srv['complete']}/"
              f"{srv['clients']} complete, {srv['aggregate_tokens_per_s']:.1f} tok/s aggregate")
        if srv["complete"] != srv["clients"]:
            print("fastlm.serve: some answers arrived incomplete", file=sys.stderr)
            return 1
    for r in rows:
        r.update({k: v for k, v in env.items() if k not in r})  # the server row keeps its clock
    if args.json:
        utils.write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
