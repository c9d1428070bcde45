"""Generation benchmark: prefill and decode tokens/s of fastlm's KV-cache decoder against
transformers' generate and llama.cpp on the exported copies of the same model, and the server's
aggregate streaming throughput.

    python -m fastlm.bench.bench_generate [--preset gpt2-124m] [--batches 1,8] [--prompt 64]
        [--new 32] [--server-clients 16] [--dtype float32] [--threads 1,2] [--clock cpu]
        [--llama-cpp auto|none|f32,f16,bf16,q8_0] [--json PATH]

bench/results/cpu-amd-epyc/generate-gpt2-124m-<dtype>.json: --threads 1 --repeats 5 --clock
cpu --server-clients 16 on the shared 2-core machine.

Weights are random (speed does not depend on them); every provider runs greedy on the same
prompts with the same thread count, their runs interleaved. fastlm's model is prepared
as fastlm.generate.decode.load prepares it (CPU Linear weights packed, fastlm.packed_linear; --no-pack
measures without); transformers runs its model as from_pretrained gives it, in --dtype.

llama.cpp (llama-cpp-python) runs fastlm's GGUF export (fastlm.export.gguf, f32) and the f16,
bf16 and q8_0 files llama.cpp's own quantizer (llama_model_quantize) makes from it; its KV
cache is kept in the weights' precision (f32, f16, bf16; f16 for q8_0). Equal precision:
fastlm float32 = f32, bfloat16 = bf16, float16 = f16; q8_0 has no fastlm counterpart. It
decodes through the low-level API: one context with n_seq_max = B, one llama_decode per step
holding one token of each of the B sequences (the batched decoding of llama.cpp's
llama-batched / server), the prompts' prefill as one llama_decode; greedy = argmax of the
logits in numpy. llama_print_system_info() goes into every row: which CPU features the
installed ggml build uses.

Method, identical for every provider: time a generation of 1 new token (= prefill + one
sampling step) and one of 1 + N new tokens, each the median of --repeats runs; prefill
tokens/s = B * prompt / t(1), decode tokens/s = B * N / (t(1 + N) - t(1)). Subtracting t(1)
leaves only the N cached decode steps. transformers runs with min_new_tokens = max_new_tokens
so no provider stops early. Rows: one per (provider, precision, batch, threads).

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

import numpy as np
import torch
from fastlm.bench import utils

from fastlm.config import model_preset
from fastlm.export.hf import export_hf
from fastlm.generate.decode import BatchDecoder, ContinuousDecoder, SamplingParams
from fastlm.models.gpt import GPT
from fastlm.models.packed_linear import pack_linears
from fastlm.tokenizer import Tokenizer

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


def fastlm_continuous_run(model: GPT, prompts: torch.Tensor, new: int):
    """The server's decoder: rows join one by one (each prefilled alone), then every step
    decodes all of them together (fastlm.generate.decode.ContinuousDecoder), text streamed
    through the byte tokenizer as a server's is (so only ids < 256 are drawn)."""
    B, P = prompts.shape
    rows = prompts.tolist()
    tokenizer = Tokenizer.byte()

    def run():
        dec = ContinuousDecoder(model, tokenizer, B, P + new + 1)
        for r, p in enumerate(rows):
            dec.add(p, SamplingParams(max_new_tokens=new, temperature=0), r)
        while dec.active:
            dec.step()
    return run


def hf_run(hf, prompts: torch.Tensor, new: int):
    mask = torch.ones_like(prompts)

    def run():
        with torch.no_grad():
            hf.generate(prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
    return run


# ---------------------------------------------------------------------------------------------
# llama.cpp through llama-cpp-python's low-level API (the high-level Llama decodes one sequence)
# GGUF type -> (llama_ftype that llama_model_quantize writes from the f32 export, or None for the
# export itself; ggml type of the KV cache: the weights' precision, q8_0 keeps llama.cpp's f16)
GGUF_TYPES = {"f32": (None, 0), "f16": (1, 1), "bf16": (32, 30), "q8_0": (7, 1)}
# fastlm --dtype -> the GGUF type of equal precision (weights, activations and KV cache alike)
EQUAL_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
KV_NAMES = {0: "f32", 1: "f16", 30: "bf16"}


def gguf_files(model: GPT, types: list[str], out_dir: str) -> dict[str, str]:
    """model exported to GGUF f32 by fastlm.export, converted by llama.cpp's own quantizer to
    the other types -> {type: path}."""
    import llama_cpp

    from fastlm.export.gguf import export_gguf
    from fastlm.tokenizer import Tokenizer

    bad = [t for t in types if t not in GGUF_TYPES]
    if bad:
        raise ValueError(f"--llama-cpp: unknown GGUF type(s) {bad}; choose from "
                         f"{', '.join(GGUF_TYPES)}")
    f32 = str(export_gguf(model, out_dir, Tokenizer.byte()))  # model: float32
    paths = {}
    for t in types:
        ftype = GGUF_TYPES[t][0]
        if ftype is None:
            paths[t] = f32
            continue
        paths[t] = f"{out_dir}/model-{t}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        if llama_cpp.llama_model_quantize(f32.encode(), paths[t].encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize to {t} failed")
    return paths


class LlamaCpp:
    """A GGUF model in llama.cpp with a context for `batch` parallel sequences of up to
    `seq_len` tokens: greedy decoding of a (B, P) prompt batch, one llama_decode per step with
    one token per sequence (what llama.cpp's own batched decoding does)."""

    def __init__(self, path: str, gguf_type: str, batch: int, seq_len: int, threads: int):
        import llama_cpp as L
        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = batch * seq_len
        cp.n_batch = cp.n_ubatch = batch * seq_len
        cp.n_seq_max = batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = GGUF_TYPES[gguf_type][1]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = L.llama_batch_init(batch * seq_len, 0, 1)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """tokens: (id, position, sequence, wants logits) -> logits (n_wanted, V) float32."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (t, pos, seq, out) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos, 1, out
            b.seq_id[i][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        n = sum(out for *_, out in tokens)
        return np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(n, self.n_vocab))

    def generate(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        """Greedy: `new` ids per prompt (prompts of equal length)."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        P = len(prompts[0])
        last = self._decode([(t, j, r, j == P - 1) for r, p in enumerate(prompts)
                             for j, t in enumerate(p)]).argmax(axis=1)  # prefill
        out = [[int(t)] for t in last]
        for step in range(new - 1):
            last = self._decode([(int(t), P + step, r, True) for r, t in enumerate(last)]
                                ).argmax(axis=1)
            for r, t in enumerate(last):
                out[r].append(int(t))
        return out

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def llama_cpp_info() -> dict:
    """llama-cpp-python's version and the CPU features its ggml build uses."""
    import llama_cpp
    return {"version": llama_cpp.__version__, "path": llama_cpp.__file__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def llama_cpp_run(llm: LlamaCpp, prompts: torch.Tensor, new: int):
    rows = prompts.tolist()
    return lambda: llm.generate(rows, new)


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


def _llama_cpp_types(spec: str, dtype: str) -> list[str]:
    if spec == "none":
        return []
    return [EQUAL_PRECISION[dtype] if t == "auto" else t for t in spec.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlm.bench.bench_generate")
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=32, help="decoded tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-clients", type=int, default=16, help="0 = skip the server row")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--llama-cpp", default="auto", help="GGUF types llama.cpp runs, comma "
                    f"separated from {', '.join(GGUF_TYPES)}; auto = the one of --dtype's "
                    "precision (f32 / bf16 / f16); none = skip llama.cpp")
    ap.add_argument("--continuous", action="store_true", help="also fastlm's continuous-batching "
                    "decoder (the server's), at batches > 1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights and activations of fastlm and transformers")
    ap.add_argument("--threads", default="0", help="thread counts to measure, comma separated "
                    "(torch's and llama.cpp's; 0 = torch's default)")
    ap.add_argument("--backend", default="", help="fastlm.ops backend spec for fastlm's rows, "
                    "e.g. attention=torch (default: the dispatch table)")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                    help="wall: perf_counter; cpu: this process's CPU time (process_time), which "
                    "leaves out the time other processes held the cores of a shared machine "
                    "(only with --threads 1; the server row is always wall time)")
    ap.add_argument("--no-pack", action="store_true", help="fastlm without packed Linear "
                    "weights (what load(pack=False) gives)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    threads_list = [int(t) for t in args.threads.split(",")]
    if args.clock == "cpu" and threads_list != [1]:
        ap.error("--clock cpu adds up the CPU time of every thread: use it with --threads 1")
    global _clock
    _clock = CLOCKS[args.clock]
    if args.backend:
        from fastlm import ops
        ops.set_backend(args.backend)
    device = torch.device(args.device)
    gguf_types = _llama_cpp_types(args.llama_cpp, args.dtype)
    if gguf_types and device.type != "cpu":
        ap.error("llama.cpp runs on the CPU here: pass --llama-cpp none on a GPU")
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
    gguf_dir = tempfile.TemporaryDirectory()
    gguf_paths = {}
    if gguf_types:
        import logging

        import llama_cpp._logger  # noqa: F401  installs the callback the level below quiets
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        env["llama_cpp"] = llama_cpp_info()
        gguf_paths = gguf_files(model, gguf_types, gguf_dir.name)  # from the float32 weights
    model.to(dtype)
    env["fastlm_packed_linears"] = 0 if args.no_pack else pack_linears(model)
    rows = []
    for threads in threads_list:
        if threads:
            torch.set_num_threads(threads)
        n_threads = torch.get_num_threads()
        for B in (int(b) for b in args.batches.split(",")):
            prompts = torch.randint(0, model.config.vocab_size, (B, args.prompt))
            makers = {"fastlm": lambda p, n: fastlm_run(model, p, n)}
            precision = {"fastlm": args.dtype}
            if args.continuous and B > 1:
                makers["fastlm.continuous"] = lambda p, n: fastlm_continuous_run(model, p, n)
                precision["fastlm.continuous"] = args.dtype
            if hf is not None:
                makers["transformers"] = lambda p, n: hf_run(hf, p.to(device), n)
                precision["transformers"] = args.dtype
            llms = {t: LlamaCpp(gguf_paths[t], t, B, args.prompt + args.new + 1, n_threads)
                    for t in gguf_types}
            for t, llm in llms.items():
                makers[f"llama.cpp-{t}"] = lambda p, n, llm=llm: llama_cpp_run(llm, p, n)
                precision[f"llama.cpp-{t}"] = f"{t} (KV cache {KV_NAMES[GGUF_TYPES[t][1]]})"
            group = measure(makers, prompts, args.new, args.repeats)
            for llm in llms.values():
                llm.close()
            ours = group[0]["decode_tokens_per_s"]
            for r in group:
                engine = "fastlm" if r["provider"].startswith("fastlm") else r["provider"].split("-")[0]
                r.update(engine=engine, precision=precision[r["provider"]],
                         threads=n_threads)
                if r["engine"] != "fastlm":
                    r["fastlm_decode_speedup"] = ours / r["decode_tokens_per_s"]
            if hf is not None:
                group[0]["decode_speedup_vs_transformers"] = next(
                    r["fastlm_decode_speedup"] for r in group if r["provider"] == "transformers")
            rows += group
    gguf_dir.cleanup()
    for r in rows:
        extra = (f"  fastlm {r['fastlm_decode_speedup']:.2f}x" if "fastlm_decode_speedup" in r
                 else "")
        print(f"{r['provider']:<16} {r['precision']:<22} B={r['batch']:<2} threads="
              f"{r['threads']} prompt={r['prompt']}  prefill {r['prefill_tokens_per_s']:8.1f} "
              f"tok/s  decode {r['decode_tokens_per_s']:7.1f} tok/s{extra}")
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
