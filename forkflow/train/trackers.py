"""Experiment trackers that the metrics log (`state.MetricsLog`) feeds besides metrics.jsonl: TensorBoard and
Weights & Biases, each an optional extra, each writing under the run directory. One interface: `write(step,
scalars)` and `close()`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from forkflow.config import ConfigError


class TensorBoardTracker:
    """Scalars as TensorBoard events in the run directory (tag = metric name, global step = `step`); on a run
    resumed after `step` steps, events logged later are purged (those steps come again)."""

    def __init__(self, out: Path, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]'") from e
        self.writer = SummaryWriter(str(out), purge_step=step + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in `out/wandb/`, offline unless the environment says otherwise (WANDB_MODE=online
    streams to the server; an offline run is uploaded later with `wandb sync out/wandb/offline-run-*`). It is
    named after the run directory and records the run's config. A resumed run is a new W&B run whose steps
    start after the checkpoint's, so no step is logged twice within one W&B run."""

    def __init__(self, out: Path, project: str, config=None):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("wandb=true needs the wandb package: pip install -e '.[wandb]'") from e
        if dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        self.run = wandb.init(
            project=project,
            name=Path(out).resolve().name,
            dir=str(out),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),  # no network unless asked for
            settings=wandb.Settings(console="off"),  # the terminal is the trainer's (tqdm); metrics come by write()
        )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
