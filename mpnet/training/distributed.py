"""torchrun support: DDP by default, FSDP2 (fully_shard) behind a config switch.

Launched plainly, everything here is a no-op on one device. Under torchrun each process takes its
LOCAL_RANK's GPU (NCCL) or runs on CPU (gloo, used by the tests).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return DistEnv(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(dist.get_rank(), world, local_rank, device)


def teardown(env: DistEnv):
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv):
    if env.distributed:
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first(env: DistEnv):
    if not env.is_main:
        barrier(env)
    yield
    if env.is_main:
        barrier(env)


def wrap(model, env: DistEnv, fsdp: bool):
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        env.fsdp = True
        for layer in model.mpnet.encoder.layer:
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def maybe_no_sync(train_model, env: DistEnv, sync: bool):
    """Skip the gradient all-reduce on all but the last accumulation micro-batch."""
    if not env.distributed:
        return contextlib.nullcontext()
    if env.fsdp:
        train_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else train_model.no_sync()


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(train_model, env: DistEnv):
    """FSDP: the gathered full state dict (on rank 0); otherwise None (the model holds full weights)."""
    if not env.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(train_model, options=_state_options())


def optimizer_state(optimizer, train_model, env: DistEnv):
    if not env.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(train_model, optimizer, options=_state_options())


def load_optimizer_state(optimizer, train_model, state, env: DistEnv):
    if not env.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(train_model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def gather_rng(state, env: DistEnv) -> list:
    """Every rank's RNG state, on every rank (so rank r resumes with its own dropout stream)."""
    if not env.distributed:
        return [state]
    states = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def all_reduce_sum(tensor, env: DistEnv):
    if env.distributed:
        dist.all_reduce(tensor)
    return tensor
