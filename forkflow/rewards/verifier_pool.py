"""A pool of spawned worker processes that runs verifier calls with a wall-clock timeout per call: a call that
hangs or runs too long is abandoned (its worker killed and replaced) and reported, never waited for.

Why processes, spawned: math-verify's timeout uses signal.alarm, which fails off the main thread, and sympy
can hang inside C code where no signal handler runs; killing the process is the one reliable stop, and
`spawn` keeps the workers free of the trainer's threads, CUDA state and locks.
"""

from __future__ import annotations

import importlib
import multiprocessing
import pickle
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

Call = tuple[Callable, tuple]  # (a module-level function, its positional arguments)


def _worker_main(conn: Connection, preload: tuple[str, ...]) -> None:
    """Worker process: import `preload`, say ready, then run (function, args) calls until told to stop."""
    try:
        for module in preload:
            importlib.import_module(module)
    except BaseException as error:  # report any start-up failure to the parent instead of dying silently
        conn.send(("error", f"importing {preload}: {type(error).__name__}: {error}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            call = conn.recv()
        except EOFError:  # the parent is gone
            return
        except Exception as error:  # the function could not be unpickled here
            conn.send(("error", f"{type(error).__name__}: {error}"))
            continue
        if call is None:
            return
        function, args = call
        try:
            reply = ("ok", function(*args))
        except Exception as error:
            reply = ("error", f"{type(error).__name__}: {error}")
        try:
            conn.send(reply)
        except Exception as error:
            conn.send(("error", f"the result could not be sent back: {type(error).__name__}: {error}"))


class _Worker:
    """One spawned worker and what it is doing: starting, idle, or busy with call `index` until `deadline`."""

    def __init__(
        self, context: multiprocessing.context.SpawnContext, preload: tuple[str, ...], startup_s: float
    ):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn, preload), daemon=True)
        self.process.start()
        child_conn.close()
        self.state, self.index, self.deadline = "starting", -1, time.monotonic() + startup_s

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


@dataclass
class PoolResults:
    values: list  # per call: what it returned, or None if it timed out or failed
    timed_out: list[int] = field(default_factory=list)  # indices of calls abandoned at the timeout
    errors: dict[int, str] = field(default_factory=dict)  # call index -> why it failed (raised, worker died)


class VerifierPool:
    """Runs verifier calls in `num_workers` spawned processes, each call with a wall-clock `timeout_s`.

    `preload` modules are imported by each worker before it takes calls, so slow imports (sympy) never
    count against a call's timeout. Functions must be importable by name (module level), because the
    spawned workers import them. Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        num_workers: int = 4,
        timeout_s: float = 10.0,
        preload: Sequence[str] = ("forkflow.rewards.math_verifier",),
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(
                f"VerifierPool needs num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}"
            )
        self.num_workers, self.timeout_s, self.startup_timeout_s = num_workers, timeout_s, startup_timeout_s
        self.preload = tuple(preload)
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def _new_worker(self) -> _Worker:
        return _Worker(self._context, self.preload, self.startup_timeout_s)

    def run(self, calls: Sequence[Call]) -> PoolResults:
        """Run every (function, args) call; values come back in call order, with the timed-out and failed."""
        results = PoolResults(values=[None] * len(calls))
        pending = deque(range(len(calls)))
        while len(self._workers) < self.num_workers:
            self._workers.append(self._new_worker())
        while pending or any(w.state == "busy" for w in self._workers):
            for slot, worker in enumerate(self._workers):
                if worker.state == "idle" and pending:
                    self._dispatch(slot, worker, pending, calls)
            waiting = [w for w in self._workers if w.state in ("starting", "busy")]
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = wait([w.conn for w in waiting], timeout=timeout)
            for slot, worker in enumerate(self._workers):
                if worker in waiting and (worker.conn in ready or time.monotonic() >= worker.deadline):
                    self._settle(slot, worker, ready, results)
        return results

    def _dispatch(self, slot: int, worker: _Worker, pending: deque, calls: Sequence[Call]) -> None:
        index = pending.popleft()
        function, args = calls[index]
        try:
            payload = pickle.dumps((function, tuple(args)))
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise TypeError(
                f"call {index}: {function!r} cannot be sent to a worker process ({error}); use a function "
                "defined at module level (not a lambda or closure) with picklable arguments"
            ) from error
        try:
            worker.conn.send_bytes(payload)
        except OSError:  # the worker died while idle: give the call to its replacement
            pending.appendleft(index)
            worker.stop()
            self._workers[slot] = self._new_worker()
            return
        worker.state, worker.index, worker.deadline = "busy", index, time.monotonic() + self.timeout_s

    def _settle(self, slot: int, worker: _Worker, ready: list, results: PoolResults) -> None:
        """Take a worker's message, or act on its passed deadline."""
        if worker.conn in ready:
            try:
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                worker.process.join(timeout=1.0)
                kind, payload = "died", f"the worker process died (exit code {worker.process.exitcode})"
        else:
            kind, payload = "late", None
        if worker.state == "starting":
            if kind != "ready":
                self.close()
                reason = payload or f"it did not start within {self.startup_timeout_s} s"
                raise RuntimeError(f"a verifier worker failed to start: {reason}")
            worker.state = "idle"
            return
        index = worker.index
        if kind == "ok":
            results.values[index] = payload
        elif kind == "late":
            results.timed_out.append(index)
        else:
            results.errors[index] = payload
        if kind in ("ok", "error"):
            worker.state = "idle"
        else:  # hung or dead: replace it; the new worker takes calls once it is ready
            worker.stop()
            self._workers[slot] = self._new_worker()

    def close(self) -> None:
        """Stop every worker (idle ones are asked to exit, the rest are killed)."""
        for worker in self._workers:
            if worker.state == "idle":
                try:
                    worker.conn.send(None)
                    worker.process.join(timeout=1.0)
                except OSError:
                    pass
            worker.stop()
        self._workers = []

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
