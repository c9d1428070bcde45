"""The repository root is on sys.path whenever Python or pytest starts there; nothing at the top
of the repository may then hide another distribution's module. kernels/ (Triton) and bench/
install as fastlm.kernels and fastlm.bench: imported under their bare names they step aside
(Hugging Face's `kernels` is imported by transformers whenever it loads a model)."""
import importlib.metadata
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders that install inside the package and hand their bare name over (fastlm/_no_shadow.py).
HANDED_OVER = ("kernels", "bench")


def run_at_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def root_module_names() -> list[str]:
    """Every regular module or package a bare `import NAME` finds at the repository root
    (folders without __init__.py are namespace portions, which any regular module outranks)."""
    names = []
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py") and os.path.isfile(path):
            names.append(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")) and entry.isidentifier():
            names.append(entry)
    return sorted(names)


def test_root_names_are_found():
    assert {"fastlm", "kernels", "bench", "tests", "setup"} <= set(root_module_names())


def test_no_installed_distribution_shares_a_root_name():
    owners = importlib.metadata.packages_distributions()
    clashes = {name: owners[name] for name in root_module_names()
               if name in owners and name not in HANDED_OVER
               and set(owners[name]) != {"fastlm"}}
    assert not clashes, (
        f"installed distributions provide top-level modules that the repository root shadows: "
        f"{clashes}; rename the repository's module or make it hand its name over")


def test_bare_kernels_at_root_is_not_fastlms():
    done = run_at_root("import kernels; print(kernels.__file__)")
    if done.returncode == 0:
        ours = os.path.join(ROOT, "kernels") + os.sep
        assert not os.path.abspath(done.stdout.strip()).startswith(ours), done.stdout
    else:
        assert "No module named 'kernels'" in done.stderr, done.stderr
        assert "fastlm.kernels" in done.stderr, done.stderr


def test_an_owned_bare_name_is_handed_over(tmp_path):
    """bench/ steps aside too when some distribution owns the name `bench`."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("OWNER = 'another distribution'\n")
    done = run_at_root(f"import sys; sys.path.append({str(tmp_path)!r}); import bench; "
                       "print(bench.OWNER)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "another distribution"


def test_bare_kernels_without_another_owner_fails_cleanly():
    done = run_at_root("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
                       "import kernels")
    assert done.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in done.stderr, done.stderr


def test_bare_bench_without_another_owner_stays_so_pytest_collects_it():
    done = run_at_root("import bench; print(bench.__file__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == os.path.join(ROOT, "bench", "__init__.py")
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                                "-p", "no:cacheprovider", "bench/test_kernels.py"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    # 5: pytest-benchmark is not installed (the dev extra), so the module skips itself
    assert collected.returncode in (0, 5), collected.stdout[-2000:]
    assert "error" not in collected.stdout.lower(), collected.stdout[-2000:]


def test_hugging_face_kernels_at_root_is_the_real_one():
    importlib.metadata.version("kernels")  # transformers depends on it: the test extras bring it
    done = run_at_root("import kernels; print(kernels.__file__); kernels.CUDAProperties")
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout


def test_fastlm_kernels_still_import_under_the_package():
    done = run_at_root("import fastlm.kernels as k, fastlm.bench.utils as u; "
                       "print(k.__file__); print(u.__file__); print(sorted(k.__dict__))")
    assert done.returncode == 0, done.stderr
    kernels_file, bench_file, names = done.stdout.splitlines()
    assert kernels_file == os.path.join(ROOT, "kernels", "__init__.py")
    assert bench_file == os.path.join(ROOT, "bench", "utils.py")
    assert "attention" in names


def test_transformers_loads_a_model_at_the_root(tmp_path):
    code = f"""
import torch, transformers
cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
transformers.GPT2LMHeadModel(cfg).save_pretrained({str(tmp_path)!r})
model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
print(model(torch.tensor([[1, 2, 3]])).logits.shape)
"""
    done = run_at_root(code)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 3, 64])" in done.stdout
