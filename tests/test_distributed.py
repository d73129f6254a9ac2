"""Scaling out, proven against one process: real multi-process gloo jobs on CPU (torch.multiprocessing and
torchrun) whose results are compared with a single process on the same global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forkflow.chunkflow import assign_ranks, attention_pair_cost, build_chunks, chunked_backward, chunked_forward
from forkflow.chunkflow.schedule import lockstep
from forkflow.distributed import DistributedConfig, World, reduce_gradients, shard_model, shutdown
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
                "algo.dynamic_sampling": True, "chunkflow.chunk_size": 12, "chunkflow.keep": 2}


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
        assert max((got_weights[k] - weights[k]).abs().max().item() for k in weights) <= 1e-5
