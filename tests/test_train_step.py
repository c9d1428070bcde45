"""fastlm.train.step.TrainStep on its own: accumulation gives one big batch's update, clipping,
NaN/inf steps skipped with the parameters untouched, the fp16 scaler's own skips, autocast per
precision and DDP's no_sync on all but the last micro-batch."""
import contextlib

import pytest
import torch
from torch import nn

from fastlm.train.step import TrainStep, precision_context

CPU = torch.device("cpu")


def linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def mse(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def data(rows: int = 8):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(rows, 4, generator=gen), torch.randn(rows, 3, generator=gen)


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_accumulated_micro_batches_update_like_one_big_batch():
    x, y = data(8)
    big, small = linear(), linear()
    one = TrainStep(big, torch.optim.SGD(big.parameters(), lr=0.1), device=CPU)
    four = TrainStep(small, torch.optim.SGD(small.parameters(), lr=0.1), device=CPU, accum=4)
    r1 = one(lambda _: mse(big, x, y))
    r4 = four(lambda i: mse(small, x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]))  # (2, 4) each
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(r1.loss, r4.loss)
    torch.testing.assert_close(r1.grad_norm, r4.grad_norm)
    assert r1.finite and r4.finite
    assert all(p.grad is None for p in small.parameters())  # cleared for the next step


def test_clipping_scales_the_update_to_grad_clip_and_reports_the_norm_before():
    x, y = data()
    for clip in (0.0, 0.05):
        model = linear()
        before = params(model)
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), device=CPU,
                         grad_clip=clip)
        result = step(lambda _: mse(model, x, y) * 10)
        moved = torch.cat([(b - p.detach()).flatten()
                           for b, p in zip(before, model.parameters())]).norm()
        assert result.grad_norm > 0.05  # so the clip bites
        expected = result.grad_norm if clip == 0 else torch.tensor(clip)
        torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_nan_loss_skips_the_update_and_leaves_parameters_unchanged(precision):
    x, y = data()
    model = linear()
    before = params(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    step = TrainStep(model, optimizer, device=CPU, precision=precision, grad_clip=1.0)
    result = step(lambda _: mse(model, x, y) * float("nan"))
    assert not result.finite and not torch.isfinite(result.loss)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p) and p.grad is None
    assert not optimizer.state  # AdamW never stepped: no moments, no step count
    assert step(lambda _: mse(model, x, y)).finite  # the next good step updates
    assert not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_an_inf_gradient_norm_is_a_bad_step_too():
    x, y = data()
    model = linear()
    before = params(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), device=CPU)
    w = model.weight[0, 0]
    # sqrt at 0: the loss is finite, its gradient infinite
    result = step(lambda _: mse(model, x, y) + torch.sqrt(w - w.detach()))
    assert torch.isfinite(result.loss) and not torch.isfinite(result.grad_norm)
    assert not result.finite
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_fp16_overflow_is_the_scalers_skip_not_a_bad_step():
    model = linear()
    before = params(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), device=CPU,
                     precision="fp16")
    scale = step.scaler.get_scale()
    # A finite loss whose scaled gradient overflows: the scaler skips and halves its scale.
    result = step(lambda _: model.weight.float().sum() * 1e36)
    assert result.finite  # not counted as bad: this is how the scaler finds its scale
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert step.scaler.get_scale() == scale / 2
    x, y = data()
    assert step(lambda _: mse(model, x, y)).finite
    assert not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_each_micro_batch_runs_under_the_precisions_autocast(precision, dtype):
    x, y = data()
    model = linear()
    seen = []

    def micro_loss(_):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     model(x).dtype))
        return mse(model, x, y)

    TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), device=CPU,
              precision=precision, accum=2)(micro_loss)
    assert seen == [(True, dtype, dtype)] * 2
    TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), device=CPU)(
        lambda _: seen.append(torch.is_autocast_enabled("cpu")) or mse(model, x, y))
    assert seen[-1] is False
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        precision_context("fp8", CPU)


def test_ddp_no_sync_wraps_every_micro_batch_but_the_last_and_lr_is_set():
    class WithNoSync(nn.Linear):  # DDP's interface: gradients all-reduce outside no_sync
        synced: list[bool] = []
        inside = False

        @contextlib.contextmanager
        def no_sync(self):
            self.inside = True
            yield
            self.inside = False

    torch.manual_seed(0)
    model = WithNoSync(4, 3)
    x, y = data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, optimizer, device=CPU, accum=3)
    step(lambda _: model.synced.append(not model.inside) or mse(model, x, y), lr=0.25)
    assert model.synced == [False, False, True]
    assert optimizer.param_groups[0]["lr"] == 0.25
