"""What the training loops share: model/optimizer/ChunkFlow config sections, AdamW with warmup + cosine or
constant LR, the run directory a run opens (and the config a rerun into it must keep), the guard that keeps
non-finite updates off the weights, the metrics log (metrics.jsonl, optionally TensorBoard), and the command
runner. Checkpoints and the ranks are `forkflow.distributed`'s; stopping on a signal is `preemption`'s.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist
import yaml

from forkflow.chunkflow import Chunk, build_chunks, build_micro_batches
from forkflow.config import (
    ConfigError,
    Count,
    Fraction,
    NonNegative,
    NonNegativeInt,
    Positive,
    Range,
    changed_keys,
    save_config,
    validate,
)
from forkflow.distributed import World, gather_objects, init_world, latest_checkpoint
from forkflow.jsonl import InputError
from forkflow.models.checkpoint import CheckpointError
from forkflow.run_dir import prepare_run_dir
from forkflow.train.preemption import Preempted

METRICS = "metrics.jsonl"


@dataclass
class ModelConfig:
    path: str = ""  # Hugging Face checkpoint directory to start from
    tokenizer: str = ""  # directory holding the tokenizer files; default: model.path

    def load_tokenizer(self):
        """The tokenizer of model.tokenizer, else of model.path; a directory that does not exist, or a model.path
        that is not a Hugging Face checkpoint, is named."""
        from forkflow.chat import load_tokenizer

        for key in ("path", "tokenizer"):
            value = getattr(self, key)
            if value and not Path(value).is_dir():
                raise ConfigError(f"model.{key}={value}: no such directory" + (
                    " (the Hugging Face checkpoint to start from)" if key == "path" else ""))
        if not (Path(self.path) / "config.json").is_file():
            raise ConfigError(f"model.path={self.path}: no config.json, not a Hugging Face checkpoint directory")
        return load_tokenizer(self.tokenizer or self.path)


@dataclass
class ChunkFlowConfig:
    batching: Literal["chunkflow", "padded"] = "chunkflow"  # padded: the baseline, for comparison
    chunk_size: Count = 4096  # C: tokens per chunk
    keep: Count = 1  # K: chunks of one long sequence whose activations are in memory at once
    micro_batch_size: Count = 8  # padded: sequences per right-padded micro-batch (RL: also select.scope=micro)

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
    lr: Positive = 1e-5
    betas: list[Annotated[float, Range(0, 1, high_open=True)]] = field(default_factory=lambda: [0.9, 0.95])
    eps: Positive = 1e-8
    weight_decay: NonNegative = 0.0
    grad_clip: NonNegative = 1.0  # max global gradient norm; 0: no clipping
    schedule: Literal["cosine", "constant"] = "cosine"  # after the warmup
    warmup_steps: NonNegativeInt = 0  # linear ramp to lr over these steps
    min_lr_ratio: Fraction = 0.0  # the cosine ends at lr * min_lr_ratio

    def check(self, prefix: str) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"{prefix}betas must have two values, got {self.betas}", (f"{prefix}betas",))


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based): linear warmup, then cosine or constant."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int):
    """AdamW over all parameters and its LR schedule (a LambdaLR stepped once per optimizer update taken: see
    UpdateGuard). AdamW is torch's fused kernel (one pass per parameter; the default multi-tensor one makes
    several over temporaries: 10x slower on CPU at Qwen3's vocabulary), as in transformers' Trainer."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total_steps))
    return optimizer, scheduler


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0: no clipping) and return the norm before clipping; the
    norm of a sharded model's gradients is taken over all ranks' shards."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor: the shards' norms combined
        norm = norm.full_tensor()
    return norm.item()


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change. Checkpoints already written are intact."""


# what ends a training command without a traceback (`exit_code` maps each to the command's exit code)
STOPS = (Preempted, ConfigError, InputError, CheckpointError, FileNotFoundError, TrainingError, OSError)


class UpdateGuard:
    """Keeps non-finite updates off the weights. An optimizer update whose loss or gradient norm is NaN or inf
    is skipped: its gradients are zeroed and neither AdamW nor the LR schedule steps (the schedule follows the
    updates actually taken, as Megatron's does), so weights and AdamW state stay as they were and a checkpoint
    written after a skip holds good state. Skips are counted in the step's metrics; `max_skips` in a row stop
    the run (TrainingError). The loss (summed over ranks) and the gradient norm (global) are the same on every
    rank, so all ranks decide alike."""

    def __init__(self, max_skips: int, in_a_row: int = 0):
        self.max_skips, self.in_a_row = max_skips, in_a_row  # in_a_row: skipped since the last update taken
        self.skipped, self.reason = 0, None  # in the current step

    def apply(self, optimizer, scheduler, loss: float, grad_norm: float) -> None:
        """Step `optimizer` and `scheduler` unless `loss` or `grad_norm` is not finite; zero the gradients."""
        bad = [f"{name}={float(value)}" for name, value in (("loss", loss), ("grad_norm", grad_norm))
               if not math.isfinite(value)]
        if bad:
            self.skipped, self.in_a_row, self.reason = self.skipped + 1, self.in_a_row + 1, ", ".join(bad)
        else:
            optimizer.step()
            scheduler.step()
            self.in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        if self.in_a_row >= self.max_skips:
            raise TrainingError(
                f"{self.in_a_row} optimizer updates in a row had a non-finite loss or gradient norm (the last: "
                f"{self.reason}) and were skipped; stopping (guard_max_skips={self.max_skips}). None of them reached "
                "the weights, so the checkpoints written so far are good: fix the data or lower optim.lr (with "
                "allow_config_change=true) and rerun to resume from the last one"
            )

    def step_metrics(self) -> dict:
        """`guard/skipped_updates` and `guard/reason` (the last skip's) of the step now ending; then a new count."""
        metrics = {"guard/skipped_updates": self.skipped, "guard/reason": self.reason}
        self.skipped, self.reason = 0, None
        return metrics


# keys a rerun may change without changing the experiment: where it runs, what it reports, when it saves
RUN_KEYS = ("out", "device", "distributed", "progress", "tensorboard", "wandb", "wandb_project", "save_every",
            "keep_last", "guard_max_skips", "allow_config_change")


def check_device(device: str, key: str = "device") -> None:
    """ConfigError unless `device` is auto or names a torch device (whether this machine has it is
    start_world's question: a config may be checked elsewhere)."""
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError:
            raise ConfigError(f"{key}: {device!r} is not a device: auto, cpu, cuda or cuda:N", (key,)) from None


def start_world(cfg) -> World:
    """Check a training config (see forkflow.config.validate) and that its device exists here, then join the
    job (`init_world`): this process's rank, world size and device."""
    validate(cfg)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device}, but torch sees no CUDA device here (use auto or cpu)")
    return init_world(cfg.distributed, cfg.device)


def open_run(cfg, kind: str, config_file: str, rerun_keys: tuple[str, ...], world: World) -> Path:
    """Make `cfg.out` the directory of a `kind` run and save `cfg` in it as `config_file`; returns the directory.

    The directory is created if missing and reused only if it holds a forkflow run of this kind
    (`forkflow.run_dir`); anything else is refused, nothing deleted. A rerun into a run that has a checkpoint
    resumes it, so `cfg` must still describe that experiment: a change of any key outside `rerun_keys` (dotted
    keys or whole sections) is refused with the changed keys listed, unless allow_config_change=true. Rank 0
    reads and writes; every rank raises the refusal (a ConfigError)."""
    out = Path(cfg.out)
    error = None
    if world.main:
        try:
            prepare_run_dir(out, kind, option="out=")
            saved = out / config_file
            if saved.is_file() and not cfg.allow_config_change and latest_checkpoint(out, warn=False):
                changes = experiment_changes(saved, cfg, rerun_keys)
                if changes:
                    raise ConfigError(f"out={out} holds a {kind} run with another config ({saved}): {changes}. "
                                      "Resuming it would mix two experiments: rerun with its config, choose another "
                                      "out=, or add allow_config_change=true to resume it anyway")
            save_config(cfg, saved)
        except ConfigError as e:
            error = str(e)
        except OSError as e:
            error = f"out={out}: {e}"
    (error, *_) = gather_objects(error, world)
    if error is not None:
        raise ConfigError(error)
    return out


def experiment_changes(saved: Path, cfg, rerun_keys: tuple[str, ...]) -> str:
    """The keys, outside `rerun_keys`, whose values in `cfg` differ from the config file `saved`, listed with
    both values: `optim.lr (0.001 -> 0.002), rollout.n (4 -> 8)`; empty when there are none."""
    try:
        data = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{saved}: not valid YAML ({e}); restore it or choose another out=") from None
    changes = changed_keys(type(cfg), data if isinstance(data, dict) else {}, cfg)
    return ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changes.items()
                     if not any(key == k or key.startswith(f"{k}.") for k in rerun_keys))


class MetricsLog:
    """The run's step log, the one interface the trainers log through: `metrics.jsonl` in the run directory,
    one JSON object per step, always; with `tensorboard` the same numbers as TensorBoard scalars and with
    `wandb` as a Weights & Biases run (offline unless WANDB_MODE says otherwise; `config`, the run's config
    dataclass, recorded with it), both under the run directory too (`forkflow.train.trackers`). Opened on a run
    resumed after `step` steps, it drops what was logged later (those steps are logged again). A context
    manager."""

    def __init__(self, out: Path, step: int, tensorboard: bool = False, *, wandb: bool = False,
                 wandb_project: str = "forkflow", config=None):
        from forkflow.train.trackers import TensorBoardTracker, WandbTracker

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS
        if self.path.is_file():  # rewritten under another name and renamed: a kill now loses no line
            lines = self.path.read_text().splitlines()
            if lines and not lines[-1].endswith("}"):
                lines.pop()  # a line torn by a kill mid-write (that step is logged again)
            tmp = self.path.with_name(f".{METRICS}.tmp")
            tmp.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
            os.replace(tmp, self.path)
        self.trackers = []
        try:
            if tensorboard:
                self.trackers.append(TensorBoardTracker(out, step))
            if wandb:
                self.trackers.append(WandbTracker(out, wandb_project, config))
        except BaseException:
            self.close()
            raise

    def write(self, record: dict) -> None:
        """Append one step's record (it has `step`); numbers other than `step` also go to the trackers. An
        undefined value (NaN, e.g. the mean over an empty set) is written as null: strict JSON for any reader."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.write(record["step"], scalars)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def exit_code(error: BaseException) -> int:
    """The exit code of a training command stopped by `error` (one of STOPS): 0 preempted (a checkpoint was
    written), 2 bad input, 1 a run that could not go on."""
    return 0 if isinstance(error, Preempted) else 1 if isinstance(error, (TrainingError, OSError)) else 2


def run_training_command(prog: str, description: str, config_cls, train, example: str, argv: list[str]) -> int:
    """`prog CONFIG.yaml [key=value ...]` for a training loop: parse, run `train(config)` (which joins
    torchrun's process group when launched by it), and turn errors a person must fix into one line on stderr:
    bad input exits 2, a run that cannot go on (non-finite updates, a failed checkpoint write) 1. A run stopped
    by a signal (`forkflow.train.preemption`) says how to resume and exits 0."""
    import argparse

    from forkflow.config import load_config
    from forkflow.distributed import shutdown

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help=f"YAML config, e.g. {example}")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=2e-6 chunkflow.keep=2")
    args = parser.parse_args(argv)
    code, every_rank = 0, False
    try:
        message = f"finished; model {train(load_config(config_cls, args.config, args.overrides))}"
    except STOPS as e:
        message, code, every_rank = str(e), exit_code(e), not isinstance(e, Preempted)
    if every_rank or not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{prog}: {message}", file=sys.stderr)
    shutdown()
    return code
