"""Seconds per RL optimizer step, forkflow's RLTrainer against TRL's GRPOTrainer, on CPU in one run.

The same random Qwen3 (`--shape tiny`: hidden 256, 4 layers, 4 query / 2 key-value heads; `--shape 0.6b`:
Qwen3-0.6B's shape, hidden 1024, 28 layers, 16 / 8 heads of 128; Qwen3's vocabulary size) and the same two
prompts (32 and 64 tokens) on both sides; each step samples 8 responses per prompt at temperature 1
(no top-k / top-p) and trains on them once: token-level PPO loss with clip-higher (0.2 / 0.28), no KL, GRPO
advantages (group mean and std), the policy gradient restricted to the top 20 % of response tokens by
entropy (forkflow `select.mode=top`, TRL `top_entropy_quantile=0.2`), both normalised by the number of
response tokens (forkflow `select.denominator=all`, TRL `loss_type="dapo"`), torch's fused AdamW (lr 1e-6,
betas 0.9 / 0.95, weight decay 0.1; TRL's default `adamw_torch_fused`), gradient clipping at 1, fp32, no
activation checkpointing. Every response is exactly 128 tokens: the stop tokens sit outside the model's
vocabulary, so neither side can sample one. The reward is a deterministic hash parity of the response text,
so groups have mixed rewards.

    .venv/bin/pip install -e '.[bench]'        # TRL, pinned; not a dependency of forkflow itself
    .venv/bin/python benchmarks/bench_rl_step.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_rl_step.py --shape 0.6b --warmup 1 --steps 1 \
        --threads 2 --separate   # minutes per step on 2 cores

A step is timed from the sampling of the rollouts to the end of the optimizer step: forkflow's
`RLTrainer.train_step`, TRL's `on_step_begin` .. `on_step_end` callbacks (metrics files, logging and
checkpoints are outside on both sides). Each side runs `--warmup` steps, then `--steps` timed ones; medians
are reported, split into rollout (generation + reward) and update. The two sides take turns, step by step, in
one process, so that both see the same load on a shared host; with `--separate` each runs in a process of
its own, forkflow's first (at 0.6b both trainers in one process need more than 24 GB), and they see the
host's load at different times.

TRL runs in its fastest setting on this CPU: `--trl-micro-batch` completions per forward/backward (its
per_device_train_batch_size), the rest of the step's 16 through gradient accumulation, so one generation and
one optimizer step per step, as forkflow's. One TRL step in a process of its own (`--only trl` or
`--separate`, `--warmup 1 --steps 1`, with `adamw_torch`) took, by micro-batch: tiny, 1 thread, 46.3 s (1),
48.2 (2), 52.7 (4), 54.1 (8), 51.3 (16); 0.6b, 2 threads, 270.4 (1), 269.7 (4), and all 16 in one forward
was killed for memory at 22.3 GB. Hence the default of 1. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch


def reward_parity(response: str, ground_truth: str) -> bool:
    """forkflow verifier: a random-looking but deterministic verdict on the response text."""
    return zlib.crc32(response.encode()) % 2 == 0


def trl_reward_parity(completions: list[str], **kwargs) -> list[float]:
    """The same verdicts as `reward_parity`, as TRL's reward-function signature."""
    return [float(reward_parity(c, "")) for c in completions]


# (hidden, intermediate, layers, query heads, key-value heads, head_dim)
SHAPES = {"tiny": (256, 768, 4, 4, 2, 64), "0.6b": (1024, 3072, 28, 16, 8, 128)}


def write_model_and_data(root: Path, vocab: int, shape: str, prompt_tokens: list[int]) -> tuple[Path, Path]:
    """A random Qwen3 with a word-level tokenizer (`<pad>`, t1 .. t{vocab-1}, then the stop tokens outside
    the model's vocabulary) in root/model, and root/train.jsonl with one prompt per entry of `prompt_tokens`."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, **{f"t{i}": i for i in range(1, vocab)}, "<|endoftext|>": vocab, "<|im_end|>": vocab + 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<pad>"
    )
    hidden, intermediate, layers, heads, kv_heads, head_dim = SHAPES[shape]
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, rope_theta=1e6,
        max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=None, bos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = root / "model"
    transformers.Qwen3ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    rows = [{"problem": " ".join(f"t{i}" for i in torch.randint(1, vocab, (n,), generator=g).tolist()), "answer": "0"}
            for n in prompt_tokens]  # fmt: skip
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


class Timings:
    """Per timed step: wall and process-CPU seconds, the rollout / update split (wall), response tokens."""

    def __init__(self):
        self.step, self.cpu, self.rollout, self.update, self.response_tokens = [], [], [], [], []


class ForkflowSide:
    """forkflow's RLTrainer, stepped one `train_step` at a time (so TRL's steps can run in between)."""

    def __init__(self, model_dir: Path, data: Path, out: Path, args):
        from forkflow.config import load_config
        from forkflow.rewards import VerifierPool
        from forkflow.train.rl import RLConfig, RLTrainer

        # the reward function is imported by name: this script's folder is sys.path[0], and the spawned reward
        # workers inherit sys.path
        overrides = [
            f"model.path={model_dir}", f"data.train={data}", "data.chat=false", "data.template='{prompt}'",
            f"out={out}", f"prompts_per_step={args.prompts}", f"mini_batch_prompts={args.prompts}",
            f"rollout.n={args.generations}", f"rollout.max_new_tokens={args.new_tokens}", "rollout.temperature=1.0",
            "rollout.top_p=1.0", "rollout.top_k=0", "algo.dynamic_sampling=false", "algo.kl_coef=0",
            "algo.clip_low=0.2", "algo.clip_high=0.28", "algo.loss_agg=token-mean", "algo.norm_by_std=true",
            "select.mode=top", f"select.ratio={args.ratio}", "select.scope=global", "select.denominator=all",
            "optim.lr=1e-6", "optim.weight_decay=0.1", "optim.grad_clip=1.0", "optim.schedule=constant",
            "precision=fp32", "device=cpu", "progress=false", f"reward.verifier={Path(__file__).stem}:reward_parity",
            "reward.workers=1", f"steps={args.warmup + args.steps}",
        ]  # fmt: skip
        self.trainer = RLTrainer(load_config(RLConfig, None, overrides))
        self.pool = VerifierPool(self.trainer.cfg.reward.workers, self.trainer.cfg.reward.timeout_s)
        self.times, self.warmup, self.responses = Timings(), args.warmup, args.prompts * args.generations

    def step(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        record = self.trainer.train_step(self.pool)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.trainer.step += 1
        if self.trainer.step > self.warmup:
            t = self.times
            t.step.append(wall)
            t.cpu.append(cpu)
            t.rollout.append(record["time/gen_s"] + record["time/reward_s"])
            t.update.append(record["time/update_s"])
            t.response_tokens.append(record["response_len/mean"] * self.responses)


def run_trl(model_dir: Path, data: Path, out: Path, args, after_step=None) -> Timings:
    """TRL's GRPOTrainer for warmup + steps optimizer steps; `after_step()` runs after each, outside its timing."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    times = Timings()

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            self.wall, self.cpu, self.rollout = time.perf_counter(), time.process_time(), 0.0

        def on_step_end(self, args_, state, control, **kwargs):
            wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
            if state.global_step > args.warmup:
                times.step.append(wall)
                times.cpu.append(cpu)
                times.rollout.append(self.rollout)
                times.update.append(wall - self.rollout)
            if after_step is not None:
                after_step()

    timer = StepTimer()
    batch = args.prompts * args.generations
    micro = args.trl_micro_batch
    config = GRPOConfig(
        output_dir=str(out), max_steps=args.warmup + args.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro, generation_batch_size=batch, num_generations=args.generations,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1,
        epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group", top_entropy_quantile=args.ratio,
        mask_truncated_completions=False, learning_rate=1e-6, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, use_vllm=False, report_to="none",
        save_strategy="no", logging_steps=args.warmup + args.steps, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = [json.loads(line)["problem"] for line in data.read_text().splitlines()]
    trainer = GRPOTrainer(
        model=model, reward_funcs=trl_reward_parity, args=config, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), callbacks=[timer],
    )  # fmt: skip
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(inputs):  # generation + reward + advantages: TRL's rollout
        began = time.perf_counter()
        result = generate_and_score(inputs)
        timer.rollout += time.perf_counter() - began
        if trainer.state.global_step >= args.warmup:
            times.response_tokens.append(float(result["completion_mask"].sum()))
        return result

    trainer._generate_and_score_completions = timed_generate_and_score
    trainer.train()
    assert not trainer.model.is_gradient_checkpointing
    return times


def run_side(side: str, model_dir: Path, data: Path, out: Path, args) -> dict[str, list[float]]:
    """One side's warmup and timed steps on its own (with `--separate` in a process of its own): its Timings."""
    torch.set_num_threads(args.threads)
    if side == "trl":
        return vars(run_trl(model_dir, data, out, args))
    forkflow = ForkflowSide(model_dir, data, out, args)
    try:
        for _ in range(args.warmup + args.steps):
            forkflow.step()
    finally:
        forkflow.pool.close()
    return vars(forkflow.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151936, help="model vocabulary (Qwen3's by default)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="the model's shape (see above)")
    parser.add_argument("--prompt-tokens", default="32,64", help="token length of each prompt, comma-separated")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.2, help="ρ: the fraction of response tokens trained on")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (each takes ~1 min with TRL)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (1: stable on a shared host)")
    parser.add_argument("--only", choices=["forkflow", "trl"], default=None, help="run one side (profiling)")
    parser.add_argument("--separate", action="store_true", help="each side in a process of its own, one after the "
                        "other (for shapes whose two trainers do not fit in memory together)")
    parser.add_argument("--trl-micro-batch", type=int, default=1, help="completions per TRL forward/backward, "
                        "the rest of the step's by gradient accumulation (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt_tokens = [int(n) for n in args.prompt_tokens.split(",")]
    args.prompts = len(prompt_tokens)  # one step takes every prompt: both sides train on the same prompts
    batch = args.prompts * args.generations
    if args.trl_micro_batch < 1 or batch % args.trl_micro_batch:
        parser.error(f"--trl-micro-batch must divide the step's {batch} completions, got {args.trl_micro_batch}")

    results, failed = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        model_dir, data = write_model_and_data(root, args.vocab, args.shape, prompt_tokens)
        sides = [args.only] if args.only else ["forkflow", "trl"]
        if args.separate:
            for side in sides:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    try:
                        results[side] = pool.submit(run_side, side, model_dir, data, root / side, args).result()
                    except BrokenProcessPool:  # killed (for memory, mostly): the other side's result still counts
                        failed[side] = "its process died (killed for memory?) before the end of its steps"
        elif args.only:
            results[args.only] = run_side(args.only, model_dir, data, root / args.only, args)
        else:  # the sides take turns, step by step, so both see the same machine load
            forkflow = ForkflowSide(model_dir, data, root / "forkflow", args)
            try:
                results["trl"] = vars(run_trl(model_dir, data, root / "trl", args, forkflow.step))
            finally:
                forkflow.pool.close()
            results = {"forkflow": vars(forkflow.times), **results}
        assert torch.get_num_threads() == args.threads, "a trainer changed the torch thread count"

    expected = args.prompts * args.generations * args.new_tokens
    median = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in results.items()}
    print(f"{'':10}{'step s':>9}{'CPU s':>9}{'rollout s':>11}{'update s':>10}{'resp. tokens':>14}")
    for name, m in median.items():
        print(f"{name:10}{m['step']:9.2f}{m['cpu']:9.2f}{m['rollout']:11.2f}{m['update']:10.2f}"
              f"{m['response_tokens']:14.0f}")  # fmt: skip
    for name, reason in failed.items():
        print(f"{name:10}failed: {reason}")
    for name, m in median.items():
        if m["response_tokens"] != expected:
            print(f"warning: {name} trained on {m['response_tokens']:.0f} response tokens per step, not {expected}")
    result = {
        "benchmark": "rl_step",
        "device": "cpu",
        "threads": args.threads,
        "separate_processes": args.separate,
        "vocab": args.vocab,
        "shape": args.shape,
        "prompt_tokens": prompt_tokens,
        "generations": args.generations,
        "new_tokens": args.new_tokens,
        "ratio": args.ratio,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "failed": failed,
        "trl_micro_batch": args.trl_micro_batch,
    }
    for key in ("step", "cpu", "rollout", "update"):
        result.update({f"{name}_{key}_s": round(m[key], 3) for name, m in median.items()})
    if len(median) == 2:
        import trl

        result["trl_version"] = trl.__version__
        result["speedup"] = round(median["trl"]["step"] / median["forkflow"]["step"], 2)
        result["speedup_cpu"] = round(median["trl"]["cpu"] / median["forkflow"]["cpu"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
