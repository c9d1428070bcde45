"""One stage of bench/gpu_check.sh: steps in priority order under a time budget, results written
as they come into few files, so a stage cut off by the GPU window still leaves what it measured.

    python bench/gpu_check_stage.py --stage a|b|c --out DIR [--smoke] [--budget SECONDS]

Stages (each fits one call of at most 6 minutes on one H100; run a, then b, then c):
  a  build for this GPU only (its compute capability, all cores); the `gpu_subset` tests on the
     GPU (each op x dtype x awkward shape against the reference, forward and backward);
     compute-sanitizer memcheck and racecheck on one small case per native GPU kernel
     (bench/gpu_check_sanitize.py); then, with the time left, the other `cuda` tests.
  b  the kernel benches at one large shape per op (bfloat16 and float32) with their peers,
     each op budgeted, then the DISPATCH rows they propose (python -m fastlm.bench dispatch).
  c  fastlm.profile at gpt2-124m and llama-125m, eager then compiled, and which backend each op
     dispatches to.
--smoke runs the same steps on the CPU at tiny sizes (no build, no sanitizer, no compile).

Files in DIR (at most 7 for all stages together, well within the window's 8 files of 16 MiB):
  summary.json  per stage: environment, every step (command, exit status, seconds, cut off or
                not), test counts and failures, sanitizer errors, the limits check
  summary.md    the same for people, with the tables of b.json and c.json
  a.log b.log c.log  everything the stage's commands printed
  b.json        the kernel bench rows (python -m fastlm.bench --json format)
  c.json        the profile reports
Standard library only at the top: stage a builds fastlm before anything imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_FILES, LIMIT_BYTES, LIMIT_DEPTH = 8, 16 << 20, 2  # what one GPU call brings back
RESERVE_S = 15  # kept back from the budget to write the summary
KERNEL_TEST_FILES = [f"tests/test_{op}.py" for op in (
    "layer_norm", "rms_norm", "cross_entropy", "adamw_step", "attention", "linear_cross_entropy")]
# One shape per op for stage b: the first of each bench's "large" preset on a GPU (attention:
# T x D), tiny ones for the smoke run.
GPU_SHAPES = {"layer_norm": "32768x4096", "rms_norm": "32768x4096",
              "cross_entropy": "8192x50304", "attention": "4096x128",
              "adamw_step": "12x768x50304", "linear_cross_entropy": "8192x768x50304"}
SMOKE_SHAPES = {"layer_norm": "64x32", "rms_norm": "64x32", "cross_entropy": "16x101",
                "attention": "32x16", "adamw_step": "2x8x16", "linear_cross_entropy": "16x8x101"}
# Smoke: the dispatchable providers only (torch.compile on this CPU costs minutes per graph).
SMOKE_PROVIDERS = "torch,torch-fused,fastlm-cpu,fastlm-triton"
# Smoke test selection: the same marker on the CPU device, C++ backend, float32 (the interpreter
# runs the Triton cases at minutes per file on a 2-core machine).
SMOKE_K = "cpu-cpu-torch.float32 and not 50257 and not 32003"


class Stage:
    def __init__(self, name: str, out: str, smoke: bool, budget_s: float):
        self.name, self.out, self.smoke = name, out, smoke
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.py = os.environ.get("PYTHON", sys.executable)
        self.device = "cpu" if smoke else "cuda"
        self.log_path = os.path.join(out, f"{name}.log")
        self.summary_path = os.path.join(out, "summary.json")
        self.record = {"stage": name, "smoke": smoke, "budget_s": budget_s,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "finished": None, "steps": []}
        self.save()

    # -- time
    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    # -- files
    def save(self) -> None:
        summary = read_json(self.summary_path, {})
        summary[self.name] = self.record
        write_json(self.summary_path, summary)
        render_markdown(self.out)

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text + "\n")
        print(text, flush=True)

    # -- steps
    def run(self, name: str, cmd: list[str], timeout: float | None = None, env=None,
            min_s: float = 5) -> dict:
        """Run cmd with its output in the stage log; stop it (SIGINT, so pytest still writes its
        report, then SIGKILL) when its time is up. The step is recorded whatever happens."""
        limit = self.left() if timeout is None else min(timeout, self.left())
        step = {"name": name, "cmd": " ".join(cmd), "rc": None, "seconds": 0.0,
                "timed_out": False, "skipped": None}
        self.record["steps"].append(step)
        if limit < min_s:
            step["skipped"] = f"no time left in the stage budget ({max(limit, 0):.0f} s)"
            self.log(f"=== {name}: skipped, {step['skipped']}")
            self.save()
            return step
        self.log(f"=== {name} (up to {limit:.0f} s): {step['cmd']}")
        start = time.monotonic()
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True, text=True, errors="replace")
            timer = threading.Timer(limit, _stop, (proc, step))
            timer.start()
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    sys.stdout.write(line)
                proc.wait()
            finally:
                timer.cancel()
        step["rc"], step["seconds"] = proc.returncode, round(time.monotonic() - start, 1)
        cut = " (cut off: out of time)" if step["timed_out"] else ""
        self.log(f"=== {name}: exit {proc.returncode} after {step['seconds']} s{cut}")
        self.save()
        return step

    def finish(self) -> int:
        self.record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.record["seconds"] = round(time.monotonic() - self.t0, 1)
        self.record["limits"] = check_limits(self.out)
        self.save()
        failed = [s["name"] for s in self.record["steps"] if s["rc"] not in (0, None)
                  or s["timed_out"]]
        problems = self.record["limits"]["problems"]
        self.log(f"=== stage {self.name}: {self.record['seconds']} s; "
                 f"{'failed or cut off: ' + ', '.join(failed) if failed else 'every step passed'}"
                 f"; files in {self.out}: {self.record['limits']['files']}"
                 f"{'; LIMITS BROKEN: ' + '; '.join(problems) if problems else ''}")
        return 1 if failed or problems else 0


def _stop(proc: subprocess.Popen, step: dict) -> None:
    step["timed_out"] = True
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


# ---------------------------------------------------------------------------------------------
# Files
def read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return default


def write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # a reader never sees half a file


def check_limits(out: str) -> dict:
    """What one GPU call brings back: at most 8 files of 16 MiB, at most two folders down."""
    files, problems = [], []
    for dirpath, _, names in os.walk(out):
        depth = os.path.relpath(dirpath, out).count(os.sep) + (dirpath != out)
        for n in names:
            path = os.path.join(dirpath, n)
            size = os.path.getsize(path)
            files.append(os.path.relpath(path, out))
            if size > LIMIT_BYTES:
                problems.append(f"{files[-1]} is {size / 2**20:.1f} MiB (limit 16)")
            if depth > LIMIT_DEPTH:
                problems.append(f"{files[-1]} is {depth} folders down (limit {LIMIT_DEPTH})")
    if len(files) > LIMIT_FILES:
        problems.append(f"{len(files)} files (limit {LIMIT_FILES})")
    return {"files": len(files), "names": sorted(files), "problems": problems}


def junit_summary(path: str) -> dict:
    """Counts, failures (id and first line of the message) and the slowest tests of a junit
    report; a report that was never written (the run was killed) says so."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"report": f"no junit report ({type(exc).__name__}); see the log"}
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures, times = [], []
    for case in root.iter("testcase"):
        module = case.get("classname", "").rpartition(".")[2]
        test_id = f"tests/{module}.py::{case.get('name')}"
        times.append((float(case.get("time", 0)), test_id))
        bad = next((case.find(k) for k in ("failure", "error") if case.find(k) is not None), None)
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "error"] += 1
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append({"id": test_id, "message": message[0][:300] if message else ""})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures[:200],
            "slowest": [{"id": i, "seconds": round(t, 2)} for t, i in sorted(times)[-5:][::-1]],
            "seconds": round(sum(t for t, _ in times), 1)}


# ---------------------------------------------------------------------------------------------
# Stage a: build, the gpu_subset tests, compute-sanitizer, the other cuda tests
def stage_a(st: Stage) -> None:
    env_json = os.path.join(tempfile.mkdtemp(prefix="gpu-check-"), "env.json")
    st.run("environment", [st.py, "bench/gpu_check_env.py", "--device", st.device,
                           "--json", env_json], timeout=60)
    st.record["environment"] = read_json(env_json, None)
    if not st.smoke:
        cap = (st.record["environment"] or {}).get("capability")
        build_env = {"MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)),
                     "FASTLM_CUDA": "1"}
        if cap:
            build_env["TORCH_CUDA_ARCH_LIST"] = cap  # this GPU only: one arch to compile
        st.record["build_env"] = build_env
        st.run("build", [st.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                         "--no-index", "-e", "."], env=build_env)
    backends_json = env_json + ".backends"
    st.run("backends", [st.py, "bench/gpu_check_env.py", "--device", st.device, "--backends",
                        "--json", backends_json], timeout=60)
    st.record["backends"] = read_json(backends_json, None)
    st.record["tests"] = []
    marker = "gpu_subset and not cuda" if st.smoke else "gpu_subset and cuda"
    select = ["-k", os.environ.get("GPU_CHECK_SMOKE_K", SMOKE_K)] if st.smoke else []
    sanitizer_s = 30 if st.smoke else 100  # kept for the sanitizer, the next priority
    if st.smoke:  # what the GPU run would select: the count its time estimate starts from
        st.record["gpu_selection"] = _count(st, "gpu_subset and cuda")
    _pytest(st, "gpu_subset tests", marker, select, timeout=st.left() - sanitizer_s)
    sanitize(st)
    if st.smoke:
        st.record["steps"].append({"name": "other cuda tests", "skipped": "smoke: no GPU",
                                   "rc": None, "seconds": 0.0, "timed_out": False, "cmd": ""})
    else:
        _pytest(st, "other cuda tests", "cuda and not gpu_subset", [], timeout=None)


def _pytest(st: Stage, name: str, marker: str, select: list[str], timeout) -> None:
    xml = os.path.join(tempfile.mkdtemp(prefix="gpu-check-"), "junit.xml")
    files = KERNEL_TEST_FILES if "gpu_subset and" in marker else ["tests/"]
    cmd = [st.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10",
           f"--junitxml={xml}", "-m", marker, *select, *files]
    step = st.run(name, cmd, timeout=timeout)
    if step["skipped"] is None:
        st.record["tests"].append({"name": name, "selection": f"-m '{marker}'"
                                   + (f" -k '{select[1]}'" if select else ""),
                                   **junit_summary(xml)})
        st.save()


def _count(st: Stage, marker: str) -> int | None:
    out = subprocess.run([st.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                          "-m", marker, *KERNEL_TEST_FILES], check=False, cwd=REPO,
                         capture_output=True,
                         text=True, timeout=max(st.left(), 1))
    last = (out.stdout.strip().splitlines() or [""])[-1]  # "558/1941 tests collected (...)"
    st.log(f"=== tests -m '{marker}' would run: {last}")
    head = last.split()[0] if last else ""
    return int(head.split("/")[0]) if head.split("/")[0].isdigit() else None


def sanitize(st: Stage) -> None:
    """compute-sanitizer memcheck and racecheck over one small case per native GPU kernel; in
    the smoke run the same cases run on the CPU without a sanitizer (the plumbing only)."""
    st.record["sanitizer"] = []
    case = [st.py, "bench/gpu_check_sanitize.py", "--device", st.device]
    if st.smoke:
        step = st.run("sanitizer cases (smoke: on the CPU, no sanitizer)", case, timeout=60)
        st.record["sanitizer"].append({"tool": None, "rc": step["rc"], "errors": None})
        st.save()
        return
    for tool in ("memcheck", "racecheck"):
        before = os.path.getsize(st.log_path)
        step = st.run(f"compute-sanitizer {tool}",
                      ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1",
                       "--print-limit=20", *case], timeout=st.left() / 2 if tool == "memcheck"
                      else None)
        with open(st.log_path, errors="replace") as f:
            f.seek(before)
            tail = [ln for ln in f if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
        st.record["sanitizer"].append({"tool": tool, "rc": step["rc"],
                                       "timed_out": step["timed_out"],
                                       "summary": [t.strip() for t in tail]})
        st.save()


# ---------------------------------------------------------------------------------------------
# Stage b: kernel benches, one budgeted shape per op, then the DISPATCH proposal
def stage_b(st: Stage) -> None:
    shapes = SMOKE_SHAPES if st.smoke else GPU_SHAPES
    ops = os.environ.get("GPU_CHECK_OPS", ",".join(shapes)).split(",")
    rows_path = os.path.join(st.out, "b.json")
    rows = read_json(rows_path, [])
    st.record["ops"] = {}
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    for i, op in enumerate(ops):
        part = os.path.join(tmp, f"{op}.json")
        cmd = [st.py, "-m", "fastlm.bench", "--ops", op, "--sizes", shapes[op],
               "--device", st.device, "--json", part]
        if st.smoke:
            cmd += ["--dtypes", "float32", "--budget", "0.01", "--providers", SMOKE_PROVIDERS]
        else:
            cmd += ["--dtypes", "bfloat16,float32", "--budget",
                    os.environ.get("BENCH_BUDGET", "0.2")]
        # A fair share of what is left (an op that finishes early leaves its rest to the next),
        # keeping time for the proposal at the end.
        share = (st.left() - 20) / (len(ops) - i)
        step = st.run(f"bench {op}", cmd, timeout=share)
        got = read_json(part, [])
        rows = [r for r in rows if r.get("op") != op] + got  # a re-run replaces the op's rows
        write_json(rows_path, rows)
        st.record["ops"][op] = {"shape": shapes[op], "rows": len(got),
                                "timed": sum("median_ms" in r for r in got),
                                "seconds": step["seconds"], "timed_out": step["timed_out"]}
        st.save()
    proposal = os.path.join(tmp, "dispatch.json")
    tests = ["--tests", st.summary_path] if read_json(st.summary_path, {}).get("a") else []
    step = st.run("DISPATCH proposal", [st.py, "-m", "fastlm.bench", "dispatch", rows_path,
                                        *tests, "--json", proposal], timeout=60)
    st.record["dispatch"] = read_json(proposal, None)
    st.save()


# ---------------------------------------------------------------------------------------------
# Stage c: the training profile, eager then compiled
def stage_c(st: Stage) -> None:
    presets = os.environ.get("PROFILE_PRESETS", "tiny tiny-llama" if st.smoke
                             else "gpt2-124m llama-125m").split()
    steps = os.environ.get("PROFILE_STEPS", "2" if st.smoke else "20")
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    st.run("dispatch choices", [st.py, "bench/gpu_check_env.py", "--device", st.device,
                                "--backends", "--json", os.path.join(tmp, "dispatch.json")],
           timeout=60)
    st.record["dispatch"] = read_json(os.path.join(tmp, "dispatch.json"), None)
    reports_path = os.path.join(st.out, "c.json")
    reports = read_json(reports_path, [])
    runs = [(p, False) for p in presets] + [(p, True) for p in presets]
    for i, (preset, compiled) in enumerate(runs):
        name = f"profile {preset}{' --compile' if compiled else ''}"
        if compiled and st.smoke:
            st.record["steps"].append({"name": name, "skipped": "smoke: torch.compile on a "
                                       "CPU costs minutes", "rc": None, "seconds": 0.0,
                                       "timed_out": False, "cmd": ""})
            continue
        part = os.path.join(tmp, f"{preset}-{int(compiled)}.json")
        cmd = [st.py, "-m", "fastlm.profile", "--preset", preset, "--device", st.device,
               "--steps", steps, "--json", part] + (["--compile"] if compiled else [])
        if st.smoke:
            cmd += ["--warmup", "1", "--top", "5"]
        todo = len([r for r in runs[i:] if not (r[1] and st.smoke)])
        st.run(name, cmd, timeout=st.left() / todo)
        report = read_json(part, None)
        if report is not None:
            reports = [r for r in reports if (r.get("preset"), r.get("compile"))
                       != (preset, compiled)] + [report]
            write_json(reports_path, reports)
        st.save()


# ---------------------------------------------------------------------------------------------
# summary.md
def render_markdown(out: str) -> None:
    from_summary = read_json(os.path.join(out, "summary.json"), {})
    lines = ["# gpu_check results", ""]
    for name in ("a", "b", "c"):
        rec = from_summary.get(name)
        if not rec:
            continue
        env = rec.get("environment") or {}
        lines += [f"## Stage {name}{' (smoke, CPU)' if rec.get('smoke') else ''}", "",
                  (f"started {rec.get('started')}, finished "
                   f"{rec.get('finished') or 'NOT (cut off)'}, {rec.get('seconds', '?')} s of a "
                   f"{rec.get('budget_s')} s budget"), ""]
        if env:
            lines += [(f"device {env.get('device')}, capability {env.get('capability')}, torch "
                       f"{env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}"),
                      ""]
        lines += ["| step | exit | seconds | note |", "|---|---|---|---|"]
        for s in rec.get("steps", []):
            note = s.get("skipped") or ("cut off" if s.get("timed_out") else "")
            lines.append(f"| {s['name']} | {s.get('rc')} | {s.get('seconds')} | {note} |")
        for t in rec.get("tests", []):
            lines += ["", (f"Tests `{t['selection']}`: {t.get('passed', 0)} passed, "
                           f"{t.get('failed', 0)} failed, {t.get('error', 0)} errors, "
                           f"{t.get('skipped', 0)} skipped {t.get('report', '')}")]
            lines += [f"- FAILED {f['id']}: {f['message']}" for f in t.get("failures", [])[:30]]
        if rec.get("gpu_selection") is not None:
            lines += ["", f"On a GPU, `-m 'gpu_subset and cuda'` selects {rec['gpu_selection']} "
                      + "tests"]
        for s in rec.get("sanitizer", []) or []:
            tool = s["tool"] or "none (smoke: the cases on the CPU)"
            lines.append(f"- sanitizer {tool}: exit {s['rc']} {' '.join(s.get('summary') or [])}")
        if name == "b":
            lines += ["", *bench_table(read_json(os.path.join(out, "b.json"), []))]
            for p in rec.get("dispatch") or []:
                lines.append(f"- DISPATCH {p['op']} {p['device']}: {tuple(p['row'])} "
                             f"(today {tuple(p['current_row'])})")
        if name == "c":
            lines += ["", *profile_table(read_json(os.path.join(out, "c.json"), [])),
                      "", "DISPATCH chooses: "
                      + json.dumps((rec.get("dispatch") or {}).get("chosen"))]
        if rec.get("limits"):
            lines += ["", f"files: {rec['limits']['files']} {rec['limits']['problems'] or 'ok'}"]
        lines.append("")
    tmp = os.path.join(out, "summary.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, os.path.join(out, "summary.md"))


def bench_table(rows: list[dict]) -> list[str]:
    out = ["| op | shape | dtype | mode | provider | median ms | vs torch |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" in r:
            vs = r.get("speedup_vs_torch")
            out.append(f"| {r['op']} | {'x'.join(map(str, r.get('shape', [])))} | {r.get('dtype')}"
                       f" | {r.get('mode')} | {r['provider']} | {r['median_ms']:.4g} | "
                       f"{'' if vs is None else f'{vs:.2f}x'} |")
    return out


def profile_table(reports: list[dict]) -> list[str]:
    out = ["| preset | compile | tokens/s | MFU | peak memory MiB | J/token |",
           "|---|---|---|---|---|---|"]
    for r in reports:
        mfu, mem, j = r.get("mfu"), r.get("peak_memory_bytes"), r.get("energy_j_per_token")
        out.append(f"| {r.get('preset')} | {r.get('compile')} | {r.get('tokens_per_s', 0):.0f} | "
                   f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
                   f"{'-' if mem is None else f'{mem / 2**20:.0f}'} | "
                   f"{'-' if j is None else f'{j:.3g}'} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=("a", "b", "c"))
    p.add_argument("--out", required=True, help="folder for the stage's files (made if missing)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the plumbing only")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the stage (default 330: under 6 minutes with the start)")
    a = p.parse_args(argv)
    budget = a.budget if a.budget is not None else float(os.environ.get("STAGE_BUDGET", "330"))
    if budget <= RESERVE_S:
        p.error(f"--budget must be more than {RESERVE_S} s, got {budget}")
    os.makedirs(a.out, exist_ok=True)
    st = Stage(a.stage, os.path.abspath(a.out), a.smoke, budget)
    {"a": stage_a, "b": stage_b, "c": stage_c}[a.stage](st)
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
