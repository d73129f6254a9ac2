"""RL prompts with their ground truths: verl's layout (`prompt` as chat messages, `reward_model.ground_truth`,
`data_source`) or a plain `{problem, answer}` layout, in .jsonl or .parquet, rendered to token ids once."""

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


def row_prompt(row: dict, where: str) -> tuple[str | list[dict], str, str]:
    """(prompt text or messages, ground truth, data source) of one row, in either layout."""
    if "prompt" in row and "reward_model" in row:  # verl
        prompt = row["prompt"]
        if isinstance(prompt, list):
            for i, m in enumerate(prompt):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                    raise InputError(f"{where}: prompt[{i}] must be an object with 'role' and string 'content'")
        elif not isinstance(prompt, str):
            raise InputError(f"{where}: 'prompt' must be a list of chat messages or a string")
        reward_model = row["reward_model"]
        truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
        if truth is None:
            raise InputError(f"{where}: field 'reward_model.ground_truth' is missing")
        return prompt, str(truth), str(row.get("data_source", ""))
    if "problem" in row:
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise InputError(f"{where}: field 'problem' must be a non-empty string")
        if "answer" not in row:
            raise InputError(f"{where}: field 'answer' is missing")
        return row["problem"], str(row["answer"]), str(row.get("data_source", ""))
    raise InputError(
        f"{where}: expected verl's layout ('prompt' + 'reward_model.ground_truth') or "
        f"{{'problem', 'answer'}}; found fields {sorted(row)}"
    )


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
        if not chat and not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt)  # a base model reads the turns as plain text
        ids = render_prompt(tokenizer, prompt, chat=chat, enable_thinking=enable_thinking, template=template)
        if len(ids) > max_prompt_tokens:
            raise InputError(
                f"{where}: the prompt has {len(ids)} tokens, over data.max_prompt_tokens={max_prompt_tokens}; "
                "raise the limit or drop the row"
            )
        prompts.append(RLPrompt(ids, truth, source, where))
    return prompts
