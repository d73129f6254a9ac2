"""One SFT step of the same global batch on 1 process and on 2 gloo ranks (FSDP2, ChunkFlow), on CPU:
per-rank peak memory, the step time ratio, and the memory planner's prediction beside each measured peak.

The global batch is long-tailed (90 % of sequences <= 256 tokens, a few up to 2K) and split into chunks of
C tokens spread over the ranks by cost; every rank runs one thread, so 2 ranks use the machine's 2 cores
where 1 process uses one. Peak memory is each process's resident-set high-water mark (Linux VmHWM, reset
after imports and a warm-up on a throwaway model) minus its resident set at the reset: the model's
weights, gradients and AdamW state (sharded 1/N under FSDP), activations, gathered parameters and
communication buffers, without the Python/torch runtime. glibc's mmap threshold is pinned at 128 KiB
(as in bench_chunkflow.py) so freed tensors leave the resident set. Beside each peak: what `forkflow plan`
predicts for the step (bytes held by tensors; the resident set adds the allocator's overhead).

    .venv/bin/python benchmarks/bench_distributed.py      # prints a table, then one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from forkflow.chunkflow import assign_ranks, attention_pair_cost, build_chunks, chunked_backward, total_loss_weight
from forkflow.distributed import DistributedConfig, World, shard_model, shutdown
from forkflow.distributed.plan import Setting, parameter_counts, peak, plan_phases
from forkflow.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from forkflow.train.state import clip_gradients

MODEL = dict(vocab_size=16384, hidden_size=384, intermediate_size=1152, num_hidden_layers=6,
             num_attention_heads=6, num_key_value_heads=2, head_dim=64, rope_theta=1e6)


def lengths(num_sequences: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    out = [2048] + [rng.randint(257, 1024) for _ in range(num_sequences // 10)]
    return out + [rng.randint(32, 256) for _ in range(num_sequences - len(out))]


def resident_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    w = World(rank, world, torch.device("cpu"), dist.group.WORLD if world > 1 else None)
    config = Qwen3Config(**MODEL)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, config.vocab_size, (n,), generator=g) for n in lengths(args.sequences, 0)]
    chunks = build_chunks(sequences, args.chunk_size)
    normalizer = total_loss_weight(chunks)
    with open("/proc/self/clear_refs", "w") as f:  # the high-water mark restarts here
        f.write("5")
    baseline = resident_mb("VmRSS")
    torch.manual_seed(0)
    model = shard_model(Qwen3ForCausalLM(config), w, DistributedConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    mine = assign_ranks(chunks, world, attention_pair_cost(config))[rank]
    times = []
    for _ in range(args.warmup + args.steps):
        began = time.perf_counter()
        chunked_backward(model, mine, keep=args.keep, normalizer=normalizer, group=w.group)
        clip_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if w.group is not None:
            dist.barrier()
        times.append(time.perf_counter() - began)
    results[rank] = {"peak_mb": resident_mb("VmHWM") - baseline, "step_s": statistics.median(times[args.warmup:]),
                     "params": sum(p.numel() for p in model.parameters()),
                     "chunks": len(mine), "tokens": sum(len(c) for c in mine)}
    del model, optimizer
    shutdown()


def predicted_mb(world: int, args) -> float:
    """`forkflow plan`'s peak for this step (tensor bytes; the measured resident set adds allocator overhead)."""
    config = Qwen3Config(**MODEL)
    setting = Setting(kind="sft", world=world, strategy="fsdp", precision="fp32", param_dtype="auto",
                      chunk_size=args.chunk_size, keep=args.keep, longest=max(lengths(args.sequences, 0)),
                      attention="blockwise")
    return peak(plan_phases(config, parameter_counts(config), setting))[0] / 2**20


def run(world: int, args) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(world, port, args, results), nprocs=world)
    return [dict(results[r]) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=24)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # inherited by the spawned ranks
    one, two = run(1, args), run(2, args)
    state_mb = one[0]["params"] * 16 / 2**20  # fp32 weights, gradients, exp_avg, exp_avg_sq
    print(f"model: {one[0]['params'] / 1e6:.1f} M parameters, {state_mb:.0f} MB of training state; "
          f"global batch {args.sequences} sequences, C = {args.chunk_size}, K = {args.keep}", file=sys.stderr)
    print(f"{'ranks':>5} {'rank':>4} {'chunks':>6} {'tokens':>6} {'peak MB':>8} {'planned MB':>10} {'step s':>7}",
          file=sys.stderr)
    for world, results in ((1, one), (2, two)):
        for rank, r in enumerate(results):
            print(f"{world:>5} {rank:>4} {r['chunks']:>6} {r['tokens']:>6} {r['peak_mb']:>8.0f} "
                  f"{predicted_mb(world, args):>10.0f} {r['step_s']:>7.2f}", file=sys.stderr)
    step_two = max(r["step_s"] for r in two)
    result = {
        "benchmark": "distributed_sft_step", "model_params": one[0]["params"], "sequences": args.sequences,
        "chunk_size": args.chunk_size, "keep": args.keep,
        "peak_mb_1_rank": one[0]["peak_mb"], "peak_mb_2_ranks": [r["peak_mb"] for r in two],
        "peak_ratio_2_over_1": max(r["peak_mb"] for r in two) / one[0]["peak_mb"],
        "planned_mb_1_rank": predicted_mb(1, args), "planned_mb_2_ranks": predicted_mb(2, args),
        "step_s_1_rank": one[0]["step_s"], "step_s_2_ranks": step_two,
        "speedup_2_ranks": one[0]["step_s"] / step_two,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
