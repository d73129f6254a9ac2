"""What the training loops share: model/optimizer/ChunkFlow config sections, AdamW with warmup + cosine or
constant LR, the metrics log (metrics.jsonl, optionally TensorBoard), and the command runner. Checkpoints
and the ranks are `forkflow.distributed`'s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from forkflow.chunkflow import Chunk, build_chunks, build_micro_batches
from forkflow.config import ConfigError

METRICS = "metrics.jsonl"


@dataclass
class ModelConfig:
    path: str = ""  # Hugging Face checkpoint directory to start from
    tokenizer: str = ""  # directory holding the tokenizer files; default: model.path


@dataclass
class ChunkFlowConfig:
    batching: Literal["chunkflow", "padded"] = "chunkflow"  # padded: the baseline, for comparison
    chunk_size: int = 4096  # C: tokens per chunk
    keep: int = 1  # K: chunks of one long sequence whose activations are in memory at once
    micro_batch_size: int = 8  # padded: sequences per right-padded micro-batch (RL: also select.scope=micro)

    def build(
        self,
        sequences: list[torch.Tensor],
        loss_weights: list[torch.Tensor] | None = None,
        token_fields: dict[str, list[torch.Tensor]] | None = None,
    ) -> list[Chunk]:
        """The batch as ChunkFlow chunks (at most C tokens), or as padded micro-batches of `micro_batch_size`
        sequences in data order; either runs through `chunked_backward` / `chunked_forward` with the same
        loss function and gives the same gradients."""
        if self.batching == "padded":
            return build_micro_batches(sequences, self.micro_batch_size, loss_weights, token_fields)
        return build_chunks(sequences, self.chunk_size, loss_weights, token_fields)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    schedule: Literal["cosine", "constant"] = "cosine"  # after the warmup
    warmup_steps: int = 0  # linear ramp to lr over these steps
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based): linear warmup, then cosine or constant."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int):
    """AdamW over all parameters and its LR schedule (a LambdaLR stepped once per optimizer step)."""
    if len(optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {optim.betas}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total_steps))
    return optimizer, scheduler


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0: no clipping) and return the norm before clipping; the
    norm of a sharded model's gradients is taken over all ranks' shards."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor: the shards' norms combined
        norm = norm.full_tensor()
    return norm.item()


class MetricsLog:
    """The run's step log: `metrics.jsonl` in the run directory, one JSON object per step, and with
    `tensorboard` the same numbers as TensorBoard scalars (tag = metric name, global step = `step`) in the
    run directory too. Opened on a run resumed after `step` steps, it drops what was logged later (those
    steps are logged again), in both. A context manager."""

    def __init__(self, out: Path, step: int, tensorboard: bool = False):
        self.path = Path(out) / METRICS
        if self.path.is_file():
            lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in lines))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(
                    "tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]'"
                ) from e
            self.writer = SummaryWriter(str(out), purge_step=step + 1)

    def write(self, record: dict) -> None:
        """Append one step's record (it has `step`); numbers other than `step` also go to TensorBoard. An
        undefined value (NaN, e.g. the mean over an empty set) is written as null: strict JSON for any reader."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


def run_training_command(prog: str, description: str, config_cls, train, example: str, argv: list[str]) -> int:
    """`prog CONFIG.yaml [key=value ...]` for a training loop: parse, run `train(config)` (which joins
    torchrun's process group when launched by it), and turn input errors into one line on stderr (exit
    code 2)."""
    import argparse
    import sys

    from forkflow.config import load_config
    from forkflow.distributed import shutdown
    from forkflow.jsonl import InputError
    from forkflow.models.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help=f"YAML config, e.g. {example}")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=2e-6 chunkflow.keep=2")
    args = parser.parse_args(argv)
    try:
        last = train(load_config(config_cls, args.config, args.overrides))
    except (ConfigError, InputError, CheckpointError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{prog}: finished; model {last}", file=sys.stderr)
    shutdown()
    return 0
