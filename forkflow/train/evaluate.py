"""avg@k and pass@k of a policy on eval files: k samples per prompt, each checked by the verifier.

avg@k is the mean correctness over all k·N samples; pass@k the fraction of prompts with at least one
correct sample (the unbiased estimator with n = k samples). Used by the trainer every N steps, by the demo,
and by `forkflow eval --model DIR --data FILE ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from forkflow.chat import load_tokenizer, stop_token_ids
from forkflow.config import Count, NonNegative, NonNegativeInt, Probability
from forkflow.distributed import World, gather_objects, shard_bounds
from forkflow.jsonl import InputError
from forkflow.models.checkpoint import CheckpointError, from_pretrained
from forkflow.rewards import RewardValues, VerifierPool, resolve_verifier, score_responses
from forkflow.rollout import RolloutBackend, SamplingParams, TorchBackend
from forkflow.train.rl_data import BOXED_TEMPLATE, load_rl_prompts


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)  # .jsonl/.parquet in the training data's layouts
    every: NonNegativeInt = 0  # steps between evaluations (and always after the last); 0: never during training
    k: Count = 4  # samples per prompt
    temperature: NonNegative = 1.0  # the paper evaluates at T = 1 (avg@k); 0 gives greedy (k is then 1)
    top_p: Probability = 1.0
    batch_prompts: Count = 64  # prompts generated together


def evaluate_prompts(backend: RolloutBackend, tokenizer, prompts, cfg: EvalConfig, pool, verifier,
                     values: RewardValues, max_new_tokens: int, seed: int = 0, progress: bool = False,
                     world: World | None = None) -> dict:
    """{'avg@k', 'pass@k', 'response_len', 'correct' (per prompt, per sample)} for a list of RLPrompt, sampled
    by `backend` (the policy's weights loaded). With a `world` of several ranks each generates a contiguous
    share of the prompts and every rank gets the results of all; a prompt's samples are the same whichever
    rank draws them."""
    k = 1 if cfg.temperature == 0 else cfg.k
    params = SamplingParams(n=k, max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=seed, stop_token_ids=tuple(stop_token_ids(tokenizer)))
    first, last = shard_bounds(len(prompts), world) if world is not None else (0, len(prompts))
    correct, lengths = [], []
    for start in tqdm(range(first, last, cfg.batch_prompts), desc="eval", disable=not progress, leave=False):
        part = prompts[start : min(start + cfg.batch_prompts, last)]
        samples = backend.generate([p.prompt_ids for p in part], params, prompt_keys=range(start, start + len(part)))
        texts = [tokenizer.decode(s.token_ids.tolist(), skip_special_tokens=True) for group in samples for s in group]
        truths = [p.ground_truth for p in part for _ in range(k)]
        scored = score_responses(pool, verifier, texts, truths, values)
        correct += [scored.correct[i * k : (i + 1) * k] for i in range(len(part))]
        lengths += [len(s.token_ids) for group in samples for s in group]
    if world is not None:
        shares = gather_objects((correct, lengths), world)
        correct, lengths = [c for share in shares for c in share[0]], [n for share in shares for n in share[1]]
    table = torch.tensor(correct, dtype=torch.float)  # [N, k]
    return {
        f"avg@{k}": table.mean().item(),
        f"pass@{k}": table.max(dim=1).values.mean().item(),
        "response_len": sum(lengths) / len(lengths),
        "correct": correct,
    }


def evaluate_files(backend: RolloutBackend, tokenizer, cfg: EvalConfig, pool, verifier, values, *, chat,
                   enable_thinking, template, max_prompt_tokens, max_new_tokens, seed, world: World | None = None
                   ) -> dict:
    """Flat metrics `eval/<file stem>/avg@k` and `.../pass@k` for every eval file."""
    out = {}
    for path in cfg.files:
        prompts = load_rl_prompts(path, tokenizer, chat=chat, enable_thinking=enable_thinking, template=template,
                                  max_prompt_tokens=max_prompt_tokens)
        result = evaluate_prompts(backend, tokenizer, prompts, cfg, pool, verifier, values, max_new_tokens, seed,
                                  world=world)
        for key, value in result.items():
            if key != "correct":
                out[f"eval/{Path(path).stem}/{key}"] = value
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forkflow eval", description="avg@k and pass@k of a checkpoint.")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory (with tokenizer files)")
    parser.add_argument("--data", required=True, nargs="+", help=".jsonl/.parquet: verl layout or {problem, answer}")
    parser.add_argument("--verifier", default="math",
                        help="math | math_answer_line | countdown | arithmetic | package.module:function")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--no-chat", action="store_true", help="plain prompt template (base models)")
    parser.add_argument("--template", default=BOXED_TEMPLATE, help="with --no-chat; {prompt} is the problem")
    parser.add_argument("--disable-thinking", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.model)
        model = from_pretrained(args.model, dtype=torch.float32).eval()
        cfg = EvalConfig(files=args.data, k=args.k, temperature=args.temperature, top_p=args.top_p)
        with VerifierPool(num_workers=2) as pool:
            metrics = evaluate_files(TorchBackend(model), tokenizer, cfg, pool, resolve_verifier(args.verifier),
                                     RewardValues(),
                                     chat=not args.no_chat, enable_thinking=not args.disable_thinking,
                                     template=args.template if args.no_chat else None, max_prompt_tokens=1 << 20,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed)
    except (InputError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"forkflow eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0
