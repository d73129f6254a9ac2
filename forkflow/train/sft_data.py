"""SFT data: rows of chat messages or prompt/response pairs (jsonl, or parquet when pyarrow is installed),
rendered with the tokenizer's chat template into token ids and a loss mask that is 1 on assistant tokens only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from forkflow.jsonl import InputError, read_jsonl

ROLES = ("system", "user", "assistant", "tool")
ASSISTANT_START = "<|im_start|>assistant\n"  # ChatML, the format of every Qwen chat template
TURN_END = "<|im_end|>"


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on the assistant's tokens (its content and the closing <|im_end|>)
    source: str  # "file line N", for messages about this example


def read_rows(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(where, row) for every row of a .jsonl or .parquet file; `where` names the file and line (or row)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [(f"{path} line {number}", row) for number, row in read_jsonl(path)]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    raise InputError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl or .parquet")


def row_messages(row: dict, where: str) -> list[dict]:
    """The conversation of a row: its 'messages', or a user 'prompt' and an assistant 'response'."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InputError(
                    f"{where}: messages[{i}] must be an object with 'role' (one of {', '.join(ROLES)}) and a "
                    f"string 'content', got {m!r:.80}"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise InputError(f"{where}: no assistant message, so nothing to train on")
        return messages
    if "prompt" in row or "response" in row:
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{where}: field '{key}' must be a string")
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    raise InputError(f"{where}: expected 'messages', or 'prompt' and 'response'; got keys {sorted(row)}")


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, stop) of the assistant turns in ChatML text: after `<|im_start|>assistant\\n`,
    up to and including the turn's `<|im_end|>`."""
    spans = []
    start = text.find(ASSISTANT_START)
    while start >= 0:
        begin = start + len(ASSISTANT_START)
        end = text.find(TURN_END, begin)
        stop = len(text) if end < 0 else end + len(TURN_END)
        spans.append((begin, stop))
        start = text.find(ASSISTANT_START, stop)
    return spans


def sft_example(tokenizer, messages: list[dict], where: str = "example") -> SFTExample:
    """Render `messages` with the chat template; a token is trained on iff it overlaps an assistant turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = assistant_spans(text)
    if not spans:
        raise InputError(f"{where}: the chat template rendered no '<|im_start|>assistant' turn (not ChatML?)")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]  # [(start, stop)] character span of each token
    mask = [int(any(start < end and begin < stop for begin, end in spans)) for start, stop in offsets]
    if not any(mask):
        raise InputError(f"{where}: the assistant turns are empty, so nothing to train on")
    return SFTExample(list(encoded["input_ids"]), mask, where)


def load_sft_examples(path: str | os.PathLike, tokenizer) -> list[SFTExample]:
    """Every row of `path` tokenized; the first bad row stops loading with an error naming file and line."""
    return [sft_example(tokenizer, row_messages(row, where), where) for where, row in read_rows(path)]
