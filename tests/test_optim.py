"""fastlm.optim: AdamW against torch.optim.AdamW (both adamw_step backends), state-dict
compatibility both ways, and the weight-decay parameter groups."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fastlm.ops
from fastlm.config import model_preset
from fastlm.models.gpt import GPT
from fastlm.optim import AdamW, param_groups

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(17, 5), (5,), (3, 4, 7), (1,)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def groups(params):
    # Two groups with different weight decay, as param_groups builds them.
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def run(opt, params, steps, seed=1, skip_first=()):
    """`steps` updates with fresh random gradients; params in skip_first get no grad at step 0."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g)
            p.grad = None if (step == 0 and i in skip_first) else grad
        opt.step()


@pytest.mark.parametrize("backend", fastlm.ops.available_backends("adamw_step", "cpu"))
def test_matches_torch_adamw(backend):
    fastlm.ops.set_backend(f"adamw_step={backend}")
    ours, theirs = make_params(), make_params()
    run(AdamW(groups(ours), **HYPER), ours, 20, skip_first={1})
    run(torch.optim.AdamW(groups(theirs), **HYPER, foreach=False), theirs, 20, skip_first={1})
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_loads_into_torch_adamw_and_back():
    ours, theirs = make_params(), make_params()
    opt = AdamW(groups(ours), **HYPER)
    run(opt, ours, 5)
    state = opt.state_dict()
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["state"][0]["step"].dtype == torch.float32  # as torch keeps it
    # Continue the same trajectory in torch's AdamW from our state, and in ours.
    with torch.no_grad():
        for a, b in zip(theirs, ours):
            a.copy_(b)
    torch_opt = torch.optim.AdamW(groups(theirs), **HYPER, foreach=False)
    torch_opt.load_state_dict(copy.deepcopy(state))  # as if through a file: no shared tensors
    run(opt, ours, 5, seed=2)
    run(torch_opt, theirs, 5, seed=2)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # And torch's state dict loads into ours.
    again = AdamW(groups(make_params()), **HYPER)
    again.load_state_dict(torch_opt.state_dict())
    assert int(again.state_dict()["state"][0]["step"]) == 10


def test_rejects_bad_hyperparameters_and_torch_only_features():
    p = make_params()
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW(p, lr=-1)
    with pytest.raises(ValueError, match=r"betas must be in \[0, 1\)"):
        AdamW(p, betas=(0.9, 1.0))
    opt = AdamW(p)
    opt.param_groups[0]["amsgrad"] = True
    run_it = lambda: run(opt, p, 1)
    with pytest.raises(ValueError, match="amsgrad and maximize are not supported"):
        run_it()


def test_param_groups_split_decay():
    for preset in ("tiny", "tiny-llama"):
        model = GPT(dataclasses.replace(model_preset(preset), n_layer=2))
        decay, no_decay = param_groups(model, 0.1)
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        names = {id(p): n for n, p in model.named_parameters()}  # tied weight: first name
        decayed = {names[id(p)] for p in decay["params"]}
        kept = {names[id(p)] for p in no_decay["params"]}
        assert not decayed & kept
        assert decayed | kept == set(names.values())  # every parameter exactly once
        assert all(n.endswith("weight") and "norm" not in n and "wte" not in n and "wpe" not in n
                   for n in decayed)
        assert "wte.weight" in kept and all(n in kept for n in names.values()
                                            if "norm" in n or n.endswith("bias"))
        assert "blocks.0.attn.qkv.weight" in decayed and "blocks.1.mlp.down.weight" in decayed
        if preset == "tiny-llama":
            assert "lm_head.weight" in decayed  # untied output head is a linear layer
