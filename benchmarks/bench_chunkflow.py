"""ChunkFlow against padding and plain packing on a long-tailed length mix: tokens/s and peak memory on CPU.

Each (method, data set) runs in two processes of its own. Tokens/s is the best of `--repeats` steps in the
first. Peak memory is the second's resident-set high-water mark (Linux VmHWM, reset after a warm-up step on
a throwaway model, just before the measured model is built) minus its resident set at the reset: weights,
gradients, AdamW state, activations and allocator overhead of one training step, without the Python/torch
runtime. The second process pins glibc's mmap threshold at its documented default, 128 KiB
(MALLOC_MMAP_THRESHOLD_), so that tensors of 128 KiB and more get their own mappings and go back to the
system when freed. Left dynamic, glibc raises the threshold to the largest block freed so far, serves such
tensors from the heap and keeps the freed ones resident; how much it keeps then depends on address-space
layout, not on the step: identical runs of this benchmark differ by up to 20 MB (ChunkFlow at 1K: 78-88 MB,
at 8K: 98-119 MB, against 58-60 and 69-70 MB pinned). The first process's peak, under the dynamic
threshold, is reported too (`peak_mb_dynamic_mmap`). All methods compute the same loss (summed next-token
cross-entropy / number of targets), printed as a check.

    .venv/bin/python benchmarks/bench_chunkflow.py            # prints a table, then one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from forkflow.chunkflow import build_chunks, chunked_backward
from forkflow.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6)
RUNS = [("padded", 8192), ("packed", 8192), ("chunkflow", 8192), ("padded", 1024), ("chunkflow", 1024)]


def long_tail_lengths(num_sequences: int, max_length: int, seed: int) -> list[int]:
    """90 % in [32, 256], 8 % in (256, 1024], 2 % in (1024, 8192] with one of exactly 8192; shuffled. Lengths
    above `max_length` are capped to it, so the 8K and 1K data sets are the same draw."""
    rng = random.Random(seed)
    n_long = max(1, round(0.02 * num_sequences))
    n_mid = round(0.08 * num_sequences)
    lengths = [8192] + [rng.randint(1025, 8192) for _ in range(n_long - 1)]
    lengths += [rng.randint(257, 1024) for _ in range(n_mid)]
    lengths += [rng.randint(32, 256) for _ in range(num_sequences - len(lengths))]
    rng.shuffle(lengths)
    return [min(n, max_length) for n in lengths]


def padded_backward(model: Qwen3ForCausalLM, sequences: list[torch.Tensor], micro_batch: int) -> float:
    """Micro-batches of `micro_batch` sequences in data order, each padded to its longest sequence."""
    normalizer = sum(len(s) - 1 for s in sequences)
    total = 0.0
    for start in range(0, len(sequences), micro_batch):
        batch = sequences[start : start + micro_batch]
        width = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, W]
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        total += padded_micro_batch_backward(model, ids, mask, normalizer)
    return total


def padded_micro_batch_backward(model, ids: torch.Tensor, mask: torch.Tensor, normalizer: int) -> float:
    """ids, mask [B, W]; backward of Σ next-token CE over real tokens / normalizer (logits die on return)."""
    logits = model(ids, attention_mask=mask).logits[:, :-1]  # [B, W-1, V]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    loss = loss / normalizer
    loss.backward()
    return loss.item()


def run_method(method: str, max_length: int, args) -> dict:
    """Training steps (forward, backward, AdamW) on the whole batch, in the current process (a child of
    `main`): the fastest of `args.repeats` wall times, and the first step's peak memory above the process's
    footprint before the model existed (so weights, gradients, optimizer state and activations all count)."""
    lengths = long_tail_lengths(args.sequences, max_length, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    sequences = [torch.randint(0, MODEL["vocab_size"], (n,), generator=g) for n in lengths]
    warm_up([s[:96] for s in sequences[:4]], args)
    baseline = memory_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(Qwen3Config(**MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds, losses, peaks = [], [], []
    for _ in range(args.repeats):
        began = time.perf_counter()
        if method == "padded":
            losses.append(padded_backward(model, sequences, args.micro_batch))
        elif method == "packed":  # whole sequences bin-packed up to the longest = ChunkFlow, C = max length
            losses.append(chunked_backward(model, build_chunks(sequences, max(lengths)), keep=1))
        else:
            losses.append(chunked_backward(model, build_chunks(sequences, args.chunk_size), keep=args.keep))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - began)
        peaks.append(memory_mb("VmHWM") - baseline)
    peak = peaks[0]  # the first step's: later ones add only allocator fragmentation
    tokens = sum(lengths)
    return {"method": method, "max_length": max_length, "tokens": tokens, "seconds": round(min(seconds), 2),
            "tokens_per_s": round(tokens / min(seconds), 1), "peak_mb": round(peak, 1),
            "loss": round(losses[0], 5)}


def warm_up(sequences: list[torch.Tensor], args) -> None:
    """One short step of every method on a throwaway model, so that thread pools, lazily loaded kernels and
    their code pages are in place before memory is measured."""
    model = Qwen3ForCausalLM(Qwen3Config(**MODEL))
    optimizer = torch.optim.AdamW(model.parameters())
    padded_backward(model, sequences, args.micro_batch)
    chunked_backward(model, build_chunks(sequences, 64), keep=args.keep)
    optimizer.step()


def run_child(method: str, max_length: int, env: dict, *extra: str) -> dict:
    """`run_method` in a fresh process with `env` added to the environment; its result."""
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], *extra, "--child", method, str(max_length)],
                           capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(child.stdout.strip().splitlines()[-1])


def memory_mb(field: str) -> float:
    kb = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(kb.group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=100, help="sequences in the global batch")
    parser.add_argument("--chunk-size", type=int, default=1024, help="ChunkFlow's C")
    parser.add_argument("--keep", type=int, default=1, help="ChunkFlow's K")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per padded micro-batch")
    parser.add_argument("--repeats", type=int, default=2, help="training steps per run; the fastest is kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: stable timings on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MAX_LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_method(args.child[0], int(args.child[1]), args)))
        return

    results = []
    for method, max_length in RUNS:
        r = run_child(method, max_length, {})
        memory = run_child(method, max_length, {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}, "--repeats", "1")
        r["peak_mb_dynamic_mmap"], r["peak_mb"] = r["peak_mb"], memory["peak_mb"]
        results.append(r)
        print(f"{method:>9} max {max_length:>5}: {r['tokens_per_s']:>8.0f} tokens/s  {r['seconds']:>6.1f} s  "
              f"peak {r['peak_mb']:>7.1f} MB ({r['peak_mb_dynamic_mmap']:>7.1f} MB dynamic mmap threshold)  "
              f"loss {r['loss']:.5f}", file=sys.stderr)
    by = {(r["method"], r["max_length"]): r for r in results}
    chunkflow, chunkflow_1k = by["chunkflow", 8192], by["chunkflow", 1024]
    speedup_padded = chunkflow["tokens_per_s"] / by["padded", 8192]["tokens_per_s"]
    speedup_packed = chunkflow["tokens_per_s"] / by["packed", 8192]["tokens_per_s"]
    memory_ratio = chunkflow["peak_mb"] / chunkflow_1k["peak_mb"]
    memory_ratio_dynamic = chunkflow["peak_mb_dynamic_mmap"] / chunkflow_1k["peak_mb_dynamic_mmap"]
    print(json.dumps({
        "benchmark": "chunkflow", "model": MODEL, "sequences": args.sequences, "chunk_size": args.chunk_size,
        "keep": args.keep, "padded_micro_batch": args.micro_batch, "threads": args.threads,
        "results": results,
        "chunkflow_vs_padded_tokens_per_s": round(speedup_padded, 2),
        "chunkflow_vs_packed_tokens_per_s": round(speedup_packed, 2),
        "chunkflow_peak_8k_over_1k": round(memory_ratio, 3),
        "chunkflow_peak_8k_over_1k_dynamic_mmap": round(memory_ratio_dynamic, 3),
        "targets_met": {"speedup_vs_padded>=1.5": speedup_padded >= 1.5,
                        "peak_8k_within_1.25x_of_1k": memory_ratio <= 1.25},
    }))


if __name__ == "__main__":
    main()
