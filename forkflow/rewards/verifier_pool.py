"""A pool of worker processes that runs verifier calls with a wall-clock timeout per call: a call that hangs
is killed at its timeout and reported, and never holds up the calls behind it.

Why processes: math-verify's timeout uses signal.alarm, which fails off the main thread, and sympy can hang
inside C code where no signal handler runs; killing the process is the one reliable stop. Workers are forked
from a fork server, a fresh interpreter that has imported the verifiers once, so they are free of the
trainer's threads, CUDA state and locks (as spawned ones would be) yet start in milliseconds, not seconds;
where there is no fork server (Windows) they are spawned.

Why hangs do not add up: a call that runs past `spare_after_s` while other calls wait is set aside. A fresh
worker takes its place and the old one runs on alone until the call ends or its deadline kills it. Many
hanging calls therefore wait out their timeouts side by side, and a batch costs about one timeout more than
it would without them, instead of (hanging calls × timeout ÷ workers).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

Call = tuple[Callable, tuple]  # (a module-level function, its positional arguments)


def describe_error(error: BaseException) -> str:
    """One line for a log: the exception's type and message and where it was raised (innermost frame)."""
    message = " ".join(str(error).split())
    if len(message) > 300:
        message = message[:297] + "..."
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return text
    path = frames[-1].filename
    if os.path.isabs(path) and path.startswith(os.getcwd() + os.sep):
        path = os.path.relpath(path)
    return f"{text} (at {path}:{frames[-1].lineno} in {frames[-1].name})"


def _worker_main(conn: Connection, preload: tuple[str, ...]) -> None:
    """Worker process: import `preload`, say ready, then run (function, args) calls until told to stop.

    Replies per call: ("ok", value) or ("error", one-line summary); before the first call of a function from
    a module not seen yet, ("started", None), so that importing it does not count against the timeout.
    The preemption signals are the trainer's to act on (SLURM may send them to every process of the job):
    a worker ignores them and is stopped by its pool.
    """
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)
    try:
        for module in preload:
            importlib.import_module(module)
    except BaseException as error:  # report any start-up failure to the parent instead of dying silently
        conn.send(("error", f"importing {list(preload)}: {describe_error(error)}"))
        return
    conn.send(("ready", None))
    seen = set(preload)  # the parent's _Worker.modules, kept in step
    while True:
        try:
            call = conn.recv()
        except EOFError:  # the parent is gone
            return
        except Exception as error:  # the function could not be unpickled (imported) here
            conn.send(("error", f"the verifier could not be loaded in the worker: {describe_error(error)}"))
            continue
        if call is None:
            return
        function, args = call
        module = getattr(function, "__module__", None)
        if module not in seen:
            seen.add(module)
            conn.send(("started", None))
        try:
            reply = ("ok", function(*args))
        except Exception as error:
            reply = ("error", describe_error(error))
        try:
            conn.send(reply)
        except Exception as error:
            conn.send(("error", f"the result could not be sent back: {describe_error(error)}"))


class _Worker:
    """One worker process and what it is doing: starting, idle, or busy with call `index` until `deadline`."""

    def __init__(self, context: multiprocessing.context.BaseContext, preload: tuple[str, ...], startup_s: float):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn, preload), daemon=True)
        self.process.start()
        child_conn.close()
        self.state, self.index, self.module = "starting", -1, None
        self.started = time.monotonic()
        self.deadline = self.started + startup_s
        self.modules = set(preload)  # modules whose calls it has begun: no import counts against their timeout
        self.aside = False  # its call outlived spare_after_s while others waited; another worker took its place

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _worker_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext:
    """The fork server context, its server set to import `preload` (those modules this process has already
    imported, so a broken one fails in a worker, with a message, not in the server); spawn where there is
    no fork server. The fork server is one per process: a pool created after it started forks from it as it
    is, and its workers import whatever else their preload names themselves."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__] + [module for module in preload if module in sys.modules])
    return context


@dataclass
class PoolResults:
    values: list  # per call: what it returned, or None if it timed out or failed
    timeouts: list[int] = field(default_factory=list)  # indices of calls killed at the timeout, ascending
    errors: dict[int, str] = field(default_factory=dict)  # call index -> one line: why it failed (raised, died)


class VerifierPool:
    """Runs verifier calls in `num_workers` worker processes, each call with a wall-clock `timeout_s`.

    `preload` modules are imported by each worker before it takes calls, so slow imports (sympy) never
    count against a call's timeout; the first call of a function from any other module gets the start-up
    allowance for importing it. Functions must be importable by name (module level), because the workers
    import them. A call still running after `spare_after_s` (timeout / 40, at most 0.25 s) while others wait
    is set aside and a fresh worker takes its place; at most `max_set_aside` calls wait out their timeouts
    at once (beyond that, the pool waits for their deadlines). Use as a context manager, or call `close()`.
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
        self.spare_after_s = min(0.25, timeout_s / 40)
        self.max_set_aside = max(32, 2 * num_workers)
        self.preload = tuple(preload)
        self._context = _worker_context(self.preload)
        self._workers: list[_Worker] = []  # num_workers taking calls (not aside), then those set aside

    def _new_worker(self) -> _Worker:
        return _Worker(self._context, self.preload, self.startup_timeout_s)

    def _active(self) -> list[_Worker]:
        return [w for w in self._workers if not w.aside]

    def run(self, calls: Sequence[Call]) -> PoolResults:
        """Run every (function, args) call; values come back in call order, with the timed-out and failed."""
        payloads = [_payload(index, call) for index, call in enumerate(calls)]  # unsendable: fail before any run
        results = PoolResults(values=[None] * len(calls))
        pending = deque(range(len(calls)))
        while len(self._active()) < self.num_workers:
            self._workers.append(self._new_worker())
        while pending or any(w.state == "busy" for w in self._workers):
            self._set_aside_stuck(len(pending), time.monotonic())
            for worker in self._active():
                if worker.state == "idle" and pending:
                    self._dispatch(worker, pending.popleft(), pending, payloads, calls)
            waiting = [w for w in self._workers if w.state in ("starting", "busy")]
            ready = wait([w.conn for w in waiting], timeout=max(0.0, self._next_event(waiting, pending)))
            now = time.monotonic()
            for worker in waiting:
                if worker.conn in ready or now >= worker.deadline:
                    self._settle(worker, ready, results)
        results.timeouts.sort()
        return results

    def _set_aside_stuck(self, num_pending: int, now: float) -> None:
        """While calls wait and no worker is free, set aside the workers whose calls run past spare_after_s."""
        active = self._active()
        if any(w.state == "idle" for w in active):
            return
        wanted = num_pending - sum(w.state == "starting" for w in active)
        room = self.max_set_aside - (len(self._workers) - len(active))
        stuck = sorted((w for w in active if w.state == "busy" and now - w.started >= self.spare_after_s),
                       key=lambda w: w.started)
        for worker in stuck[: max(0, min(wanted, room))]:
            worker.aside = True
            self._workers.append(self._new_worker())

    def _next_event(self, waiting: list[_Worker], pending: deque) -> float:
        """Seconds until the next deadline, or until a busy worker may be set aside if calls wait (one already
        past that moment but kept, because starting workers will take the waiting calls, wakes nothing)."""
        now = time.monotonic()
        times = [w.deadline for w in waiting]
        active = self._active()
        if pending and len(self._workers) - len(active) < self.max_set_aside:
            times += [t for w in active if w.state == "busy" and (t := w.started + self.spare_after_s) > now]
        return min(times, default=now) - now

    def _dispatch(self, worker: _Worker, index: int, pending: deque, payloads: list, calls: Sequence[Call]) -> None:
        try:
            worker.conn.send_bytes(payloads[index])
        except OSError:  # the worker died while idle: give the call to its replacement
            pending.appendleft(index)
            self._replace(worker)
            return
        worker.state, worker.index = "busy", index
        worker.module = getattr(calls[index][0], "__module__", None)
        worker.started = time.monotonic()
        # a module it has not run calls from yet may need importing first: the worker says when that is done
        allowance = 0.0 if worker.module in worker.modules else self.startup_timeout_s
        worker.deadline = worker.started + allowance + self.timeout_s

    def _replace(self, worker: _Worker) -> None:
        """Stop a worker; one that was taking calls gets a successor, one set aside does not."""
        worker.stop()
        self._workers.remove(worker)
        if not worker.aside:
            self._workers.append(self._new_worker())

    def _settle(self, worker: _Worker, ready: list, results: PoolResults) -> None:
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
        if kind == "started":  # imports done: the call's own timeout starts now
            worker.modules.add(worker.module)
            worker.started = time.monotonic()
            worker.deadline = worker.started + self.timeout_s
            return
        if kind == "ok":
            results.values[worker.index] = payload
        elif kind == "late":
            results.timeouts.append(worker.index)
        else:
            results.errors[worker.index] = payload
        if kind in ("ok", "error") and not worker.aside:
            worker.state = "idle"
        else:  # hung, dead, or set aside and done: it goes (and is replaced if it was taking calls)
            self._replace(worker)

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


def _payload(index: int, call: Call) -> bytes:
    function, args = call
    try:
        return pickle.dumps((function, tuple(args)))
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TypeError(
            f"call {index}: {function!r} cannot be sent to a worker process ({error}); use a function "
            "defined at module level (not a lambda or closure) with picklable arguments"
        ) from error
