"""Data-parallel training through torchrun: process-group setup from its environment, DDP or
FSDP2 wrapping, and the few collectives the loop needs.

    torchrun --nproc_per_node=8 -m fastlm.train --train.parallel=ddp ...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m fastlm.train --train.parallel=fsdp ...

Without torchrun's variables (WORLD_SIZE unset or 1) everything here is a no-op: one process.
NCCL on CUDA, gloo on CPU (the CPU tests run 2 gloo processes).

FSDP2 (torch.distributed.fsdp.fully_shard) shards every block and then the root; checkpoints
gather the full (unsharded) model and optimizer state onto every rank with
torch.distributed.checkpoint.state_dict (full_state_dict, CPU), rank 0 writes the usual
single-file checkpoint, and a resume loads that full state into the shards: the checkpoint
format does not depend on the world size or on DDP vs FSDP.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (and
    MASTER_ADDR/PORT); a single process when WORLD_SIZE is absent or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each process on its own GPU (LOCAL_RANK) under torchrun."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def wrap(model: nn.Module, info: DistInfo, kind: str, device: torch.device) -> nn.Module:
    """model under DDP or FSDP2 for a multi-process run; unchanged for one process."""
    if not info.enabled:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.checkpoint_units():  # the repeated blocks, one shard unit each
            fully_shard(block)
        fully_shard(model)  # the embeddings, final norm and head, and the root's collectives
        return model
    raise ValueError(f"train.parallel must be ddp or fsdp, got {kind!r}")


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over processes (in place), for logged losses."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the numbering of a plain
    optimizer state dict)."""
    for module in model.modules():  # FSDP2 leaves the root unsharded after a forward
        if hasattr(module, "reshard"):  # without backward (eval): the optimizer holds shards
            module.reshard()
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _renumber(osd: dict, keys: dict) -> dict:
    """An optimizer state dict with its parameter keys mapped through `keys`."""
    if not osd:  # full_state_dict + cpu_offload: ranks other than 0 receive nothing
        return osd
    return {"state": {keys[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [keys[k] for k in g["params"]]}
                             for g in osd["param_groups"]]}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool):
    """(model state, optimizer state) as full tensors on CPU; a collective under FSDP. The
    optimizer state is numbered like a plain optimizer's (torch's get_optimizer_state_dict
    keys it by parameter name), so checkpoints do not depend on FSDP."""
    if not sharded:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return (get_model_state_dict(model, options=opts),
            _renumber(get_optimizer_state_dict(model, optimizer, options=opts), index))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                    optim_sd: dict) -> None:
    """Load full (unsharded) state, as full_state returns it, into an FSDP2 model and its
    optimizer on every rank (each keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    opts = StateDictOptions(full_state_dict=True)
    names = dict(enumerate(_param_names(model, optimizer)))
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optimizer, _renumber(optim_sd, names), options=opts)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
