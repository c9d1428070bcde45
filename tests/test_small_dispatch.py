"""ops.SMALL_DISPATCH: calls an op reports as small try other backends first, but only when nothing
is forced (argument, FASTLM_BACKEND, config); linear_cross_entropy's rule is the size of the
float32 logits."""
from __future__ import annotations

import pytest
import torch

import fastlm.ops.api
from fastlm import ops
from fastlm.ops import native

CPU = torch.device("cpu")
needs_native = pytest.mark.skipif(native.NATIVE_ERROR is not None,
                                  reason=f"fastlm._C not built: {native.NATIVE_ERROR}")


@needs_native
def test_small_rows_come_first_only_when_nothing_is_forced(monkeypatch):
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    op = "linear_cross_entropy"
    assert ops.select_backend(op, CPU, small=True) == "torch"
    assert ops.select_backend(op, CPU) == ops.DISPATCH[op]["cpu"][0]
    assert ops.select_backend(op, CPU, "cpu", small=True) == "cpu"  # the argument wins
    monkeypatch.setenv("FASTLM_BACKEND", "cpu")
    assert ops.select_backend(op, CPU, small=True) == "cpu"  # so does the environment
    assert ops.select_backend("layer_norm", CPU, small=True) == "cpu"  # no rule for this op


@needs_native
def test_linear_cross_entropy_takes_the_materialised_path_for_small_logits(monkeypatch):
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    native_calls = []
    real = ops.native_op

    def spy(op, backend, direction="fwd"):
        native_calls.append((op, backend))
        return real(op, backend, direction)

    monkeypatch.setattr(fastlm.ops.api, "native_op", spy)
    D = 16
    small_v = ops.SMALL_LOGITS_BYTES // (4 * 64)  # N=64 rows: exactly at the limit
    for V, chunk_rows, expect_native in ((small_v, None, False), (small_v + 1, None, True),
                                         (small_v, 32, True)):  # chunk_rows asks for chunks
        native_calls.clear()
        h = torch.randn(64, D, requires_grad=True)
        w = (0.1 * torch.randn(V, D)).requires_grad_()
        t = torch.randint(0, V, (64,))
        loss = ops.linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)
        loss.backward()
        ref = torch.nn.functional.cross_entropy(h.detach() @ w.detach().t(), t)
        torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)
        assert bool(native_calls) == expect_native, (V, chunk_rows, native_calls)
