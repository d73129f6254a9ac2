"""Supervised fine-tuning with ChunkFlow batching: `forkflow sft CONFIG.yaml [key=value ...]`.

Each step takes `batch_size` examples, cuts them into chunks of at most C tokens, runs the state-aware
schedule (activations of at most K chunks in memory), clips and steps AdamW (`chunkflow.batching=padded`
runs padded micro-batches instead, the baseline ChunkFlow is compared with). Under torchrun the batch's
chunks are spread over the ranks by cost and the model is sharded with FSDP2 (`distributed.strategy`);
the gradient is the one-process gradient of the same batch. Checkpoints (`forkflow.distributed`) load on
any world size; rerunning with the same `out` resumes exactly (after a crash, a kill, or a SIGTERM / SIGUSR1
that lets the step finish and saves it: `forkflow.train.preemption`); the final model is written to
out/model. An update whose loss or gradient norm is not finite is skipped (`UpdateGuard`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from forkflow.chunkflow import assign_ranks, attention_pair_cost, chunked_backward, total_loss_weight
from forkflow.config import ConfigError, Count, NonNegativeInt, save_config
from forkflow.distributed import (
    DistributedConfig,
    World,
    export_model,
    is_sharded,
    reduce_gradients,
    resume_latest,
    save_checkpoint,
    shard_model,
    sum_over_ranks,
)
from forkflow.models.checkpoint import from_pretrained
from forkflow.train.preemption import Preemption
from forkflow.train.sft_data import SFTExample, load_sft_examples
from forkflow.train.state import (
    RUN_KEYS,
    ChunkFlowConfig,
    MetricsLog,
    ModelConfig,
    OptimConfig,
    UpdateGuard,
    build_optimizer,
    check_device,
    clip_gradients,
    open_run,
    run_training_command,
    start_world,
)


@dataclass
class DataConfig:
    train: str = ""  # .jsonl or .parquet; each row has 'messages', or 'prompt' and 'response'
    shuffle: bool = True  # a new seeded order every epoch


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    chunkflow: ChunkFlowConfig = field(default_factory=ChunkFlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # under torchrun
    batch_size: Count = 16  # examples per optimizer step (the global batch, over all ranks)
    epochs: Count = 1
    max_steps: NonNegativeInt = 0  # 0: epochs × steps per epoch
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast compute; weights and AdamW stay fp32
    device: str = "auto"  # auto: cuda when available (cuda:LOCAL_RANK under torchrun), else cpu
    seed: int = 0
    out: str = "runs/sft"  # checkpoints/, metrics.jsonl, model/ (the final model); a rerun resumes
    save_every: NonNegativeInt = 0  # steps between checkpoints; 0: only after the last step
    keep_last: NonNegativeInt = 3  # checkpoints kept (the newest); 0: all
    guard_max_skips: Count = 3  # non-finite updates skipped in a row before the run stops
    allow_config_change: bool = False  # resume `out` even if its saved config differs in experiment keys
    progress: bool = True  # tqdm progress bar on stderr
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars into `out` (extra: tensorboard)
    wandb: bool = False  # also a Weights & Biases run in out/wandb, offline unless WANDB_MODE=online (extra: wandb)
    wandb_project: str = "forkflow"  # the W&B project of wandb=true

    def check(self, prefix: str = "") -> None:
        if not self.model.path:
            raise ConfigError("model.path is required: the Hugging Face checkpoint directory to fine-tune",
                              ("model.path",))
        if not self.data.train:
            raise ConfigError("data.train is required: a .jsonl or .parquet file of conversations", ("data.train",))
        check_device(self.device)


# what a rerun may change and still resume: beside RUN_KEYS, the length of the run
SFT_RUN_KEYS = (*RUN_KEYS, "max_steps", "epochs")


def batch_indices(step: int, num_examples: int, cfg: SFTConfig) -> list[int]:
    """The examples of optimizer step `step`: a function of the step alone, so a resumed run sees the same."""
    per_epoch = math.ceil(num_examples / cfg.batch_size)
    epoch, index = divmod(step, per_epoch)
    if cfg.data.shuffle:
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    else:
        order = torch.arange(num_examples)
    return order[index * cfg.batch_size : (index + 1) * cfg.batch_size].tolist()


def train_step(model, examples: list[SFTExample], cfg: SFTConfig, world: World) -> dict:
    """Forward/backward of one global batch (this rank's share of its chunks); gradients summed over ranks."""
    chunks = cfg.chunkflow.build([e.input_ids for e in examples], loss_weights=[e.loss_mask for e in examples])
    normalizer = total_loss_weight(chunks)  # over the whole batch: every rank divides by the same count
    mine = assign_ranks(chunks, world.size, attention_pair_cost(model.config))[world.rank]
    with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss = chunked_backward(model, mine, keep=cfg.chunkflow.keep, normalizer=normalizer,
                                group=world.group if is_sharded(model) else None)
    reduce_gradients(model, world)
    (loss,) = sum_over_ranks([loss], world)
    return {"loss": loss, "tokens": sum(len(e.input_ids) for e in examples), "loss_tokens": int(normalizer),
            "chunks": len(chunks)}


def train(cfg: SFTConfig) -> Path:
    """Run (or resume) SFT as configured; returns the Hugging Face directory of the final model (out/model).
    Raises Preempted after saving when a signal asked the run to stop."""
    world = start_world(cfg)
    torch.manual_seed(cfg.seed)
    tokenizer = cfg.model.load_tokenizer()
    out = open_run(cfg, "sft", "sft.yaml", SFT_RUN_KEYS, world)
    examples = load_sft_examples(cfg.data.train, tokenizer)
    model = shard_model(from_pretrained(cfg.model.path, dtype=torch.float32, device=world.device), world,
                        cfg.distributed, cfg.precision)
    model.train()
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(examples) / cfg.batch_size)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    state = resume_latest(out, model, optimizer, world) or {}
    if state:
        scheduler.load_state_dict(state["scheduler"])
    guard = UpdateGuard(cfg.guard_max_skips, state.get("skipped_in_a_row", 0))
    step = state.get("step", 0)

    def save() -> Path:
        return save_checkpoint(out, step, model, optimizer, world, {"scheduler": scheduler.state_dict(),
                                                                    "skipped_in_a_row": guard.in_a_row},
                               tokenizer, write_files=lambda path: save_config(cfg, path / "sft.yaml"),
                               keep_last=cfg.keep_last)

    show_bar = cfg.progress and world.main
    log = MetricsLog(out, step, cfg.tensorboard, wandb=cfg.wandb, wandb_project=cfg.wandb_project,
                     config=cfg) if world.main else contextlib.nullcontext()
    with log as log, tqdm(
        total=total_steps, initial=step, desc="sft", disable=not show_bar, dynamic_ncols=True
    ) as bar, Preemption() as preemption:
        while step < total_steps:
            began = time.perf_counter()
            batch = [examples[i] for i in batch_indices(step, len(examples), cfg)]
            record = train_step(model, batch, cfg, world)
            grad_norm = clip_gradients(model, cfg.optim.grad_clip)
            lr = scheduler.get_last_lr()[0]
            guard.apply(optimizer, scheduler, record["loss"], grad_norm)
            step += 1
            seconds = time.perf_counter() - began
            record = {"step": step, "epoch": step * cfg.batch_size / len(examples), **record,
                      "lr": lr, "grad_norm": grad_norm, **guard.step_metrics(), "step_s": seconds,
                      "tokens_per_s": record["tokens"] / seconds}
            if log is not None:
                log.write(record)
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            preemption.after_step(step, total_steps, cfg.save_every, save, world)
    return export_model(model, out / "model", world, tokenizer)


def main(argv: list[str]) -> int:
    return run_training_command("forkflow sft", "Supervised fine-tuning on ChunkFlow.", SFTConfig, train,
                                "configs/sft_tiny.yaml", argv)
