"""Tokenizer loading and prompt rendering: chat templates with thinking on/off, base-model templates, and
the thinking-budget suffix (Qwen3 report §4.3).

RL keeps token ids end to end: re-rendering a conversation is not prefix-preserving (earlier turns lose
their thinking), so nothing downstream re-tokenizes generated text.
"""

from __future__ import annotations

from pathlib import Path

THINK_END = "</think>"
# What Qwen appends when thinking reaches its budget without closing, so the model answers from there.
THINKING_BUDGET_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n"
    "</think>\n\n"
)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a checkpoint directory (tokenizer.json + tokenizer_config.json), offline."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json or tokenizer_config.json; copy the tokenizer files into the checkpoint "
            "directory (forkflow loads nothing from the network)"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def render_prompt(
    tokenizer,
    prompt: str | list[dict],
    *,
    chat: bool = True,
    enable_thinking: bool = True,
    template: str | None = None,
) -> list[int]:
    """Token ids of a prompt ready for generation.

    chat=True renders messages (or a single user text) with the checkpoint's own chat template and the
    assistant generation prompt; enable_thinking=False closes an empty <think> block, as Qwen3 does to
    switch thinking off. chat=False renders a plain-text `template` with a `{prompt}` field, for base models.
    """
    if chat:
        if tokenizer.chat_template is None:
            raise ValueError("this tokenizer has no chat template; use chat=False with a plain prompt template")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    if not isinstance(prompt, str):
        raise ValueError("chat=False renders a text prompt; got chat messages (use chat=True)")
    text = (template or "{prompt}").format(prompt=prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def thinking_budget_suffix(tokenizer) -> list[int]:
    """Ids of the stop-thinking text, tokenized on its own (tokenization depends on context)."""
    return tokenizer.encode(THINKING_BUDGET_TEXT, add_special_tokens=False)


def think_end_id(tokenizer) -> int | None:
    """Id of `</think>`, or None when the vocabulary has no such single token."""
    tid = tokenizer.convert_tokens_to_ids(THINK_END)
    return None if tid is None or tid == tokenizer.unk_token_id else tid


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops on any of these: the tokenizer's eos plus Qwen's <|im_end|> and <|endoftext|>."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for text in STOP_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(text)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)
