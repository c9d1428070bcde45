"""Backend dispatch: the table, forcing by argument / FASTLM_BACKEND / set_backend, the errors
a user sees when a backend cannot run, and fastlm working without its native module."""
import os
import subprocess
import sys

import pytest
import torch

import fastlm.ops as ops
from fastlm.ops import native


def test_reference_and_torch_always_available():
    for op in ops.IMPLEMENTED:
        assert {"reference", "torch"} <= set(ops.available_backends(op, "cpu"))


def test_native_cpu_backend_built_when_required():
    """CI sets FASTLM_REQUIRE_BACKENDS=cpu,triton: a broken build must fail here, not skip."""
    required = [b for b in os.environ.get("FASTLM_REQUIRE_BACKENDS", "").split(",") if b]
    if not required:
        pytest.skip("FASTLM_REQUIRE_BACKENDS not set")
    for backend in required:
        assert backend in ops.available_backends("layer_norm", "cpu"), \
            ops.unavailable_reason("layer_norm", backend, torch.device("cpu"))


def test_poisoning_is_on_for_tests():
    if native.NATIVE_ERROR is not None:
        pytest.skip(native.NATIVE_ERROR)
    assert torch.ops.fastlm.poison_outputs_enabled()


def test_auto_selection_follows_the_table():
    cpu = torch.device("cpu")
    for op, rows in ops.DISPATCH.items():
        expected = next(b for b in rows["cpu"] + ("reference",)
                        if ops.unavailable_reason(op, b, cpu) is None)
        assert ops.select_backend(op, cpu) == expected
    assert ops.select_backend("layer_norm", torch.device("meta")) == "torch"  # other devices


def test_forced_by_argument_env_and_config(monkeypatch):
    cpu = torch.device("cpu")
    assert ops.select_backend("layer_norm", cpu, "reference") == "reference"
    ops.set_backend("reference")
    assert ops.select_backend("layer_norm", cpu) == "reference"
    monkeypatch.setenv("FASTLM_BACKEND", "rms_norm=reference,torch")
    assert ops.select_backend("layer_norm", cpu) == "torch"  # env beats config
    assert ops.select_backend("rms_norm", cpu) == "reference"  # per-op beats global
    assert ops.select_backend("layer_norm", cpu, "reference") == "reference"  # argument wins


def test_global_choice_applies_only_to_ops_that_have_it(monkeypatch):
    monkeypatch.setenv("FASTLM_BACKEND", "cuda")
    # attention has no cuda backend: the global choice leaves it automatic
    assert ops.select_backend("attention", torch.device("cpu")) == ops.DISPATCH["attention"]["cpu"][0]


def test_forcing_an_unavailable_backend_says_why():
    x, w = torch.randn(2, 4), torch.randn(4)
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' cannot run here:.*CUDA"):
        ops.layer_norm(x, w, backend="cuda")
    with pytest.raises(ops.BackendUnavailableError, match="has no 'cuda' backend"):
        ops.attention(torch.randn(1, 1, 2, 4), *[torch.randn(1, 1, 2, 4)] * 2, backend="cuda")


def test_bad_specs_name_their_source(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.layer_norm(torch.randn(2, 4), torch.randn(4), backend="fast")
    with pytest.raises(ValueError, match="set_backend: unknown op 'layernorm'"):
        ops.set_backend("layernorm=cpu")
    monkeypatch.setenv("FASTLM_BACKEND", "cpu,rms_norm=gpu")
    with pytest.raises(ValueError, match="FASTLM_BACKEND: unknown backend 'gpu'"):
        ops.rms_norm(torch.randn(2, 4), torch.randn(4))
    with pytest.raises(ValueError, match="unknown op"):
        ops.available_backends("softmax", "cpu")


def test_import_without_native_module_still_works():
    """With fastlm._C missing, fastlm imports, warns once with the reason, and falls back."""
    code = ("import sys, warnings; sys.modules['fastlm._C'] = None\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); import fastlm, fastlm.ops as o\n"
            "print(len([x for x in w if 'fastlm._C could not be loaded' in str(x.message)]))\n"
            "import torch; print(o.available_backends('layer_norm', 'cpu'))\n"
            "print(o.layer_norm(torch.randn(2, 4), torch.randn(4)).shape)\n"
            "try: o.layer_norm(torch.randn(2, 4), torch.randn(4), backend='cpu')\n"
            "except o.BackendUnavailableError as e: print('error:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.splitlines()
    assert out[0] == "1"
    assert out[1] == "['reference', 'torch']"
    assert out[2] == "torch.Size([2, 4])"
    assert out[3].startswith("error:") and "pip install --no-build-isolation -e ." in out[3]


def test_attention_torch_matches_reference():
    q = torch.randn(2, 4, 9, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    for causal in (True, False):
        torch.testing.assert_close(ops.attention(q, k, v, causal, backend="torch"),
                                   ops.attention(q, k, v, causal, backend="reference"))
    # decoding: 3 new queries against 9 cached keys (bottom-right aligned), and a window
    torch.testing.assert_close(ops.attention(q[:, :, -3:], k, v, backend="torch"),
                               ops.attention(q, k, v, backend="reference")[:, :, -3:])
    torch.testing.assert_close(ops.attention(q, k, v, window=4, backend="torch"),
                               ops.attention(q, k, v, window=4, backend="reference"))


def test_cross_entropy_torch_matches_reference():
    logits, target = torch.randn(13, 37), torch.randint(0, 37, (13,))
    target[3] = -100
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(ops.cross_entropy(logits, target, reduction=reduction,
                                                     backend="torch"),
                                   ops.cross_entropy(logits, target, reduction=reduction,
                                                     backend="reference"))


def test_adamw_step_backends_agree():
    params = [torch.randn(7, 5), torch.randn(11)]
    results = {}
    for backend in ("reference", "torch"):
        p = [t.clone() for t in params]
        m, v = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p]
        for step in range(1, 6):
            g = [torch.full_like(t, 0.1 * step) + t for t in p]
            ops.adamw_step(p, g, m, v, step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                           weight_decay=0.1, backend=backend)
        results[backend] = p
    for a, b in zip(results["reference"], results["torch"]):
        torch.testing.assert_close(a, b)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_every_op_list_follows_implemented():
    """IMPLEMENTED is the one op list: each op has its pieces (the README's "Adding a kernel"
    recipe) and nothing lists an op it does not have. kernels/__init__ and the benchmarks read
    the table itself; the files and tables below cannot, so they are checked against it."""
    ops_table = ops.IMPLEMENTED
    assert set(ops.DISPATCH) == set(ops_table)
    assert set(ops.SMALL_DISPATCH) <= set(ops_table)
    registration, readme = read("csrc/registration.cpp"), read("README.md")
    for op, backends in ops_table.items():
        assert callable(getattr(ops, op)) and callable(getattr(ops.reference, op)), op
        for path in (f"tests/test_{op}.py", f"bench/bench_{op}.py"):
            assert os.path.isfile(os.path.join(ROOT, path)), path
        assert f"| `{op}(" in readme, f"README's ops table has no row for {op}"
        native_files = {"cpu": f"csrc/{op}/{op}_cpu.cpp", "cuda": f"csrc/{op}/{op}_cuda_glue.cpp",
                        "triton": f"kernels/{op}.py"}
        for backend, path in native_files.items():
            assert os.path.isfile(os.path.join(ROOT, path)) == (backend in backends), \
                f"{op}: IMPLEMENTED says {backends}, but {path} " + \
                ("is missing" if backend in backends else "exists")
        if {"cpu", "cuda"} & set(backends):
            assert f'm.def("{op}' in registration, f"csrc/registration.cpp: no schema of {op}"
    kernel_modules = {f[:-3] for f in os.listdir(os.path.join(ROOT, "kernels"))
                      if f.endswith(".py") and f not in ("__init__.py", "utils.py")}
    assert kernel_modules == {op for op, b in ops_table.items() if "triton" in b}


def test_every_schema_is_in_registration_cpp():
    """One file holds every op schema: no other C++ source defines a torch library fragment."""
    for dirpath, _, names in os.walk(os.path.join(ROOT, "csrc")):
        for name in names:
            path = os.path.join(dirpath, name)
            if name.endswith((".cpp", ".cu", ".h", ".cuh")) and name != "registration.cpp":
                text = read(path)
                assert "TORCH_LIBRARY(" not in text and "TORCH_LIBRARY_FRAGMENT" not in text, path
