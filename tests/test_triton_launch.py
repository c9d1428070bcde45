"""Every Triton launch runs on its tensors' device (issue 23, item 6).

Triton launches on the current CUDA device, so a launcher must enter kernels.utils.on_device(
tensor.device) around its launches: tensors on cuda:1 while cuda:0 is current would otherwise go
to a kernel on the wrong GPU. Without a GPU this is checked under the interpreter: on_device is
replaced by a recorder, and every kernel run (InterpretedFunction.run, which autotuned kernels
reach too) must happen inside it, with the inputs' device.
"""
import contextlib

import pytest
import torch

import fastlm.ops as ops
from tests.utils import randn

@pytest.fixture
def launches(monkeypatch):
    """[(kernel name, device entered or None)] for every kernel run during the test."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from fastlm.kernels import utils

    entered, runs = [], []

    @contextlib.contextmanager
    def recorder(device):
        entered.append(device)
        try:
            yield
        finally:
            entered.pop()

    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        runs.append((self.fn.__name__, entered[-1] if entered else None))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(utils, "on_device", recorder)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    return runs


def _every_op():
    """One small forward + backward (or step) of each Triton op on CPU tensors."""
    x = randn(3, 40, requires_grad=True)
    w = randn(40, requires_grad=True)
    ops.layer_norm(x, w, randn(40, requires_grad=True), backend="triton").sum().backward()
    ops.rms_norm(x, w, backend="triton").sum().backward()
    target = torch.tensor([1, 5, 39])
    ops.cross_entropy(x, target, backend="triton").backward()
    ops.cross_entropy(x * 1.0, target, backend="triton", inplace_backward=True).backward()
    ops.linear_cross_entropy(x, randn(7, 40, requires_grad=True), torch.tensor([0, 6, 2]),
                             backend="triton").backward()
    q, k, v = (randn(1, 2, 5, 16, requires_grad=True) for _ in range(3))
    ops.attention(q, k, v, True, backend="triton").sum().backward()
    p, g = randn(10), randn(10)
    ops.native_op("adamw_step", "triton", "")([p], [g], [torch.zeros(10)], [torch.zeros(10)],
                                              1.0, 1e-3, 0.9, 0.999, 1e-8, 0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's launches")
def test_every_launch_is_on_the_tensors_device(launches):
    _every_op()
    names = {name for name, _ in launches}
    assert {"_layer_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_ce_fwd_grad_kernel",
            "_attention_bwd_dq_kernel", "_adamw_kernel"} <= names, names
    outside = [(name, device) for name, device in launches if device != torch.device("cpu")]
    assert not outside, f"launched outside on_device(<the tensors' device>): {outside}"


def test_on_device_selects_the_tensors_gpu():
    """The guard itself: cuda:1 tensors make cuda:1 current (built, not entered: no GPU here)."""
    pytest.importorskip("triton")
    from fastlm.kernels import utils

    guard = utils.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(utils.on_device(torch.device("cpu")), contextlib.nullcontext)
