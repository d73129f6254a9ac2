"""Teacher-forced scoring of given responses (per-token T = 1 log-probs and entropies at a temperature), and
reading scored JSON-lines files back for reports and comparisons."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forkflow.jsonl import InputError, read_jsonl, token_id_list
from forkflow.models.qwen3 import Qwen3ForCausalLM
from forkflow.ops import token_logprobs_and_entropy
from forkflow.rollout.engine import PromptError, check_vocabulary


def check_pairs(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], vocab_size: int, context: int
) -> None:
    """Raise PromptError for the first (prompt, response) pair that cannot be scored."""
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if not prompt:
            raise PromptError(i, "prompt is empty")
        if not response:
            raise PromptError(i, "response is empty")
        if len(prompt) + len(response) > context:
            raise PromptError(
                i,
                f"prompt + response have {len(prompt) + len(response)} tokens, but the model's context "
                f"(max_position_embeddings) is {context}",
            )
        check_vocabulary(i, "prompt", prompt, vocab_size)
        check_vocabulary(i, "response", response, vocab_size)


@torch.no_grad()
def score_responses(
    model: Qwen3ForCausalLM,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logprobs [L], entropies [L]) of every response token given its prompt, both fp32 on the CPU.

    The same fields as generation returns: log-probs at T = 1, entropies of softmax(z / temperature).
    """
    cfg = model.config
    check_pairs(prompts, responses, cfg.vocab_size, cfg.max_position_embeddings)
    device, weight = model.lm_head.weight.device, model.lm_head.weight
    results = []
    for first in range(0, len(prompts), batch_size):
        pairs = list(
            zip(prompts[first : first + batch_size], responses[first : first + batch_size], strict=True)
        )
        width = max(len(p) + len(r) for p, r in pairs)
        input_ids = torch.zeros(len(pairs), width, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        rows, columns = [], []  # where each response token is predicted: one position before it
        for i, (prompt, response) in enumerate(pairs):  # right padding
            sequence = [*prompt, *response]
            input_ids[i, : len(sequence)] = torch.tensor(sequence, device=device)
            attention_mask[i, : len(sequence)] = 1
            rows += [i] * len(response)
            columns += range(len(prompt) - 1, len(sequence) - 1)
        hidden = model(input_ids, attention_mask=attention_mask).hidden_states  # [b, T, H]
        predicting = hidden[rows, columns]  # [N, H]
        targets = input_ids[rows, [c + 1 for c in columns]]  # [N]
        logprobs, entropies = token_logprobs_and_entropy(predicting, weight, targets)
        if temperature != 1.0:
            entropies = token_logprobs_and_entropy(predicting, weight, targets, temperature)[1]
        lengths = [len(r) for _, r in pairs]
        results += zip(logprobs.cpu().split(lengths), entropies.cpu().split(lengths), strict=True)
    return results


@dataclass
class ScoredResponse:
    """One line of a scored file (from `forkflow entropy score` or `forkflow generate`)."""

    line: int
    token_ids: list[int]
    entropies: list[float]
    tokens: list[str] | None  # each token's text, when the file has it
    forced_span: tuple[int, int] | None = None  # [start, end) forced by a thinking budget, not sampled

    def sampled(self) -> list[bool]:
        """Per token: chosen by the model (True), or part of the forced span (left out of the statistics)."""
        start, end = self.forced_span or (0, 0)
        return [not start <= i < end for i in range(len(self.token_ids))]


def read_scored(path: str | os.PathLike, need_tokens: bool = False) -> list[ScoredResponse]:
    """Every line needs `token_ids` and `entropies` of the same length (and `tokens` when need_tokens)."""
    scored = []
    for line, record in read_jsonl(path):
        where = f"{path} line {line}"
        for key in ("token_ids", "entropies", *(("tokens",) if need_tokens else ())):
            if key not in record:
                raise InputError(
                    f"{where}: field '{key}' is missing (score the file with `forkflow entropy score`)"
                )
        token_ids = token_id_list(record, "token_ids", where)
        entropies = record["entropies"]
        if not isinstance(entropies, list) or not all(
            isinstance(h, (int, float)) and not isinstance(h, bool) and math.isfinite(h) and h >= 0
            for h in entropies
        ):
            raise InputError(f"{where}: field 'entropies' must be a list of finite numbers >= 0")
        tokens = record.get("tokens")
        if tokens is not None and (
            not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens)
        ):
            raise InputError(f"{where}: field 'tokens' must be a list of strings")
        for key, values in (("entropies", entropies), ("tokens", tokens)):
            if values is not None and len(values) != len(token_ids):
                raise InputError(
                    f"{where}: '{key}' has {len(values)} values but 'token_ids' has {len(token_ids)} tokens"
                )
        span = record.get("forced_span")
        if span is not None and not (
            isinstance(span, list) and len(span) == 2 and all(isinstance(i, int) for i in span)
            and 0 <= span[0] <= span[1] <= len(token_ids)
        ):  # fmt: skip
            raise InputError(
                f"{where}: 'forced_span' must be [start, end] within the {len(token_ids)} tokens"
            )
        entropies = [float(h) for h in entropies]
        scored.append(ScoredResponse(line, token_ids, entropies, tokens, tuple(span) if span else None))
    return scored
