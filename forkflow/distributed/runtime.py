"""The ranks of a job and how the model is spread over them: the process group torchrun's environment
describes (gloo on CPU, NCCL on GPU), FSDP2 sharding (`fully_shard` per decoder block and the root), the
full weights gathered once for a rollout, and the small collectives the trainers need (sums, object
gathers). A single process is a world of size 1, for which every function here is the identity.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from forkflow.config import Positive


@dataclass
class DistributedConfig:
    # fsdp: parameters, gradients and AdamW state sharded 1/N over the ranks (FSDP2);
    # replicate: a full model and optimizer on every rank, gradients summed with all-reduce
    strategy: Literal["fsdp", "replicate"] = "fsdp"
    # FSDP's compute dtype of the gathered parameters; auto: bf16 on GPU with precision=bf16, else the
    # parameters' own (fp32)
    param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    reduce_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # of the gradient reduce-scatter; auto: fp32
    reshard_after_forward: bool = True  # free a block's gathered parameters after its forward (less memory)
    timeout_s: Positive = 600.0  # a collective that waits longer fails, so a dead rank never hangs the others


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class World:
    """This process's place in the job. `group` is None for a single process (nothing to reduce)."""

    rank: int
    size: int
    device: torch.device
    group: dist.ProcessGroup | None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(cfg: DistributedConfig, device: str = "auto") -> World:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1), else a world of one. Each rank
    takes cuda:LOCAL_RANK on GPU. `device` is a training config's: auto picks cuda when available."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    target = torch.device(name)
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if target.type == "cuda":
            torch.cuda.set_device(target)
        return World(0, 1, target, None)
    if target.type == "cuda":
        if target.index is None:
            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(target)  # NCCL collectives run on the current device
    return World(dist.get_rank(), dist.get_world_size(), target, dist.group.WORLD)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, world: World, cfg: DistributedConfig, precision: str = "fp32"):
    """FSDP2 over the world's ranks: each decoder block is one unit (gathered for its forward and backward,
    resharded after), the root holds the embedding, final norm and LM head (gathered from the forward to
    the end of the backward). Gradients are reduce-scattered
    as a sum (the losses are already divided by the global normaliser; FSDP's default mean would divide by
    N once more), and every parameter takes part in every reduction (MoE experts that got no token on one
    rank). Returns the model (the same object); unchanged for one process or `replicate`."""
    if world.size == 1 or cfg.strategy == "replicate":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if cfg.param_dtype == "auto":  # None: the parameters' own dtype
        param_dtype = torch.bfloat16 if precision == "bf16" and world.device.type == "cuda" else None
    else:
        param_dtype = DTYPES[cfg.param_dtype]
    reduce_dtype = torch.float32 if param_dtype is not None and cfg.reduce_dtype == "auto" else DTYPES.get(
        cfg.reduce_dtype)
    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=policy)
    # the root's parameters stay gathered from its forward to its backward: the LM head runs after the
    # forward, in the loss (on the rows that need it), and the embedding's backward follows at once
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    for unit in [*model.model.layers, model]:  # a plain sum (gloo has no pre-multiplied sum)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    model.set_reduce_scatter_unused_params(True)  # (recurses)
    return model


def reduce_gradients(model: torch.nn.Module, world: World) -> None:
    """Sum .grad over the ranks for a replicated model (each rank's loss was divided by the global
    normaliser); a sharded model's gradients were reduce-scattered in its backward already."""
    if world.group is None or is_sharded(model):
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a rank whose chunks never reached a parameter still joins the sum
        dist.all_reduce(p.grad, group=world.group)


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for every parameter (forkflow names, tied ones once), gathered one at a time
    from a sharded model: a collective every rank iterates in full; peak memory one parameter."""
    for name, p in model.named_parameters():
        yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def sum_over_ranks(values: list[float], world: World) -> list[float]:
    """Element-wise sums over the ranks (float64)."""
    if world.group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t, group=world.group)
    return t.tolist()


def max_over_ranks(values: list[float], world: World) -> list[float]:
    if world.group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world.group)
    return t.tolist()


def gather_objects(obj, world: World) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects)."""
    if world.group is None:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj, group=world.group)
    return out


def shutdown() -> None:
    """Leave the process group. Sharded models and their device mesh hold references to the group's
    communicators; collected after it is destroyed (at interpreter exit), gloo aborts the process, so
    collect them first."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.group is not None:
        dist.barrier(group=world.group)


def shard_bounds(count: int, world: World) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of `count` items (the first count % N ranks get one
    more)."""
    base, extra = divmod(count, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)
