"""Scaling out on PyTorch's own stack: torchrun's process group, FSDP2 sharding, full-weight gathers for
rollouts, and `torch.distributed.checkpoint` checkpoints that load on any world size (DESIGN §5)."""

from forkflow.distributed.checkpoint import (
    export_checkpoint,
    export_model,
    latest_checkpoint,
    load_checkpoint,
    resume_latest,
    save_checkpoint,
)
from forkflow.distributed.runtime import (
    DistributedConfig,
    World,
    barrier,
    full_parameters,
    gather_objects,
    init_world,
    is_sharded,
    max_over_ranks,
    reduce_gradients,
    shard_bounds,
    shard_model,
    shutdown,
    sum_over_ranks,
)

__all__ = [
    "DistributedConfig",
    "World",
    "barrier",
    "export_checkpoint",
    "export_model",
    "full_parameters",
    "gather_objects",
    "init_world",
    "is_sharded",
    "latest_checkpoint",
    "load_checkpoint",
    "max_over_ranks",
    "reduce_gradients",
    "resume_latest",
    "save_checkpoint",
    "shard_bounds",
    "shard_model",
    "shutdown",
    "sum_over_ranks",
]
