"""The real Qwen3 tokenizer rebuilt offline, chat rendering with thinking on/off, and the thinking-budget suffix."""

import pytest

from forkflow.chat import (
    THINKING_BUDGET_TEXT,
    load_tokenizer,
    render_prompt,
    stop_token_ids,
    think_end_id,
    thinking_budget_suffix,
)


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir):
    return load_tokenizer(qwen3_tokenizer_dir)


def test_reference_encoding(tok):
    ids = tok.encode("<|im_start|>user\nHow are you?<|im_end|>\n")
    assert ids == [151644, 872, 198, 4340, 525, 498, 30, 151645, 198]
    assert len(tok) == 151669
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<think>", "</think>"]) == [151643, 151667, 151668]


@pytest.mark.parametrize("text", [
    "Hello world, 12345 naïve  \n\n  code",
    "def f(x):\n    return x**2  # 平方\n",
    "Let's think. Wait, however... THUS 3.14159 ≈ π!",
    "emoji 🤔 and tabs\t\tend ",
])
def test_round_trip_and_merges(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # every merge is reachable: far fewer ids than bytes on ordinary text
    assert len(ids) < len(text.encode())


def test_chat_thinking_off_ends_with_empty_think(tok):
    ids = render_prompt(tok, "What is 2+2?", enable_thinking=False)
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text.startswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n")


def test_chat_thinking_on_ends_with_generation_prompt(tok):
    text = tok.decode(render_prompt(tok, [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "hi"}]))
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_history_drops_earlier_thinking(tok):
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n2"},
        {"role": "user", "content": "2+2?"},
    ]
    text = tok.decode(render_prompt(tok, messages))
    assert "add them" not in text and "<|im_start|>assistant\n2<|im_end|>" in text


def test_base_model_template(tok):
    ids = render_prompt(tok, "2+2?", chat=False, template="Question: {prompt}\nAnswer:")
    assert tok.decode(ids) == "Question: 2+2?\nAnswer:"
    with pytest.raises(ValueError, match="chat=True"):
        render_prompt(tok, [{"role": "user", "content": "x"}], chat=False)


def test_thinking_budget_suffix(tok):
    ids = thinking_budget_suffix(tok)
    assert tok.decode(ids) == THINKING_BUDGET_TEXT
    assert ids[-2:] == [151668, 271]  # `</think>` then "\n\n"
    assert ids == tok.encode(THINKING_BUDGET_TEXT)  # tokenized on its own, no specials added
    assert think_end_id(tok) == 151668


def test_stop_tokens(tok):
    assert stop_token_ids(tok) == [151643, 151645]


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
