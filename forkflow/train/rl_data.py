"""Prompts with their ground truths, in the layouts every command reads (train, eval, generate, entropy score):
verl's (`prompt` as chat messages or text, `reward_model.ground_truth`, `data_source`) or a plain
`{problem, answer}`, in .jsonl or .parquet, rendered to token ids once."""

from __future__ import annotations

import os
from dataclasses import dataclass

from forkflow.chat import render_prompt
from forkflow.jsonl import InputError
from forkflow.train.sft_data import read_rows

# The forking-token paper's prompt for base models (DAPO's data asks for the same boxed answer).
BOXED_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass
class RLPrompt:
    prompt_ids: list[int]
    ground_truth: str
    data_source: str  # picks the verifier when the config maps data sources to verifiers
    where: str  # "file line N"


def row_prompt(row: dict, where: str, need_answer: bool = True) -> tuple[str | list[dict], str | None, str]:
    """(prompt text or messages, ground truth, data source) of one row, in either layout. Generation needs no
    answer (need_answer=False): a row with only `prompt` or `problem` is then accepted, its truth None."""
    if "prompt" in row and ("reward_model" in row or not need_answer):  # verl (or a bare prompt to sample)
        prompt = row["prompt"]
        if isinstance(prompt, list):
            for i, m in enumerate(prompt):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                    raise InputError(f"{where}: prompt[{i}] must be an object with 'role' and string 'content'")
        elif not isinstance(prompt, str):
            raise InputError(f"{where}: 'prompt' must be a list of chat messages or a string")
        if not prompt or isinstance(prompt, str) and not prompt.strip():
            raise InputError(f"{where}: prompt is empty")
        reward_model = row.get("reward_model")
        truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
        if truth is None and need_answer:
            raise InputError(f"{where}: field 'reward_model.ground_truth' is missing")
        return prompt, None if truth is None else str(truth), str(row.get("data_source", ""))
    if "problem" in row:
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise InputError(f"{where}: field 'problem' must be a non-empty string")
        if "answer" not in row and need_answer:
            raise InputError(f"{where}: field 'answer' is missing")
        truth = row.get("answer")
        return row["problem"], None if truth is None else str(truth), str(row.get("data_source", ""))
    if not need_answer:
        raise InputError(f"{where}: needs 'prompt' (text or chat messages) or 'problem' (text); "
                         f"found fields {sorted(row)}")
    raise InputError(
        f"{where}: expected verl's layout ('prompt' + 'reward_model.ground_truth') or "
        f"{{'problem', 'answer'}}; found fields {sorted(row)}"
    )


def prompt_token_ids(tokenizer, prompt: str | list[dict], *, chat: bool, enable_thinking: bool,
                     template: str | None) -> list[int]:
    """A row's prompt rendered for generation: with the chat template, or (chat=False, base models) as plain text
    in `template`, chat turns joined by newlines."""
    if not chat and not isinstance(prompt, str):
        prompt = "\n".join(m["content"] for m in prompt)  # a base model reads the turns as plain text
    return render_prompt(tokenizer, prompt, chat=chat, enable_thinking=enable_thinking, template=template)


def load_rl_prompts(
    path: str | os.PathLike,
    tokenizer,
    *,
    chat: bool,
    enable_thinking: bool,
    template: str | None,
    max_prompt_tokens: int,
) -> list[RLPrompt]:
    """Every row of `path` rendered to prompt ids; a prompt over `max_prompt_tokens` is an error naming it."""
    prompts = []
    for where, row in read_rows(path):
        prompt, truth, source = row_prompt(row, where)
        ids = prompt_token_ids(tokenizer, prompt, chat=chat, enable_thinking=enable_thinking, template=template)
        if len(ids) > max_prompt_tokens:
            raise InputError(
                f"{where}: the prompt has {len(ids)} tokens, over data.max_prompt_tokens={max_prompt_tokens}; "
                "raise the limit or drop the row"
            )
        prompts.append(RLPrompt(ids, truth, source, where))
    return prompts
