"""Scaling out, proven against one process: real multi-process gloo jobs on CPU (torch.multiprocessing and
torchrun) whose results are compared with a single process on the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forkflow.chunkflow import assign_ranks, attention_pair_cost, build_chunks, chunked_backward, chunked_forward
from forkflow.chunkflow.schedule import lockstep
from forkflow.distributed import DistributedConfig, World, reduce_gradients, shard_model, shutdown
from forkflow.run_dir import MARKER
from tests.test_chunkflow import cross_entropy, random_batch, reference_gradients, tiny_model
from tests.test_train_rl import tiny_config

LENGTHS = [3, 13, 5, 2, 11, 4, 7, 19]  # C = 5: chains of 1 to 4 chunks, spread unevenly over the ranks


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, init_file, *args) on `world` gloo ranks."""
    mp.spawn(fn, args=(world, *args), nprocs=world)


def join(rank: int, world: int, init_file: str) -> World:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    return World(rank, world, torch.device("cpu"), dist.group.WORLD)


def full_grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()}


def chunk_grad_worker(rank, world, init_file, out_file, strategy, moe, keep):
    w = join(rank, world, init_file)
    model = shard_model(tiny_model(moe), w, DistributedConfig(strategy=strategy))
    chunks = build_chunks(random_batch(LENGTHS)[0], 5)
    share = assign_ranks(chunks, world, attention_pair_cost(model.config))[rank]
    group = w.group if strategy == "fsdp" else None
    chunked_backward(model, share, keep=keep, normalizer=sum(n - 1 for n in LENGTHS), group=group)
    reduce_gradients(model, w)
    grads = full_grads(model)
    if rank == 0:
        torch.save(grads, out_file)
    del model
    shutdown()


@pytest.mark.parametrize("strategy,moe,keep,world", [
    ("replicate", True, 1, 2), ("fsdp", False, 1, 2), ("fsdp", True, 2, 2), ("fsdp", False, 2, 3),
])
def test_chunked_gradients_over_ranks_equal_one_full_backward(tmp_path, strategy, moe, keep, world):
    """The batch's chunks spread over ranks (chains of different lengths, so under FSDP the ranks run
    different schedules in lockstep) give the gradient of one full-sequence backward of the whole batch."""
    spawn(chunk_grad_worker, world, str(tmp_path / "init"), str(tmp_path / "grads.pt"), strategy, moe, keep)
    model = tiny_model(moe)
    seqs, _ = random_batch(LENGTHS)
    _, ref = reference_gradients(model, seqs, None, cross_entropy, sum(n - 1 for n in LENGTHS))
    grads = torch.load(tmp_path / "grads.pt")
    assert max((grads[n] - ref[n]).abs().max().item() for n in ref) <= 1e-10


def chunk_forward_worker(rank, world, init_file, out_file):
    w = join(rank, world, init_file)
    model = shard_model(tiny_model(False), w, DistributedConfig())
    chunks = build_chunks(random_batch(LENGTHS)[0], 5)
    share = assign_ranks(chunks, world, attention_pair_cost(model.config))[rank]
    seen = chunked_forward(model, share, lambda out, chunk: out.hidden_states[0].sum(-1, keepdim=True),
                           num_sequences=len(LENGTHS), group=w.group)
    everyone = [None] * world
    dist.all_gather_object(everyone, [None if v is None else v for v in seen])
    if rank == 0:
        merged = [next(v[i] for v in everyone if v[i] is not None and len(v[i])) for i in range(len(LENGTHS))]
        torch.save(merged, out_file)
    del model
    shutdown()


def test_sharded_no_grad_forward_over_ranks_equals_one_process(tmp_path):
    spawn(chunk_forward_worker, 2, str(tmp_path / "init"), str(tmp_path / "out.pt"))
    model = tiny_model(False)
    expected = chunked_forward(model, build_chunks(random_batch(LENGTHS)[0], 5),
                               lambda out, chunk: out.hidden_states[0].sum(-1, keepdim=True))
    got = torch.load(tmp_path / "out.pt")
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-10)


def test_lockstep_plan_holds_every_program_in_order():
    programs = [[0, 0, 2, 1, 1], [1, 1, 1], [], [0, 1, 1]]
    plan = lockstep(programs)
    for program in programs:
        it = iter(plan)
        assert all(any(u == v for v in it) for u in program)  # a subsequence of the plan
    assert len(plan) <= sum(map(len, programs))


# ------------------------------------------------------------------------------------------- RL over ranks

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rl_worker(rank, world, port, root, out, overrides, result_file):
    """RLTrainer as torchrun would start it on `world` ranks; saves every rank's kept responses per step."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train_recording_responses(tiny_config(root, out, **overrides), result_file)
    shutdown()


def train_recording_responses(cfg, result_file) -> None:
    from forkflow.distributed import gather_objects
    from forkflow.train.rl import RLTrainer

    trainer = RLTrainer(cfg)
    responses, generate_batch = [], trainer.generate_batch

    def recorded(*args):
        batch, record = generate_batch(*args)
        responses.extend((trainer.step, r.group, r.sample, r.token_ids.tolist(), r.reward) for r in batch)
        return batch, record

    trainer.generate_batch = recorded
    trainer.train()
    everything = sorted(x for share in gather_objects(responses, trainer.world) for x in share)
    if trainer.world.main:
        torch.save(everything, result_file)


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    from tests.test_train_rl import write_rl_setup

    return {moe: write_rl_setup(tmp_path_factory.mktemp(f"rl-moe{moe}"), moe) for moe in (False, True)}


def run_rl(root, out, world, overrides) -> tuple[list, dict[str, torch.Tensor]]:
    from forkflow.models.checkpoint import read_state_dict

    spawn(rl_worker, world, free_port(), root, out, overrides, str(out / "responses.pt")) if world > 1 else \
        rl_worker(0, 1, free_port(), root, out, overrides, str(out / "responses.pt"))
    return torch.load(out / "responses.pt"), read_state_dict(out / "model")


RL_OVERRIDES = {"prompts_per_step": 4, "mini_batch_prompts": 2, "steps": 2, "rollout.n": 4,
                "rollout.max_new_tokens": 10, "reward.verifier": "tests.parity_verifier:even_length",
                "algo.dynamic_sampling": True, "chunkflow.chunk_size": 12, "chunkflow.keep": 2, "save_every": 1}


@pytest.mark.parametrize("strategy,moe,worlds", [("fsdp", False, (2, 4)), ("fsdp", True, (2,)),
                                                  ("replicate", False, (2,))])
def test_rl_steps_on_2_and_4_ranks_equal_one_process(rl_setup, tmp_path, strategy, moe, worlds):
    """Dynamic sampling, two mini-batches per step, global top-20 %, sequences split into dependent chunks:
    the kept responses are token-identical and the weights after 2 steps equal one process's.

    MoE runs with AdamW eps 1e-6: with renormalised top-k routing the router rows of experts a token did not
    pick get a gradient that is 0 in exact arithmetic and float noise (~1e-9) in practice, which eps 1e-8
    would turn into lr-sized steps of either sign, in one process as on N ranks."""
    overrides = {**RL_OVERRIDES, "distributed.strategy": strategy, **({"optim.eps": 1e-6} if moe else {})}
    one, weights = run_rl(rl_setup[moe], tmp_path / "one", 1, overrides)
    assert len(one) == 2 * 4 * 4 and len({r[4] for r in one}) == 2  # 2 steps x 4 groups x 4; mixed rewards
    for world in worlds:
        got, got_weights = run_rl(rl_setup[moe], tmp_path / f"world{world}", world, overrides)
        assert got == one
        assert close(got_weights, weights)
    if strategy == "fsdp" and not moe:  # the step-1 checkpoint of 2 ranks resumed on 1 and on 4
        import shutil

        for world in (1, 4):
            out = tmp_path / f"world2-then-{world}"
            shutil.copytree(tmp_path / "world2" / "checkpoints" / "step-00000001",
                            out / "checkpoints" / "step-00000001")
            shutil.copy(tmp_path / "world2" / MARKER, out / MARKER)  # a forkflow run: it may be resumed
            got, got_weights = run_rl(rl_setup[moe], out, world, overrides)
            assert got == [r for r in one if r[0] == 1]  # step 2's responses (recorded at step index 1)
            assert close(got_weights, weights)


# ------------------------------------------------------------------------------------------ SFT over ranks

def sft_worker(rank, world, port, overrides, result_file):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train_sft_measuring_shards(overrides, result_file)
    shutdown()


def train_sft_measuring_shards(overrides, result_file) -> None:
    """Train, then save (rank 0) every rank's bytes of parameters + gradients + AdamW state held locally."""
    from forkflow.config import load_config
    from forkflow.train.sft import SFTConfig, train
    from tests.test_sft import ROOT

    seen = {}

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    def keep_optimizer(optimizer, *args, **kwargs):
        model_params = [p for group in optimizer.param_groups for p in group["params"]]
        seen["bytes"] = sum(local_bytes(p) + local_bytes(p.grad) for p in model_params) + sum(
            local_bytes(v) for state in optimizer.state.values() for v in state.values() if v.dim())
        seen["total"] = sum(p.numel() for p in model_params)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(keep_optimizer)  # after each step, grads still there
    train(load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml", overrides))
    from forkflow.distributed import gather_objects, init_world

    everyone = gather_objects(seen, init_world(DistributedConfig()))
    if everyone and (not dist.is_initialized() or dist.get_rank() == 0):
        torch.save(everyone, result_file)


def run_sft(out, world, overrides):
    from forkflow.models.checkpoint import read_state_dict

    args = (free_port(), [*overrides, f"out={out}"], str(out.parent / f"{out.name}-shards.pt"))
    spawn(sft_worker, world, *args) if world > 1 else sft_worker(0, 1, *args)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, read_state_dict(out / "model"), torch.load(args[2])


def close(a: dict, b: dict, tolerance: float = 1e-5) -> bool:
    return a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= tolerance


@pytest.fixture
def sft_overrides(tmp_path, tiny_checkpoint, char_tokenizer_dir):
    from tests.test_sft import write_synthetic_set

    def make(moe: bool) -> list[str]:
        model_dir, _ = tiny_checkpoint(moe=moe, hidden_size=64, intermediate_size=96)
        write_synthetic_set(tmp_path / "sft.jsonl")
        return [f"model.path={model_dir}", f"model.tokenizer={char_tokenizer_dir}",
                f"data.train={tmp_path / 'sft.jsonl'}", "progress=false", "batch_size=5", "max_steps=4",
                "save_every=2", "chunkflow.chunk_size=24",
                "chunkflow.keep=2", "optim.lr=0.01", "optim.eps=1e-6"]

    return make


@pytest.mark.parametrize("moe", [False, True])
def test_sft_on_2_ranks_equals_one_process_with_a_half_share_of_the_state_each(tmp_path, sft_overrides, moe):
    """The same global batches (5 conversations: they do not divide over the ranks, chunks are placed by
    cost) on 1 and 2 ranks: same losses, same weights; each rank holds half of the parameters, gradients
    and AdamW state."""
    overrides = sft_overrides(moe)
    one, weights, _ = run_sft(tmp_path / "one", 1, overrides)
    two, two_weights, shards = run_sft(tmp_path / "two", 2, overrides)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert close(two_weights, weights)
    total = shards[0]["total"] * 4 * 4  # fp32 parameters, gradients, exp_avg, exp_avg_sq
    assert all(abs(share["bytes"] - total / 2) <= 0.1 * total / 2 for share in shards), (shards, total)


def test_checkpoints_saved_on_2_ranks_resume_on_1_and_4_and_the_reverse(tmp_path, sft_overrides):
    """Interrupted after step 2 (its step-2 checkpoint and metrics kept), resumed on another number of ranks:
    the run ends where an uninterrupted one-process run ends."""
    import shutil

    overrides = sft_overrides(False)
    one, weights, _ = run_sft(tmp_path / "one", 1, overrides)
    two, _, _ = run_sft(tmp_path / "two", 2, overrides)
    for source, world in (("two", 1), ("two", 4), ("one", 2)):
        out = tmp_path / f"{source}-then-{world}"
        shutil.copytree(tmp_path / source / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000002")
        shutil.copy(tmp_path / source / "metrics.jsonl", out / "metrics.jsonl")
        shutil.copy(tmp_path / source / MARKER, out / MARKER)
        resumed, resumed_weights, _ = run_sft(out, world, overrides)
        assert [r["step"] for r in resumed] == [1, 2, 3, 4]
        assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in one], rel=1e-5)
        assert close(resumed_weights, weights), (source, world)


# ---------------------------------------------------------------------------------------- torchrun jobs

def torchrun(*args: str, nproc: int = 2, env: dict | None = None, **kwargs):
    """`torchrun ... -m forkflow.cli ARGS` as a subprocess (one thread per rank)."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *kwargs.pop("launch", []),
               "-m", "forkflow.cli", *args]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_two_nodes_train_the_tiny_rl_config_to_the_weights_of_one_process(rl_setup, tmp_path):
    """`torchrun --nnodes 2 --node-rank 0/1 --rdzv-backend c10d` on one machine, one rank per "node"."""
    from forkflow.models.checkpoint import read_state_dict
    from tests.test_train_rl import tiny_overrides

    overrides = [f"{k}={v}" for k, v in RL_OVERRIDES.items()] + [
        f"eval.files=[{rl_setup[False] / 'train.jsonl'}]", "eval.k=2", "eval.batch_prompts=7"]
    one = tmp_path / "one"
    assert cli_main(["train", "configs/rl_tiny.yaml", *tiny_overrides(rl_setup[False], one), *overrides]) == 0
    port = free_port()
    launch = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=forkflow-test"]
    argv = ["train", "configs/rl_tiny.yaml", *tiny_overrides(rl_setup[False], tmp_path / "two"), *overrides]
    nodes = [torchrun(*argv, nproc=1, launch=[*launch, f"--node-rank={rank}"]) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert close(read_state_dict(tmp_path / "two" / "model"), read_state_dict(one / "model"))
    evals = [json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (one, tmp_path / "two")]
    assert evals[0]["eval/train/avg@2"] == evals[1]["eval/train/avg@2"]  # 40 prompts: 20 per rank, the same samples


def test_a_killed_rank_ends_the_job_with_an_error_within_the_timeout(rl_setup, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.test_train_rl import tiny_overrides

    out = tmp_path / "run"
    job = torchrun("train", "configs/rl_tiny.yaml", *tiny_overrides(rl_setup[False], out), "steps=1000",
                   "distributed.timeout_s=30", "eval.files=[]")
    began = time.monotonic()
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert job.poll() is None and time.monotonic() - began < 120, job.communicate()[0]
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    killed = time.monotonic()
    output = job.communicate(timeout=90)[0]
    assert job.returncode != 0 and time.monotonic() - killed < 40, output


def cli_main(argv: list[str]) -> int:
    from forkflow import cli

    return cli.main(argv)


# -------------------------------------------------------------------------------------------- bad input

def uneven_worker(rank, world, port, root, out, result_file):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from forkflow.config import ConfigError
    from forkflow.train.rl import RLTrainer

    try:
        RLTrainer(tiny_config(root, out, prompts_per_step=3, mini_batch_prompts=1))
    except ConfigError as e:
        if rank == 0:
            Path(result_file).write_text(str(e))
    shutdown()


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_refused(rl_setup, tmp_path):
    spawn(uneven_worker, 2, free_port(), rl_setup[False], tmp_path / "run", str(tmp_path / "error.txt"))
    assert (tmp_path / "error.txt").read_text() == (
        "prompts_per_step (3) must be a multiple of the number of ranks (2): each rank generates an equal share "
        "of every round")


def test_resuming_with_another_model_names_the_difference(tmp_path, sft_overrides, tiny_checkpoint, capsys):
    overrides = sft_overrides(False)
    out = tmp_path / "run"
    assert cli_main(["sft", "configs/sft_tiny.yaml", *overrides, f"out={out}", "max_steps=2"]) == 0
    other, _ = tiny_checkpoint(hidden_size=32)
    assert cli_main(["sft", "configs/sft_tiny.yaml", *overrides, f"out={out}", "max_steps=4",
                     f"model.path={other}", "allow_config_change=true"]) == 2
    assert "the checkpoint's model differs from model.path's in 'hidden_size' (64 vs 32)" in capsys.readouterr().err
