"""Generation throughput of forkflow's rollout engine against transformers' `generate` on the same random
Qwen3 checkpoint, on CPU: batch 16, prompts of mixed lengths, 128 sampled new tokens each (no early stop).

    .venv/bin/python benchmarks/bench_generate.py               # hidden 256, 4 layers, Qwen3's vocabulary
    .venv/bin/python benchmarks/bench_generate.py --vocab 32768

Both sample at temperature 1 with top-k 50 (transformers' default); after a warm-up round, the two take
turns for --repeats rounds and each one's best time is reported. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import transformers

from forkflow.models import from_pretrained
from forkflow.rollout import SamplingParams, generate


def tiny_qwen3(vocab: int, hidden: int, layers: int) -> transformers.Qwen3ForCausalLM:
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, rope_theta=1e6,
        max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).eval()


def best_times(repeats: int, runs: dict) -> dict[str, float]:
    """Best wall time of each run; runs alternate so that both see the same machine load."""
    times = {name: [] for name in runs}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if repeat:  # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for both (1: stable on a shared host)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    reference = tiny_qwen3(args.vocab, args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = from_pretrained(directory).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 65, (args.batch,), generator=g)]  # fmt: skip
    width = max(map(len, prompts))
    input_ids = torch.zeros(args.batch, width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :], attention_mask[i, width - len(p) :] = torch.tensor(p), 1

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_k=50)

    def reference_run():
        with torch.no_grad():
            out = reference.generate(
                input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=50,
                top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
            )  # fmt: skip
        assert out.shape[1] == width + args.new_tokens

    runs = {"forkflow": lambda: generate(model, prompts, params), "transformers": reference_run}
    best = best_times(args.repeats, runs)
    ours, theirs = best["forkflow"], best["transformers"]
    tokens = args.batch * args.new_tokens
    result = {
        "benchmark": "generate",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "forkflow_tokens_per_s": round(tokens / ours, 1),
        "transformers_tokens_per_s": round(tokens / theirs, 1),
        "speedup": round(theirs / ours, 2),
    }
    print(f"{'':14}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'forkflow':14}{ours:9.2f}{tokens / ours:10.1f}")
    print(f"{'transformers':14}{theirs:9.2f}{tokens / theirs:10.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
