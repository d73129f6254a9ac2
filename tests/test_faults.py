"""Fault tolerance of `forkflow train` and `forkflow sft`: kill -9 at random moments, SIGTERM / SIGUSR1 on one
rank or all, damaged checkpoints, a full disk mid-save, non-finite updates, a changed config on resume, and
config values and output directories that must be refused. Each run that is cut short and resumed ends with
the weights and metrics of the same run uninterrupted."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from forkflow import cli
from forkflow.config import ConfigError, load_config
from forkflow.distributed import export_checkpoint, export_model, latest_checkpoint
from forkflow.models.checkpoint import read_state_dict
from forkflow.run_dir import MARKER
from forkflow.train.preemption import Preemption
from forkflow.train.rl import RLConfig, RLTrainer
from forkflow.train.state import TrainingError
from tests.test_train_rl import tiny_overrides, write_rl_setup

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
KEEP = 4  # keep_last of the reference run


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    return write_rl_setup(tmp_path_factory.mktemp("faults-rl"))


def rl_args(setup, out, *extra: str) -> list[str]:
    """`forkflow train configs/rl_tiny.yaml` on the tiny model and data, STEPS steps."""
    return ["train", "configs/rl_tiny.yaml", *tiny_overrides(setup, out), "eval.files=[]", f"steps={STEPS}",
            f"keep_last={KEEP}", *extra]


def rl_config(setup, out, *extra: str) -> RLConfig:
    return load_config(RLConfig, "configs/rl_tiny.yaml", rl_args(setup, out, *extra)[2:])


@pytest.fixture(scope="module")
def rl_reference(rl_setup, tmp_path_factory):
    """The uninterrupted run, a checkpoint after every step: (run directory, seconds per step and checkpoint)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(rl_args(rl_setup, out, "save_every=1")) == 0
    saved = [(out / "checkpoints" / f"step-{step:08d}" / "trainer_state.pt").stat().st_mtime for step in (5, 8)]
    return out, (saved[1] - saved[0]) / 3


def start(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m forkflow.cli ARGS` in the background, one thread (as the tests' own process), stderr to `log`."""
    return subprocess.Popen([sys.executable, "-m", "forkflow.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, job: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    began = time.monotonic()
    while not condition():
        assert job.poll() is None, log.read_text()
        assert time.monotonic() - began < timeout, "timed out"
        time.sleep(0.02)


def metrics(out: Path) -> list[dict]:
    """The run's metrics without the timings (which differ from run to run)."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time") and not k.endswith("_s")}
            for line in lines]


def assert_same_run(out: Path, reference: Path) -> None:
    assert metrics(out) == metrics(reference)
    got, want = read_state_dict(out / "model"), read_state_dict(reference / "model")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def steps_of(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


# ------------------------------------------------------------------------------------ kill -9, SIGTERM, keep


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(rl_setup, rl_reference, tmp_path):
    """Three kills at seeded random moments: after a random step has been logged, a random part of a step's
    time later (mid-step, mid-checkpoint, mid-pruning, ...); each followed by a rerun of the same command,
    the last of which finishes."""
    reference, step_seconds = rl_reference
    out, rng = tmp_path / "run", random.Random(0)
    log_file = out / "metrics.jsonl"
    for attempt, step in enumerate(sorted(rng.sample(range(1, STEPS - 1), 3))):  # 2 steps at least to go
        log, began = tmp_path / f"attempt{attempt}.log", time.time()
        job = start(rl_args(rl_setup, out, "save_every=1"), log)
        # this run's log (rewritten on resume) has reached `step`
        wait_for(lambda since=began, step=step: log_file.is_file() and log_file.stat().st_mtime >= since
                 and len(metrics(out)) >= step, job, log)
        time.sleep(rng.uniform(0, step_seconds))
        assert job.poll() is None, log.read_text()
        job.kill()
        job.wait()
    assert cli.main(rl_args(rl_setup, out, "save_every=1")) == 0
    assert_same_run(out, reference)
    assert steps_of(out) == list(range(STEPS - KEEP + 1, STEPS + 1))


def test_keep_last_keeps_the_newest_checkpoints(rl_reference):
    reference, _ = rl_reference
    assert steps_of(reference) == [5, 6, 7, 8]
    assert not list((reference / "checkpoints").glob(".*"))  # no temporary directories left


def test_sigterm_saves_the_step_exits_0_and_the_rerun_resumes(rl_setup, rl_reference, tmp_path, capfd):
    out, log = tmp_path / "run", tmp_path / "run.log"
    job = start(rl_args(rl_setup, out), log)  # save_every=0: the signal's checkpoint is the only one
    wait_for(lambda: metrics(out), job, log)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 0, log.read_text()
    (step,) = steps_of(out)
    assert 1 <= step < STEPS and len(metrics(out)) == step
    assert (f"preempted at step {step} of {STEPS}: checkpoint {out / 'checkpoints' / f'step-{step:08d}'} written; "
            "rerun the same command to resume") in log.read_text()
    assert not (out / "model").exists()
    capfd.readouterr()
    assert cli.main(rl_args(rl_setup, out)) == 0
    assert f"resuming from step {step} of {out}" in capfd.readouterr().err
    assert_same_run(out, rl_reference[0])


def test_a_second_signal_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.received == "SIGUSR1"
        # the next SIGTERM or SIGUSR1 takes the default action: the process ends there and then
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == before
    elsewhere = Preemption()
    thread = threading.Thread(target=elsewhere.__enter__)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) == before and not elsewhere._previous  # inert off the main thread


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_run_resumes(rl_setup, rl_reference, tmp_path,
                                                                             capfd):
    """torchrun with 2 ranks; only rank 1 gets SIGTERM. Both finish the same step, write one checkpoint and exit
    0; a one-process rerun resumes it (resharding) and ends at the one-process run's weights."""
    from tests.test_distributed import close, torchrun

    out = tmp_path / "run"
    job = torchrun(*rl_args(rl_setup, out))
    began = time.monotonic()
    while not metrics(out):
        assert job.poll() is None and time.monotonic() - began < 120, job.communicate()[0]
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    rank_1 = next(int(pid) for pid in workers if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    os.kill(rank_1, signal.SIGTERM)
    output = job.communicate(timeout=120)[0]
    assert job.returncode == 0, output
    (step,) = steps_of(out)
    assert step < STEPS and len(metrics(out)) == step
    assert output.count(f"preempted at step {step} of {STEPS}") == 1, output  # rank 0 says it
    assert "received SIGTERM" in output
    capfd.readouterr()
    assert cli.main(rl_args(rl_setup, out)) == 0
    assert f"resuming from step {step} of {out}" in capfd.readouterr().err
    assert close(read_state_dict(out / "model"), read_state_dict(rl_reference[0] / "model"))


# ------------------------------------------------------------------------------------- damaged checkpoints


def copy_run(reference: Path, out: Path) -> Path:
    shutil.copytree(reference, out)
    shutil.rmtree(out / "model")
    return out


def test_damaged_newest_checkpoints_are_skipped_with_a_warning_and_the_run_ends_the_same(
        rl_setup, rl_reference, tmp_path, capfd):
    """step 8: a shard missing; step 7: a shard truncated; step 6: a shard of the right size that DCP cannot
    read. The rerun warns about each by name, resumes from step 5 and ends as the uninterrupted run."""
    out = copy_run(rl_reference[0], tmp_path / "run")
    shards = {step: next((out / "checkpoints" / f"step-{step:08d}" / "state").glob("*.distcp")) for step in (6, 7, 8)}
    shards[8].unlink()
    shards[7].write_bytes(shards[7].read_bytes()[:100])
    shards[6].write_bytes(bytes(shards[6].stat().st_size))
    capfd.readouterr()
    assert cli.main(rl_args(rl_setup, out)) == 0
    err = capfd.readouterr().err
    assert f"warning: skipping checkpoint {shards[8].parents[1]}: {shards[8]}: shard file is missing" in err
    assert f"warning: skipping checkpoint {shards[7].parents[1]}: {shards[7]}: shard file is truncated" in err
    assert f"warning: skipping checkpoint {shards[6].parents[1]}: {shards[6].parent}: cannot be loaded" in err
    assert f"resuming from step 5 of {out}" in err
    assert_same_run(out, rl_reference[0])
    # loading a named checkpoint does not fall back: it is an error (`forkflow export`)
    assert cli.main(["export", str(shards[6].parents[1]), str(tmp_path / "exported")]) == 2
    assert "cannot be loaded" in capfd.readouterr().err


@pytest.mark.parametrize("module", [torch, dcp], ids=["trainer-state", "sharded-state"])
def test_a_full_disk_mid_save_is_reported_and_leaves_the_previous_checkpoint(rl_setup, tmp_path, monkeypatch,
                                                                             capfd, module):
    """The trainer-state write (rank 0, torch.save) or the sharded state's (DCP) of step 2's checkpoint fails."""
    real = module.save

    def full_disk(obj, *args, **kwargs):  # a write into step 2's checkpoint fails
        if any("step-00000002" in str(where) for where in [*args, *kwargs.values()]):
            raise OSError(28, "No space left on device")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(module, "save", full_disk)
    out = tmp_path / "run"
    assert cli.main(rl_args(rl_setup, out, "save_every=1", "steps=3")) == 1
    err = capfd.readouterr().err
    assert f"writing checkpoint {out / 'checkpoints' / 'step-00000002'} failed (OSError: [Errno 28] No space" in err
    assert "Traceback" not in err
    assert steps_of(out) == [1] and not list((out / "checkpoints").glob(".*"))
    export_checkpoint(latest_checkpoint(out), tmp_path / "exported")  # loadable


# ------------------------------------------------------------------------------------------ config on resume


def test_a_changed_experiment_is_refused_unless_forced(rl_setup, rl_reference, tmp_path, capfd):
    out = copy_run(rl_reference[0], tmp_path / "run")
    capfd.readouterr()
    assert cli.main(rl_args(rl_setup, out, "optim.lr=2e-3", "rollout.n=8")) == 2
    err = capfd.readouterr().err
    assert "optim.lr (0.001 -> 0.002), rollout.n (4 -> 8)" in err and "allow_config_change=true" in err
    assert "Traceback" not in err and not (out / "model").exists()
    # keys that do not change the experiment: how long, how often it saves, how it reports, where it runs
    assert cli.main(rl_args(rl_setup, out, "save_every=3", "reward.workers=2", "distributed.timeout_s=60",
                            f"steps={STEPS + 1}")) == 0
    assert len(metrics(out)) == STEPS + 1
    assert cli.main(rl_args(rl_setup, out, "optim.lr=2e-3", f"steps={STEPS + 1}", "allow_config_change=true")) == 0
    assert "resuming from step 9" in capfd.readouterr().err
    assert load_config(RLConfig, out / "config.yaml").optim.lr == 2e-3  # the run's config is now the new one


# ------------------------------------------------------------------------------------------- the update guard


def inject(monkeypatch, module, faults: dict[int, str]):
    """Faults in the n-th optimizer update (1-based) of a trainer `module`: `faults[n]` is 'nan-grad' (a NaN put
    into one gradient before clip_gradients takes the norm) or 'inf-loss' (chunked_backward's loss of that
    update reported as inf)."""
    real, calls = module.clip_gradients, []

    def clip(model, max_norm):
        calls.append(1)
        fault = faults.get(len(calls))
        if fault == "nan-grad":
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return real(model, max_norm)

    monkeypatch.setattr(module, "clip_gradients", clip)
    if "inf-loss" in faults.values():
        backward = module.chunked_backward

        def loss(*args, **kwargs):
            value = backward(*args, **kwargs)
            return float("inf") if faults.get(len(calls) + 1) == "inf-loss" else value

        monkeypatch.setattr(module, "chunked_backward", loss)


def test_non_finite_updates_are_skipped_and_counted(rl_setup, tmp_path, monkeypatch):
    """Two updates per step: step 1's first has a NaN gradient, step 2's second an inf loss. Both are skipped
    and counted; the weights stay finite."""
    import forkflow.train.rl as rl

    inject(monkeypatch, rl, {1: "nan-grad", 4: "inf-loss"})
    out = tmp_path / "run"
    trainer = RLTrainer(rl_config(rl_setup, out, "steps=3"))
    trainer.train()
    guard = [(r["guard/skipped_updates"], r["guard/reason"]) for r in metrics(out)]
    assert guard == [(1, "grad_norm=nan"), (1, "loss=inf"), (0, None)]
    assert all(torch.isfinite(t).all() for t in read_state_dict(out / "model").values())
    assert trainer.scheduler.last_epoch == 6 - 2  # the LR schedule counts the updates taken


def test_max_skips_in_a_row_stop_the_run_with_the_last_checkpoint_good(rl_setup, tmp_path, monkeypatch):
    import forkflow.train.rl as rl

    inject(monkeypatch, rl, {n: "nan-grad" for n in range(3, 100)})  # from step 2 on, every update
    out = tmp_path / "run"
    trainer = RLTrainer(rl_config(rl_setup, out, "save_every=1", "guard_max_skips=3"))
    with pytest.raises(TrainingError, match="3 optimizer updates in a row .* skipped; stopping"):
        trainer.train()
    # step 2 (both updates skipped) was saved; step 3's first skip, the third in a row, stopped the run
    assert steps_of(out) == [1, 2]
    first, last = (read_state_dict(export_checkpoint(out / "checkpoints" / f"step-{step:08d}", tmp_path / f"{step}"))
                   for step in (1, 2))
    now = read_state_dict(export_model(trainer.model, tmp_path / "now", trainer.world))
    assert all(torch.equal(first[k], last[k]) and torch.equal(first[k], now[k]) for k in first)


def test_sft_skips_an_inf_loss_and_the_command_stops_cleanly_after_max_skips(tmp_path, tiny_checkpoint,
                                                                               char_tokenizer_dir, monkeypatch, capfd):
    import forkflow.train.sft as sft
    from tests.test_sft import write_synthetic_set

    model_dir, _ = tiny_checkpoint()
    write_synthetic_set(tmp_path / "sft.jsonl")
    args = ["sft", "configs/sft_tiny.yaml", f"model.path={model_dir}", f"model.tokenizer={char_tokenizer_dir}",
            f"data.train={tmp_path / 'sft.jsonl'}", "progress=false", "max_steps=4", "batch_size=4"]
    with monkeypatch.context() as patch:
        inject(patch, sft, {2: "inf-loss"})
        assert cli.main([*args, f"out={tmp_path / 'one'}"]) == 0
    records = metrics(tmp_path / "one")
    assert [r["guard/skipped_updates"] for r in records] == [0, 1, 0, 0] and records[1]["guard/reason"] == "loss=inf"
    inject(monkeypatch, sft, {n: "nan-grad" for n in range(2, 100)})
    capfd.readouterr()
    assert cli.main([*args, f"out={tmp_path / 'stopped'}", "guard_max_skips=2", "save_every=1"]) == 1
    err = capfd.readouterr().err
    assert "forkflow sft: 2 optimizer updates in a row had a non-finite loss or gradient norm" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------- refused input


@pytest.mark.parametrize("override, message", [
    ("steps=abc", "command line 'steps=abc': steps: expected int, got 'abc'"),
    ("optim.lr=-1", "command line 'optim.lr=-1': optim.lr must be > 0, got -1.0"),
    ("rollout.n=1", "command line 'rollout.n=1': rollout.n must be >= 2, got 1 (group-relative advantages"),
    ("select.ratio=1.5", "command line 'select.ratio=1.5': select.ratio must be in (0, 1], got 1.5"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1] must be in [0, 1), got 1.0"),
    ("prompts_per_step=3", "command line 'prompts_per_step=3' and configs/rl_tiny.yaml: prompts_per_step (3) "
                           "must be a multiple of mini_batch_prompts (8)"),
    ("eval.k=0", "command line 'eval.k=0': eval.k must be >= 1, got 0"),
    ("keep_last=-1", "keep_last must be >= 0"),
    ("device=gpu", "command line 'device=gpu': device: 'gpu' is not a device"),
    ("rollout.max_batch_tokens=100", "rollout.max_batch_tokens (100) cannot hold one request: a prompt of "
                                     "data.max_prompt_tokens (64) plus rollout.max_new_tokens (128) takes 192; set "
                                     "it to at least that, or 0 (no bound)"),
])
def test_bad_values_on_the_command_line_are_blamed_on_it(override, message):
    with pytest.raises(ConfigError) as refused:
        load_config(RLConfig, "configs/rl_tiny.yaml", [override])
    assert message in str(refused.value)


def test_a_batch_bound_for_vllm_is_refused():
    with pytest.raises(ConfigError, match="rollout.max_batch_tokens bounds the torch backend's KV cache; vLLM's is "
                                          "rollout.vllm_kv_cache_gb"):
        load_config(RLConfig, "configs/rl_tiny.yaml", ["rollout.backend=vllm", "rollout.max_batch_tokens=1000"])


def test_bad_values_in_the_yaml_file_are_blamed_on_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((ROOT / "configs" / "rl_tiny.yaml").read_text().replace("steps: 100", "steps: 0"))
    with pytest.raises(ConfigError, match=f"^{path}: steps must be >= 1, got 0$"):
        load_config(RLConfig, path)
    assert load_config(RLConfig, path, ["steps=5"]).steps == 5  # the command line wins
    path.write_text("rollout:\n  top_p: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: rollout.top_p must be in \(0, 1\], got 0.0$"):
        load_config(RLConfig, path)


def test_unusable_paths_are_refused_and_nothing_is_deleted(rl_setup, tmp_path, capfd):
    def refused(*extra: str) -> str:
        assert cli.main(rl_args(rl_setup, tmp_path / "run", *extra)) == 2
        err = capfd.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    assert "model.path=/nonexistent: no such directory" in refused("model.path=/nonexistent")
    assert f"model.path={rl_setup}: no config.json" in refused(f"model.path={rl_setup}")
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    assert f"{notes} exists and is not a directory" in refused(f"out={notes}")
    mine = tmp_path / "mine"
    (mine / "thesis").mkdir(parents=True)
    (mine / "thesis" / "chapter1.tex").write_text("precious")
    assert f"{mine} already holds files and no {MARKER} marker" in refused(f"out={mine}")
    sft_run = tmp_path / "sft-run"
    sft_run.mkdir()
    (sft_run / MARKER).write_text('{"kind": "sft"}\n')
    assert "holds a forkflow 'sft' run, not a 'rl' run" in refused(f"out={sft_run}")
    assert notes.read_text() == "precious" and (mine / "thesis" / "chapter1.tex").read_text() == "precious"
    assert sorted(p.name for p in mine.iterdir()) == ["thesis"] and sorted(os.listdir(sft_run)) == [MARKER]
    assert "eval.files: /missing.jsonl: no such file" in refused("eval.files=[/missing.jsonl]")


# ----------------------------------------------------------------------------------------------- SFT


def test_sft_stopped_by_sigusr1_then_rerun_gives_the_uninterrupted_run(tmp_path, tiny_checkpoint, char_tokenizer_dir,
                                                                       capfd):
    from tests.test_sft import write_synthetic_set

    model_dir, _ = tiny_checkpoint()
    write_synthetic_set(tmp_path / "sft.jsonl")

    def args(out: Path) -> list[str]:
        return ["sft", "configs/sft_tiny.yaml", f"model.path={model_dir}", f"model.tokenizer={char_tokenizer_dir}",
                f"data.train={tmp_path / 'sft.jsonl'}", "progress=false", "batch_size=2", "epochs=5",
                "save_every=0", "keep_last=2", f"out={out}"]

    reference = tmp_path / "reference"
    assert cli.main([*args(reference), "save_every=7"]) == 0
    assert steps_of(reference) == [35, 40]  # keep_last=2
    out, log = tmp_path / "run", tmp_path / "run.log"
    job = start(args(out), log)
    wait_for(lambda: metrics(out), job, log)
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=60) == 0, log.read_text()
    (step,) = steps_of(out)
    assert step < 40 and f"preempted at step {step} of 40" in log.read_text()
    assert cli.main(args(out)) == 0
    assert f"resuming from step {step} of {out}" in capfd.readouterr().err
    assert_same_run(out, reference)
