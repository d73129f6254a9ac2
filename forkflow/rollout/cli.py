"""`forkflow generate`: sample responses for the prompts of a data file (.jsonl or .parquet, in the layouts
`forkflow train` and `eval` read, or token ids) and write one JSON line per sample with its token ids, text,
per-token log-probs and entropies. Also the model/prompt arguments that `forkflow entropy score` shares."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from forkflow import chat
from forkflow.jsonl import InputError, token_id_list, write_jsonl
from forkflow.models import CheckpointError, from_pretrained
from forkflow.rollout.backend import TorchBackend
from forkflow.rollout.engine import PromptError, Sample, batch_slots, check_prompts, slot_tokens
from forkflow.rollout.sampling import (
    PAPER_ENTROPY_THRESHOLD,
    EntropyAwareTemperature,
    SamplingParams,
    ThinkingBudget,
)
from forkflow.rollout.weights import warn_if_bf16_is_emulated
from forkflow.train.rl_data import prompt_token_ids, row_prompt
from forkflow.train.sft_data import read_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_NEW_TOKENS = 256  # --max-new-tokens, or the answer budget after --thinking-budget


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="Hugging Face checkpoint directory (with its tokenizer)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="auto: float32 on CPU, the checkpoint's dtype elsewhere",
    )
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="render text prompts with the checkpoint's chat template (--no-chat: plain text)",
    )
    parser.add_argument(
        "--enable-thinking",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Qwen3 thinking mode in the chat template",
    )
    parser.add_argument(
        "--template", default=None, help="with --no-chat: a text template with a {prompt} field"
    )


def load_model(args):
    """(model, tokenizer or None) from --model; a directory without tokenizer files takes prompt_ids only."""
    try:
        dtype = DTYPES.get(args.dtype, torch.float32 if args.device == "cpu" else None)
        model = from_pretrained(args.model, dtype=dtype, device=args.device).eval()
    except CheckpointError as e:
        raise InputError(str(e)) from None
    has_tokenizer = any(
        (Path(args.model) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )
    return model, chat.load_tokenizer(args.model) if has_tokenizer else None


def record_prompt_ids(record: dict, where: str, tokenizer, args) -> list[int]:
    """Token ids of a record's `prompt_ids`, or of its prompt in one of the training data's layouts (verl's
    `prompt` as text or chat messages, or `problem`) rendered with the chat template or --template."""
    if "prompt_ids" in record:
        return token_id_list(record, "prompt_ids", where)
    if "prompt" not in record and "problem" not in record:
        raise InputError(f"{where}: needs 'prompt' (text or chat messages), 'problem' (text) or 'prompt_ids' "
                         f"(token ids); found fields {sorted(record)}")
    prompt, _, _ = row_prompt(record, where, need_answer=False)
    if tokenizer is None:
        raise InputError(f"{where}: the prompt is text, but {args.model} has no tokenizer; give 'prompt_ids'")
    try:
        return prompt_token_ids(
            tokenizer, prompt, chat=args.chat, enable_thinking=args.enable_thinking, template=args.template
        )
    except (ValueError, KeyError) as e:
        raise InputError(f"{where}: {e}") from None


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token decoded on its own (a piece of a multi-byte character shows as U+FFFD)."""
    return tokenizer.batch_decode([[t] for t in token_ids])


def rounded(values: torch.Tensor) -> list[float]:
    return values.double().round(decimals=6).tolist()


def sample_record(record: dict, prompt_ids: list[int], sample: Sample, tokenizer) -> dict:
    token_ids = sample.token_ids.tolist()
    out = {
        **record,
        "prompt_index": sample.prompt_index,
        "sample_index": sample.sample_index,
        "prompt_ids": prompt_ids,
        "token_ids": token_ids,
    }
    if tokenizer is not None:
        out["text"] = tokenizer.decode(token_ids, skip_special_tokens=True)
        out["tokens"] = token_texts(tokenizer, token_ids)
    out.update(
        logprobs=rounded(sample.logprobs),
        sample_logprobs=rounded(sample.sample_logprobs),
        entropies=rounded(sample.entropies),
        finish_reason=sample.finish_reason,
        forced_span=sample.forced_span,
    )
    return out


def max_new_tokens(args) -> int:
    """--max-new-tokens; unset, 256 tokens, or with a thinking budget that budget plus 256 (or --answer-budget)
    tokens for the answer, so `--thinking-budget 512` works alone."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    if args.thinking_budget is None:
        return DEFAULT_NEW_TOKENS
    return args.thinking_budget + (args.answer_budget or DEFAULT_NEW_TOKENS)


def sampling_params(args, tokenizer, config) -> SamplingParams:
    if tokenizer is not None:
        stop_ids = chat.stop_token_ids(tokenizer)
    else:
        eos = config.extra.get("eos_token_id")
        stop_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    thinking = None
    if args.thinking_budget is not None:
        think_end = chat.think_end_id(tokenizer) if tokenizer is not None else None
        if think_end is None:
            raise InputError(f"--thinking-budget needs a tokenizer with a </think> token in {args.model}")
        thinking = ThinkingBudget(
            args.thinking_budget, tuple(chat.thinking_budget_suffix(tokenizer)), think_end, args.answer_budget
        )
    entropy_aware = None
    if args.high_entropy_temperature is not None or args.low_entropy_temperature is not None:
        if args.high_entropy_temperature is None or args.low_entropy_temperature is None:
            raise InputError(
                "entropy-aware decoding needs both --high-entropy-temperature and --low-entropy-temperature"
            )
        entropy_aware = EntropyAwareTemperature(
            args.high_entropy_temperature, args.low_entropy_temperature, args.entropy_threshold
        )
    try:
        return SamplingParams(
            n=args.n,
            max_new_tokens=max_new_tokens(args),
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            stop_token_ids=tuple(stop_ids),
            thinking=thinking,
            entropy_aware=entropy_aware,
        )
    except ValueError as e:
        raise InputError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forkflow generate", description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument(
        "--prompts",
        required=True,
        help=".jsonl or .parquet: verl's layout ('prompt' as text or chat messages), {problem, ...} as train and "
        "eval read, or 'prompt_ids' (token ids); a row's fields travel with its samples",
    )
    p.add_argument("--out", required=True, help="JSON lines, one per sample")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default: {DEFAULT_NEW_TOKENS}; with --thinking-budget, the budget + the answer budget "
        f"(default {DEFAULT_NEW_TOKENS})",
    )
    p.add_argument(
        "--thinking-budget", type=int, default=None, help="thinking tokens before the stop-thinking suffix"
    )
    p.add_argument(
        "--answer-budget",
        type=int,
        default=None,
        help=f"tokens after the suffix (default: max-new-tokens - thinking-budget, else {DEFAULT_NEW_TOKENS})",
    )
    p.add_argument(
        "--high-entropy-temperature",
        type=float,
        default=None,
        help="entropy-aware decoding: temperature where the T=1 entropy exceeds --entropy-threshold",
    )
    p.add_argument(
        "--low-entropy-temperature", type=float, default=None, help="entropy-aware decoding: elsewhere"
    )
    p.add_argument("--entropy-threshold", type=float, default=PAPER_ENTROPY_THRESHOLD)
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated together (and written)")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="KV-cache tokens the decoding batch may hold: samples beyond it wait and take the place of finished "
        "ones (the same samples; default: a batch's samples all at once)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"forkflow generate: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    records = read_rows(args.prompts)  # (where, row)
    model, tokenizer = load_model(args)
    params = sampling_params(args, tokenizer, model.config)
    prompts = [record_prompt_ids(row, where, tokenizer, args) for where, row in records]
    try:
        check_prompts(prompts, model.config.vocab_size, model.config.max_position_embeddings)
    except PromptError as e:
        raise InputError(f"{records[e.index][0]}: {e.reason}") from None
    try:  # the bound must hold the longest prompt's request, whichever batch it falls in
        batch_slots(1, slot_tokens(prompts, params, model.config.max_position_embeddings), args.max_batch_tokens)
    except ValueError as e:
        raise InputError(f"--max-batch-tokens: {e}") from None

    warn_if_bf16_is_emulated(model.lm_head.weight.dtype, model.lm_head.weight.device, "--dtype float32")
    backend = TorchBackend(model, max_batch_tokens=args.max_batch_tokens)
    bar = tqdm(total=len(prompts) * params.n, unit="sample", desc="generate", disable=None)  # terminal only
    tokens, start = 0, time.perf_counter()

    def on_step(new_tokens: int, finished: int):
        nonlocal tokens
        tokens += new_tokens
        bar.update(finished)
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} tok/s", refresh=False)

    def results():
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first : first + args.batch_size]
            keys = range(first, first + len(batch))  # a prompt's samples do not depend on --batch-size
            for offset, samples in enumerate(backend.generate(batch, params, on_step, keys)):
                for sample in samples:
                    sample.prompt_index = first + offset
                    yield sample_record(records[first + offset][1], batch[offset], sample, tokenizer)

    write_jsonl(args.out, results())
    bar.close()
    elapsed = time.perf_counter() - start
    print(
        f"generated {tokens} tokens in {elapsed:.1f} s ({tokens / elapsed:.1f} tokens/s) -> {args.out}",
        file=sys.stderr,
    )
    return 0
