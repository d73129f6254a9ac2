"""The main job on its embedded default (`make demo`, `forkflow demo --out DIR`): a tiny Qwen3 learns countdown
by SFT on solver traces, RLVR with DAPO on the top-20 % forking tokens improves it, and the entropy toolkit
compares the two. Everything is generated locally; it runs on two CPU cores in minutes.

Steps: (1) problems and traces, train / held-out split; (2) SFT through ChunkFlow -> the "base" model;
(3) RL from it; (4) avg@k and pass@k of both on the held-out split; (5) entropy report of the base model's
responses and the base-vs-RL comparison on the same tokens; (6) summary table and summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from forkflow.chat import load_tokenizer, stop_token_ids
from forkflow.demo.task import build_char_tokenizer, make_problems, sft_messages
from forkflow.entropy import read_scored, score_responses, write_comparison, write_report
from forkflow.jsonl import write_jsonl
from forkflow.models import Qwen3Config, Qwen3ForCausalLM, from_pretrained, save_pretrained
from forkflow.rewards import RewardValues, VerifierPool, verify_countdown
from forkflow.rollout import SamplingParams, TorchBackend, generate
from forkflow.rollout.cli import rounded, token_texts
from forkflow.run_dir import prepare_run_dir
from forkflow.train.evaluate import EvalConfig, evaluate_prompts
from forkflow.train.experiment import accuracy_keys, evaluate_start, plot_curves, read_metrics
from forkflow.train.rl import RLConfig, RLTrainer
from forkflow.train.rl_data import load_rl_prompts
from forkflow.train.sft import SFTConfig
from forkflow.train.sft import train as train_sft
from forkflow.train.state import STOPS, exit_code


@dataclass
class DemoSize:
    """The embedded default: the whole job takes ~6 minutes on 2 CPU cores (SFT ~3, RL ~2)."""

    heldout: int = 100
    traces_per_problem: int = 4
    hidden: int = 128
    layers: int = 4
    sft_epochs: int = 20  # ~2900 steps' worth of traces: the base then solves ~60 % of held-out samples
    sft_batch: int = 32
    sft_lr: float = 3e-3
    rl_steps: int = 100
    rl_prompts: int = 8
    rl_n: int = 8
    rl_lr: float = 1e-4
    max_new_tokens: int = 128  # the longest full search is ~100 tokens
    eval_every: int = 20  # held-out avg@4 during RL (the curve in rl_curves.png)
    eval_k: int = 8
    dynamic_sampling: bool = True


def write_data(out: Path, size: DemoSize, seed: int) -> dict:
    problems = make_problems(seed)
    heldout, train = problems[: size.heldout], problems[size.heldout :]
    rng = random.Random(seed)
    write_jsonl(out / "sft.jsonl", ({"messages": sft_messages(p, rng)} for p in train
                                    for _ in range(size.traces_per_problem)))
    for name, part in (("train", train), ("heldout", heldout)):
        write_jsonl(out / f"{name}.jsonl",
                    ({"problem": p["prompt"], "answer": p["answer"], "data_source": "countdown"} for p in part))
    return {"train": len(train), "heldout": len(heldout)}


def init_model(path: Path, size: DemoSize, seed: int) -> None:
    tokenizer = load_tokenizer(build_char_tokenizer(path))
    cfg = Qwen3Config(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=size.hidden, intermediate_size=3 * size.hidden,
        num_hidden_layers=size.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=size.hidden // 4,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
        extra={"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(std=0.02)
    save_pretrained(model, path)


def rl_config(out: Path, size: DemoSize, seed: int) -> RLConfig:
    """The demo's RL run; configs/rl_tiny.yaml holds the same settings (a test keeps them equal)."""
    rl = RLConfig(prompts_per_step=size.rl_prompts, mini_batch_prompts=size.rl_prompts, steps=size.rl_steps,
                  seed=seed, out=str(out / "rl"), device="cpu")
    rl.model.path, rl.data.train = str(out / "base"), str(out / "data" / "train.jsonl")
    rl.data.max_prompt_tokens = 64
    rl.rollout.n, rl.rollout.max_new_tokens = size.rl_n, size.max_new_tokens
    rl.algo.dynamic_sampling = size.dynamic_sampling
    rl.reward.verifier = "countdown"
    rl.optim.lr, rl.optim.weight_decay = size.rl_lr, 0.0
    rl.chunkflow.chunk_size = 512
    rl.eval.files, rl.eval.every, rl.eval.k = [str(out / "data" / "heldout.jsonl")], size.eval_every, 4
    return rl


def score_file(model, prompts, responses, tokenizer, path: Path) -> None:
    scores = score_responses(model, prompts, responses)
    write_jsonl(path, ({"prompt_ids": p, "token_ids": r, "tokens": token_texts(tokenizer, r),
                        "logprobs": rounded(lp), "entropies": rounded(h)}
                       for p, r, (lp, h) in zip(prompts, responses, scores, strict=True)))


def run(out: Path, size: DemoSize | None = None, seed: int = 0) -> dict:
    """The whole demo into `out`, which must be new, empty or a previous demo run (replaced); see prepare_run_dir."""
    size = size or DemoSize()
    began = time.perf_counter()
    prepare_run_dir(out, "demo", replace=True)
    data = out / "data"
    counts = write_data(data, size, seed)
    say(f"[1/6] countdown: {counts['train']} train / {counts['heldout']} held-out problems -> {data}")

    init_model(out / "init", size, seed)
    say("[2/6] SFT on solver traces (ChunkFlow) ...")
    sft = SFTConfig(batch_size=size.sft_batch, epochs=size.sft_epochs, seed=seed, out=str(out / "sft"),
                    device="cpu", save_every=0)
    sft.model.path, sft.data.train = str(out / "init"), str(data / "sft.jsonl")
    sft.chunkflow.chunk_size, sft.chunkflow.keep = 512, 1
    sft.optim.lr, sft.optim.warmup_steps, sft.optim.weight_decay = size.sft_lr, 10, 0.0
    base = out / "base"  # the SFT result under a fixed name (configs/rl_tiny.yaml starts from it)
    # relative, so the run directory stays whole when it is copied or moved
    base.symlink_to(os.path.relpath(train_sft(sft).resolve(), out.resolve()), target_is_directory=True)

    say("[3/6] RLVR: DAPO, top-20 % forking tokens ...")
    rl = rl_config(out, size, seed)
    rl_ckpt = RLTrainer(rl).train()
    avg_key = accuracy_keys(rl)[0]
    plot_curves({"top-20 % (forking)": [read_metrics(out / "rl")]}, avg_key,
                [evaluate_start(rl, out / "rl" / "start.json")[avg_key]], out / "rl_curves.png")

    say(f"[4/6] held-out avg@{size.eval_k} / pass@{size.eval_k} of the base and RL models ...")
    tokenizer = load_tokenizer(base)
    heldout = load_rl_prompts(data / "heldout.jsonl", tokenizer, chat=True, enable_thinking=True, template=None,
                              max_prompt_tokens=256)
    models = {"base": from_pretrained(base).eval(), "rl": from_pretrained(rl_ckpt).eval()}
    ev = EvalConfig(k=size.eval_k, temperature=1.0)
    with VerifierPool(num_workers=2, timeout_s=5.0) as pool:
        results = {name: evaluate_prompts(TorchBackend(m), tokenizer, heldout, ev, pool, verify_countdown,
                                          RewardValues(), size.max_new_tokens, seed=seed + 1)
                   for name, m in models.items()}

    say("[5/6] entropy report and base-vs-RL comparison ...")
    prompts = [p.prompt_ids for p in heldout]
    params = SamplingParams(n=1, max_new_tokens=size.max_new_tokens, temperature=1.0, seed=seed + 2,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)))
    responses = [g[0].token_ids.tolist() for g in generate(models["base"], prompts, params)]
    for name, model in models.items():
        score_file(model, prompts, responses, tokenizer, out / f"scored_{name}.jsonl")
    base_scored = read_scored(out / "scored_base.jsonl", need_tokens=True)
    report = write_report(base_scored, out / "report")
    comparison = write_comparison(base_scored, read_scored(out / "scored_rl.jsonl"), out / "comparison",
                                  label_a="base", label_b="rl")

    k = size.eval_k
    summary = {
        "base_acc": results["base"][f"avg@{k}"], "rl_acc": results["rl"][f"avg@{k}"],
        "base_pass": results["base"][f"pass@{k}"], "rl_pass": results["rl"][f"pass@{k}"],
        "base_len": results["base"]["response_len"], "rl_len": results["rl"]["response_len"],
        "k": k, "n_heldout": len(heldout), "seed": seed,
        "entropy_p80": report["percentiles"]["80"], "top20_overlap": comparison["top_overlap"],
        "minutes": (time.perf_counter() - began) / 60,
        "base_checkpoint": str(base), "rl_checkpoint": str(rl_ckpt),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"[6/6] done in {summary['minutes']:.1f} min\n\n{summary_table(summary, out)}")
    return summary


def summary_table(s: dict, out: Path) -> str:
    k = s["k"]
    return "\n".join([
        f"| model | held-out avg@{k} | pass@{k} | mean response length |",
        "|---|---:|---:|---:|",
        f"| SFT base | {s['base_acc']:.3f} | {s['base_pass']:.3f} | {s['base_len']:.1f} |",
        f"| + RLVR (top-20 % forking tokens) | {s['rl_acc']:.3f} | {s['rl_pass']:.3f} | {s['rl_len']:.1f} |",
        "",
        f"entropy p80 {s['entropy_p80']:.3f}; top-20 % position overlap base vs RL {s['top20_overlap']:.1%}",
        f"report: {out / 'report' / 'report.html'}   comparison: {out / 'comparison' / 'comparison.md'}",
        f"RL curves: {out / 'rl_curves.png'}   metrics: {out / 'rl' / 'metrics.jsonl'}",
        f"summary: {out / 'summary.json'}",
    ])


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forkflow demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo",
                        help="output directory: new, empty, or a previous demo run (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        run(Path(args.out), seed=args.seed)
    except STOPS as e:  # a RunDirError is a ConfigError
        print(f"forkflow demo: {e}", file=sys.stderr)
        return exit_code(e)
    return 0
