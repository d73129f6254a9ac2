"""Batched KV-cache generation with forkflow's Qwen3: prefill every prompt once (left-padded), copy its cache
for the n samples, then decode one token per step from the last position's logits only, dropping finished
rows from the batch and the cache so that the long tail of one sample does not keep the others busy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from forkflow.models.qwen3 import Qwen3ForCausalLM, StaticKVCache
from forkflow.ops import log_normalizer_and_entropy
from forkflow.rollout.sampling import SamplingParams, choose_tokens, keyed_uniforms, sample_keys


class PromptError(ValueError):
    """A prompt the engine cannot take; `index` is its position in the list given, `reason` a sentence."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"prompts[{index}]: {reason}")
        self.index, self.reason = index, reason


@dataclass
class Sample:
    """One generated response. Of the two log-prob fields:

    logprobs         log softmax(z)[token] at T = 1 with no filtering: the model's own log-prob, what a
                     teacher-forced forward gives (ops.token_logprobs_and_entropy at temperature 1);
    sample_logprobs  log-prob under the distribution the token was actually drawn from: softmax(z / T) after
                     top-k/top-p/min-p, T the sampling temperature of that token; 0 for greedy decoding and
                     for the tokens of the forced thinking-budget suffix (`forced_span`).
    entropies        H(softmax(z / T)) with T = params.temperature (1 when greedy): the rollout-temperature
                     entropy the forking-token paper ranks tokens by.
    A backend that does not compute `logprobs` or `entropies` (vLLM) leaves them None.
    """

    prompt_index: int
    sample_index: int
    token_ids: torch.Tensor  # [L] long, the stop token included when finish_reason == "stop"
    logprobs: torch.Tensor | None  # [L] fp32
    sample_logprobs: torch.Tensor  # [L] fp32
    entropies: torch.Tensor | None  # [L] fp32
    finish_reason: str  # "stop": a stop token was generated; "length": a token budget or the context ran out
    forced_span: tuple[int, int] | None = None  # [start, end) of token_ids forced by the thinking budget


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context: int) -> None:
    """Raise PromptError for the first prompt that is empty, leaves no room in the context, or holds an id
    outside the vocabulary."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise PromptError(i, "prompt is empty")
        if len(prompt) >= context:
            raise PromptError(
                i,
                f"prompt has {len(prompt)} tokens, but the model's context (max_position_embeddings) is "
                f"{context}; no room is left to generate",
            )
        check_vocabulary(i, "prompt", prompt, vocab_size)


def check_vocabulary(index: int, what: str, token_ids: Sequence[int], vocab_size: int) -> None:
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise PromptError(
            index, f"{what} token id {bad[0]} is outside the model's vocabulary (size {vocab_size})"
        )


@dataclass
class DecodingRows:
    """State of the rows still decoding, each field [B]; `select` keeps some rows as the batch shrinks."""

    sample: torch.Tensor  # which sample (index into the results) the row produces
    generated: torch.Tensor  # tokens generated so far
    limit: torch.Tensor  # the row stops when `generated` reaches it
    context_left: torch.Tensor  # max_position_embeddings - prompt length
    in_thinking: torch.Tensor | None = None  # thinking budget only: no </think> yet
    suffix_pos: torch.Tensor | None = None  # thinking budget only: next suffix token to force, -1: none

    def select(self, rows: torch.Tensor) -> DecodingRows:
        return DecodingRows(**{k: None if v is None else v[rows] for k, v in vars(self).items()})


@torch.no_grad()
def generate(
    model: Qwen3ForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    on_step: Callable[[int, int], None] | None = None,
    prompt_keys: Sequence[int] | None = None,
) -> list[list[Sample]]:
    """Sample `params.n` responses for each prompt (token ids). Returns samples[prompt][sample].

    on_step(tokens, finished) is called after each decoding step with the number of tokens it produced and of
    samples that finished at it (a progress bar hooks in here). prompt_keys name the prompts' random streams
    (default: their indices in this call): the random number behind token t of sample s of a prompt is a
    function of (params.seed, its key, s, t) alone, so a prompt's samples do not depend on which other
    prompts share the call, in what order, or on which rank (the same key gives the same samples; only
    float rounding that differs with the batch shape could move a draw sitting on a boundary).
    The KV cache holds (longest prompt + params.longest_response) tokens for every row.
    """
    if not prompts:
        return []
    cfg = model.config
    check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings)
    device = model.lm_head.weight.device
    num_prompts, n = len(prompts), params.n
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(prompt_lengths.max())
    input_ids = torch.zeros(num_prompts, width, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):  # left padding: every row's last token sits in the last column
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, device=device)
        attention_mask[i, width - len(prompt) :] = 1

    longest = params.longest_response
    cache = StaticKVCache(cfg.num_hidden_layers, num_prompts, width + longest, device)
    hidden = model(input_ids, attention_mask=attention_mask, cache=cache).hidden_states[:, -1]  # [P, H]
    prompt_of_row = torch.arange(num_prompts, device=device).repeat_interleave(n)
    cache.select_rows(prompt_of_row)
    hidden = hidden[prompt_of_row]  # [R, H], R = P · n rows, one per sample

    R = num_prompts * n
    context_left = cfg.max_position_embeddings - prompt_lengths[prompt_of_row]
    rows = DecodingRows(
        sample=torch.arange(R, device=device),
        generated=torch.zeros_like(context_left),
        limit=context_left.clamp(max=params.max_new_tokens),
        context_left=context_left,
    )
    thinking = params.thinking
    if thinking is not None:
        suffix = torch.tensor(thinking.suffix_ids, device=device)
        closed = torch.tensor([thinking.think_end_id in p for p in prompts], device=device)
        rows.in_thinking, rows.suffix_pos = ~closed[prompt_of_row], torch.full((R,), -1, device=device)
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)

    # results, indexed by sample
    out = {
        key: torch.zeros(R, longest, device=device) for key in ("logprobs", "sample_logprobs", "entropies")
    }
    out["token_ids"] = torch.zeros(R, longest, dtype=torch.long, device=device)
    out_length = torch.zeros(R, dtype=torch.long, device=device)
    out_stopped = torch.zeros(R, dtype=torch.bool, device=device)
    out_suffix_at = torch.full((R,), -1, dtype=torch.long, device=device)

    keys = torch.tensor(range(num_prompts) if prompt_keys is None else list(prompt_keys), device=device)
    if len(keys) != num_prompts:
        raise ValueError(f"got {len(keys)} prompt keys for {num_prompts} prompts")
    stream = sample_keys(params.seed, keys, n)  # [R], indexed by sample
    while True:
        logits = model.lm_head(hidden).float()  # [B, V], the last position only
        step = choose_tokens(logits, params, keyed_uniforms(stream[rows.sample], rows.generated))
        tokens, sample_logprobs = step.tokens, step.sample_logprobs
        if thinking is not None:  # rows at the budget start the suffix; rows inside it take its next token
            starts = rows.in_thinking & (rows.generated == thinking.budget) & (rows.suffix_pos < 0)
            rows.suffix_pos = rows.suffix_pos.masked_fill(starts, 0)
            answer_end = torch.minimum(rows.generated + len(suffix) + params.answer_budget, rows.context_left)
            rows.limit = torch.where(starts, answer_end, rows.limit)
            out_suffix_at[rows.sample[starts]] = rows.generated[starts]
            forced = rows.suffix_pos >= 0
            tokens = torch.where(forced, suffix[rows.suffix_pos.clamp(min=0)], tokens)
            sample_logprobs = sample_logprobs.masked_fill(forced, 0.0)
            rows.in_thinking &= tokens != thinking.think_end_id
            rows.suffix_pos = torch.where(forced, rows.suffix_pos + 1, rows.suffix_pos)
            rows.suffix_pos = rows.suffix_pos.masked_fill(rows.suffix_pos == len(suffix), -1)
        if params.entropy_temperature == 1.0:
            entropies = step.entropy_t1
        else:
            entropies = log_normalizer_and_entropy(logits / params.entropy_temperature)[1]
        slot = (rows.sample, rows.generated)
        out["token_ids"][slot] = tokens
        out["logprobs"][slot] = logits.gather(1, tokens[:, None])[:, 0] - step.log_normalizer
        out["sample_logprobs"][slot] = sample_logprobs
        out["entropies"][slot] = entropies
        rows.generated += 1

        stopped = torch.isin(tokens, stop_ids)
        done = stopped | (rows.generated >= rows.limit)
        finished = int(done.sum())  # the one host sync per step
        if on_step is not None:
            on_step(len(tokens), finished)
        if finished:
            out_length[rows.sample[done]] = rows.generated[done]
            out_stopped[rows.sample[done]] = stopped[done]
            keep = (~done).nonzero()[:, 0]
            if len(keep) == 0:
                break
            cache.select_rows(keep)
            rows, tokens = rows.select(keep), tokens[keep]
        hidden = model(tokens[:, None], cache=cache).hidden_states[:, 0]  # [B, H]

    out = {key: value.cpu() for key, value in out.items()}
    lengths, stopped_at_end, suffix_at = out_length.tolist(), out_stopped.tolist(), out_suffix_at.tolist()
    suffix_length = len(thinking.suffix_ids) if thinking is not None else 0
    forced_spans = [
        (at, min(at + suffix_length, length)) if at >= 0 else None
        for at, length in zip(suffix_at, lengths, strict=True)
    ]
    return [
        [
            Sample(
                prompt_index=r // n,
                sample_index=r % n,
                **{key: value[r, : lengths[r]].clone() for key, value in out.items()},
                finish_reason="stop" if stopped_at_end[r] else "length",
                forced_span=forced_spans[r],
            )
            for r in range(p * n, (p + 1) * n)
        ]
        for p in range(num_prompts)
    ]
