"""Test setup shared by every test file.

- TRITON_INTERPRET=1 is set before anything imports triton when no GPU is present, so the Triton
  kernels run (slowly, exactly) on CPU tensors; on a GPU machine they run compiled.
- One CPU thread: stable timings on 2 cores and no oversubscription between pytest workers.
- Every native output is poisoned (NaN-filled) before its kernel writes it, so a forgotten
  element fails the comparison instead of passing on leftover memory.
- `device` fixtures: "cpu" always; "cuda" marked `cuda` and skipped with a reason without a GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastlm.ops.native  # noqa: E402

torch.set_num_threads(1)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    ]),
]


@pytest.fixture(autouse=True, scope="session")
def _poison_native_outputs():
    fastlm.ops.native.set_poison_outputs(True)
    yield
    fastlm.ops.native.set_poison_outputs(False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a developer's FASTLM_BACKEND must not leak in."""
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    import fastlm.ops

    fastlm.ops.set_backend("")
    yield
    fastlm.ops.set_backend("")
