"""`forkflow entropy score | report | compare`: teacher-forced token entropies of given responses, a report
on one scored file, and a comparison of two models' entropies over the same tokens."""

from __future__ import annotations

import argparse
import sys

from forkflow.entropy.report import write_comparison, write_report
from forkflow.entropy.score import check_pairs, read_scored, score_responses
from forkflow.entropy.stats import NEAR_ZERO
from forkflow.jsonl import InputError, token_id_list, write_jsonl
from forkflow.rollout.cli import add_model_arguments, load_model, record_prompt_ids, rounded, token_texts
from forkflow.rollout.engine import PromptError
from forkflow.train.sft_data import read_rows

GENERATION_TOKEN_FIELDS = ("tokens", "logprobs", "sample_logprobs", "entropies")


def record_response_ids(record: dict, where: str, tokenizer, model_dir) -> list[int]:
    """A record's response: `token_ids` (as `forkflow generate` writes them) or `response` text."""
    if "token_ids" in record:
        return token_id_list(record, "token_ids", where)
    if "response" not in record:
        raise InputError(f"{where}: needs 'response' (text) or 'token_ids' (the response's token ids)")
    if not isinstance(record["response"], str):
        raise InputError(f"{where}: 'response' must be text")
    if tokenizer is None:
        raise InputError(f"{where}: 'response' is text, but {model_dir} has no tokenizer; give 'token_ids'")
    return tokenizer.encode(record["response"], add_special_tokens=False)


def score(args) -> int:
    records = read_rows(args.data)  # (where, row): .jsonl or .parquet
    model, tokenizer = load_model(args)
    prompts = [record_prompt_ids(r, where, tokenizer, args) for where, r in records]
    responses = [record_response_ids(r, where, tokenizer, args.model) for where, r in records]
    cfg = model.config
    try:
        check_pairs(prompts, responses, cfg.vocab_size, cfg.max_position_embeddings)
    except PromptError as e:
        raise InputError(f"{records[e.index][0]}: {e.reason}") from None
    scores = score_responses(model, prompts, responses, args.temperature, args.batch_size)

    def scored_records():
        for (_, record), prompt, response, (logprobs, entropies) in zip(
            records, prompts, responses, scores, strict=True
        ):
            # per-token values of an earlier scoring or generation would be stale next to the new ones
            kept = {k: v for k, v in record.items() if k not in GENERATION_TOKEN_FIELDS}
            out = {**kept, "prompt_ids": prompt, "token_ids": response}
            if tokenizer is not None:
                out["tokens"] = token_texts(tokenizer, response)
            out.update(logprobs=rounded(logprobs), entropies=rounded(entropies), temperature=args.temperature)
            yield out

    write_jsonl(args.out, scored_records())
    print(
        f"scored {sum(map(len, responses))} tokens of {len(responses)} responses -> {args.out}",
        file=sys.stderr,
    )
    return 0


def report(args) -> int:
    summary = write_report(
        read_scored(args.scored, need_tokens=True), args.out, args.rho, args.top, args.max_responses
    )
    p = summary["percentiles"]
    print(
        f"{summary['tokens']} tokens: p50 {p['50']:.4f}, p80 {p['80']:.4f}, p95 {p['95']:.4f}; "
        f"{summary[f'fraction_below_{NEAR_ZERO}']:.1%} below {NEAR_ZERO} -> {args.out}/report.html",
        file=sys.stderr,
    )
    return 0


def compare(args) -> int:
    a, b = read_scored(args.a), read_scored(args.b)
    if len(a) != len(b):
        raise InputError(
            f"{args.a} has {len(a)} responses but {args.b} has {len(b)}; compare needs the same ones"
        )
    for x, y in zip(a, b, strict=True):
        if x.token_ids != y.token_ids:
            raise InputError(
                f"{args.b} line {y.line}: token_ids differ from {args.a} line {x.line} "
                "(compare needs the same token sequences scored by two models)"
            )
    result = write_comparison(a, b, args.out, args.rho, args.label_a, args.label_b)
    print(
        f"top-{args.rho:.0%} overlap {result['top_overlap']:.2%} over {result['tokens']} tokens "
        f"-> {args.out}",
        file=sys.stderr,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forkflow entropy", description=__doc__.split("\n")[0])
    commands = p.add_subparsers(dest="command", required=True)

    s = commands.add_parser(
        "score", help="teacher-forced per-token log-probs and entropies of given responses"
    )
    add_model_arguments(s)
    s.add_argument(
        "--data",
        required=True,
        help=".jsonl or .parquet: a prompt as `forkflow generate` reads it ('prompt', 'problem' or "
        "'prompt_ids'), and 'response' or 'token_ids'",
    )
    s.add_argument("--out", required=True)
    s.add_argument(
        "--temperature", type=float, default=1.0, help="entropies of softmax(z / T); log-probs at T=1"
    )
    s.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    s.set_defaults(run=score)

    r = commands.add_parser("report", help="percentiles, histogram, forking-token lexicon, HTML page")
    r.add_argument("scored", help="a scored JSON-lines file (from `entropy score` or `generate`)")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--rho", type=float, default=0.2, help="fraction of highest/lowest-entropy positions")
    r.add_argument("--top", type=int, default=30, help="tokens per frequency table and word cloud")
    r.add_argument("--max-responses", type=int, default=200, help="responses shown in the HTML page")
    r.set_defaults(run=report)

    c = commands.add_parser("compare", help="overlap of top-rho positions and entropy change per bucket")
    c.add_argument("a", help="scored file of model A (e.g. the base model)")
    c.add_argument("b", help="the same token sequences scored by model B")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--rho", type=float, default=0.2)
    c.add_argument("--label-a", default="A")
    c.add_argument("--label-b", default="B")
    c.set_defaults(run=compare)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (InputError, ValueError) as e:
        print(f"forkflow entropy {args.command}: {e}", file=sys.stderr)
        return 2
