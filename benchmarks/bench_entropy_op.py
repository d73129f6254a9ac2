"""The chunked log-prob/entropy op against full [T, V] logits at Qwen3's vocabulary: peak memory above the
inputs and wall time, for scoring (forward) and for the RL loss (forward + backward of the log-probs).

Each (method, mode) runs in its own process; peak memory is that process's resident-set high-water mark
(Linux VmHWM, reset once the inputs exist) minus the resident set at the reset. fp32 on CPU.

    .venv/bin/python benchmarks/bench_entropy_op.py                  # V 151936, T 4096, hidden 1024
    .venv/bin/python benchmarks/bench_entropy_op.py --tokens 1024    # a quicker look

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from forkflow.ops import DEFAULT_CHUNK_SIZE, token_logprobs_and_entropy

MIB = 2**20


def resident_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


def full_logits(hidden, weight, targets):
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)  # [T, V]
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(1, targets[:, None])[:, 0], entropy


def chunked(hidden, weight, targets):
    return token_logprobs_and_entropy(hidden, weight, targets, chunk_size=DEFAULT_CHUNK_SIZE)


def child(method: str, mode: str, tokens: int, hidden_size: int, vocab: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    training = mode == "forward+backward"
    hidden = torch.randn(tokens, hidden_size, generator=g).requires_grad_(training)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).requires_grad_(training)
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    baseline = resident_kib("VmRSS")
    start = time.perf_counter()
    with torch.set_grad_enabled(training):
        logprobs, entropy = {"chunked": chunked, "full logits": full_logits}[method](hidden, weight, targets)
        if training:
            logprobs.sum().backward()
    seconds = time.perf_counter() - start
    peak = (resident_kib("VmHWM") - baseline) * 1024
    check = {"logprob_sum": logprobs.sum().item(), "entropy_mean": entropy.mean().item()}
    print(json.dumps({"method": method, "mode": mode, "seconds": seconds, "peak_bytes": peak, **check}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.tokens, args.hidden, args.vocab)
        return

    rows = []
    for mode in ("forward", "forward+backward"):
        for method in ("chunked", "full logits"):
            command = [sys.executable, __file__, "--child", method, mode, "--tokens", str(args.tokens),
                       "--hidden", str(args.hidden), "--vocab", str(args.vocab)]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{mode:18}{method:13}{r['seconds']:9.1f} s{r['peak_bytes'] / MIB:10.0f} MiB   "
                  f"logprob sum {r['logprob_sum']:.6g}, mean entropy {r['entropy_mean']:.6f}")  # fmt: skip
    by = {(r["mode"], r["method"]): r for r in rows}
    result = {"benchmark": "entropy_op", "device": "cpu", "dtype": "float32", "threads": 1,
              "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
              "chunk": DEFAULT_CHUNK_SIZE}  # fmt: skip
    for mode in ("forward", "forward+backward"):
        ours, full = by[(mode, "chunked")], by[(mode, "full logits")]
        key = mode.replace("+", "_")
        result[f"{key}_chunked_peak_mib"] = round(ours["peak_bytes"] / MIB)
        result[f"{key}_full_peak_mib"] = round(full["peak_bytes"] / MIB)
        result[f"{key}_chunked_seconds"] = round(ours["seconds"], 2)
        result[f"{key}_full_seconds"] = round(full["seconds"], 2)
        result[f"{key}_memory_ratio"] = round(full["peak_bytes"] / max(ours["peak_bytes"], 1), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
