"""What the fault guards cost an RL step: the non-finite check around every optimizer update (`UpdateGuard`)
and the end-of-step preemption check (`Preemption.after_step`), timed inside real steps of a tiny RL run
on CPU, as a fraction of the step time. The guards' own work is timed, not the work they wrap: the
optimizer and scheduler steps inside `UpdateGuard.apply` and the checkpoint inside `after_step` are timed
separately and subtracted, so the ratio does not depend on the machine's load the way two runs would.

    .venv/bin/python benchmarks/bench_guards.py      # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from forkflow.config import load_config
from forkflow.demo.task import build_char_tokenizer, make_problems
from forkflow.jsonl import write_jsonl
from forkflow.models import Qwen3Config, Qwen3ForCausalLM, save_pretrained
from forkflow.train import preemption, state
from forkflow.train.rl import RLConfig, RLTrainer


def timed(owner, name: str, totals: dict, key: str) -> None:
    """Replace owner.name by a wrapper adding its wall time to totals[key]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - began

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    build_char_tokenizer(root / "init")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=256, rope_theta=1e4, tie_word_embeddings=True))
    model.init_weights(0.1)
    save_pretrained(model, root / "init")
    write_jsonl(root / "train.jsonl", ({"problem": p["prompt"], "answer": p["answer"]} for p in make_problems(0)))
    cfg = load_config(RLConfig, None, [
        f"model.path={root / 'init'}", f"data.train={root / 'train.jsonl'}", f"out={root / 'run'}",
        f"steps={args.steps}", "save_every=4", "prompts_per_step=4", "mini_batch_prompts=2", "rollout.n=8",
        "rollout.max_new_tokens=48", "reward.verifier=countdown", "algo.dynamic_sampling=false",
        "chunkflow.chunk_size=128", "device=cpu", "progress=false", "reward.workers=1"])
    totals = dict.fromkeys(["step", "apply", "updates", "after_step", "save"], 0.0)
    trainer = RLTrainer(cfg)
    timed(trainer, "train_step", totals, "step")
    timed(state.UpdateGuard, "apply", totals, "apply")
    timed(preemption.Preemption, "after_step", totals, "after_step")
    timed(trainer, "save", totals, "save")
    # the optimizer's own attributes (the LR scheduler already wraps optimizer.step per instance); the
    # scheduler's class (its instance dict is saved in checkpoints)
    for owner, name in ((trainer.optimizer, "step"), (trainer.optimizer, "zero_grad"),
                        (type(trainer.scheduler), "step")):
        timed(owner, name, totals, "updates")
    trainer.train()
    guards = (totals["apply"] - totals["updates"]) + (totals["after_step"] - totals["save"])
    print(json.dumps({"benchmark": "fault_guards_overhead", "steps": args.steps, "step_s": totals["step"] / args.steps,
                      "guards_s_per_step": guards / args.steps, "overhead_ratio": guards / totals["step"]}))


if __name__ == "__main__":
    main()
