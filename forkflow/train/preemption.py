"""Stopping a training run cleanly when the cluster asks, and when the loops write their checkpoints.

SIGTERM (what SLURM, Kubernetes and torchrun's agent send before killing a job) and SIGUSR1 (SLURM's warning,
`sbatch --signal=USR1@120`) make the loop finish the step it is in, write a checkpoint and stop with exit code
0; rerunning the same command resumes. A second signal ends the process at once. The signal may reach one
rank only, so after every step the ranks agree, with one small all-reduce, whether any of them got one: all
stop after the same step and save the same checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from forkflow.distributed import World, max_over_ranks

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped early, on a signal, after writing the checkpoint its message names."""


class Preemption:
    """While entered (a context manager), SIGTERM and SIGUSR1 ask the loop to stop after the current step. The
    handlers are installed in the main thread only (elsewhere Python cannot; the object is then inert) and the
    previous ones are restored on exit."""

    def __init__(self):
        self.received: str | None = None  # the signal's name, once one came
        self._previous: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        for s in SIGNALS:  # from now on the default action: a second signal ends the process at once
            signal.signal(s, signal.SIG_DFL)
        # a raw write: the handler may run in the middle of a buffered write to stderr (tqdm's), where print fails
        os.write(2, f"\nreceived {self.received}: stopping after this step, once its checkpoint is written (a "
                    "second signal stops at once)\n".encode())

    def after_step(self, step: int, last: int, save_every: int, save: Callable[[], Path], world: World) -> None:
        """The end of step `step` (1-based) of `last`: write a checkpoint (`save()`, a collective) every
        `save_every` steps, after the last step, and when any rank got a signal; then, if one did, raise
        Preempted. Every rank calls this after every step (the agreement is a collective)."""
        stop = max_over_ranks([float(self.received is not None)], world)[0] > 0
        if stop or step == last or save_every and step % save_every == 0:
            path = save()
            if stop and step < last:
                raise Preempted(f"preempted at step {step} of {last}: checkpoint {path} written; rerun the same "
                                "command to resume")
