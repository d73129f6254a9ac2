"""The demo's reasoning task: countdown with three numbers, solved by a depth-first search whose trace (the
tries, the dead ends, the backtracking) is the chain of thought a tiny Qwen3 learns, and a tokenizer in the
Qwen3 chat format for it: one token per character, except that whole numbers are single tokens.

A trace tries first steps in a random order, one line each, continuing every first step with the third
number in all ways until it hits the target (here 3 9 7 -> 19):

    <think>
    7-3=4 4+9=13 9-4=5
    3+9=12 12+7=19
    </think>
    \\boxed{(3+9)+7}

The choice of which first step to try (and which operation next), and when to stop, is where the forks are;
the arithmetic after `=` is forced (the demo's entropy report shows exactly that). Answers are checked by
`forkflow.rewards.verify_countdown`.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from forkflow.qwen3_tokenizer import CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHARACTERS = list("+-*/=()[]{},:> \n\\") + sorted(set("boxed" + "usersystemassistant"))
NUMBERS = [str(i) for i in range(100)]  # one token each: copying and adding numbers are single-token steps
MAX_NUMBER = 9  # single-digit numbers: copying one from the prompt is one token
MIN_TARGET = 5
# Addition and subtraction keep the arithmetic within reach of a tiny model trained for minutes, so what it
# has to learn (and what RL can improve) is the search: which pair and operation to try first.
OPERATIONS = ("+", "-")


def _combine(a: int, b: int, a_expr: str = "", b_expr: str = "") -> list[tuple[str, int, str]]:
    """a op b for the task's operations (subtraction larger first): [(text as the trace shows it, value,
    expression over the original numbers, given the expressions a and b stand for)]."""
    a_expr, b_expr = a_expr or str(a), b_expr or str(b)
    (hi, hi_expr), (lo, lo_expr) = sorted([(a, a_expr), (b, b_expr)], key=lambda t: -t[0])
    results = {
        "+": (f"{a}+{b}", a + b, f"{a_expr}+{b_expr}"),
        "-": (f"{hi}-{lo}", hi - lo, f"{hi_expr}-{lo_expr}"),
        "*": (f"{a}*{b}", a * b, f"{a_expr}*{b_expr}"),
    }
    return [results[op] for op in OPERATIONS]


def solve_trace(numbers: list[int], target: int, rng: random.Random) -> tuple[str, str] | None:
    """(thinking trace, answer expression) of a randomly ordered search, or None when unsolvable."""
    first_steps = [
        (text, value, expr, numbers[3 - i - j])
        for i in range(3) for j in range(i + 1, 3)
        for text, value, expr in _combine(numbers[i], numbers[j])
    ]  # fmt: skip
    rng.shuffle(first_steps)
    lines = []
    for text, value, expr, third in first_steps:
        seconds = _combine(value, third, f"({expr})")
        rng.shuffle(seconds)
        line = [f"{text}={value}"]
        for text2, value2, answer in seconds:
            line.append(f"{text2}={value2}")
            if value2 == target:
                lines.append(" ".join(line))
                return "\n".join(lines), answer
        lines.append(" ".join(line))
    return None


def make_problems(seed: int) -> list[dict]:
    """Every distinct solvable problem (three numbers in 1..MAX_NUMBER, a target of at least MIN_TARGET),
    shuffled by `seed`: [{numbers, target, prompt, answer (ground-truth JSON for verify_countdown)}]."""
    found = {}
    for triple in itertools.combinations_with_replacement(range(1, MAX_NUMBER + 1), 3):
        a, b, c = triple
        for x, y, z in ((a, b, c), (a, c, b), (b, c, a)):
            for _, value, _ in _combine(x, y):
                for _, target, _ in _combine(value, z):
                    if MIN_TARGET <= target:
                        found[(triple, target)] = None
    rng = random.Random(seed)
    problems = []
    for triple, target in sorted(found):
        problems.append({"numbers": list(triple), "target": target})
    rng.shuffle(problems)
    for problem in problems:
        rng.shuffle(problem["numbers"])
        problem["prompt"] = " ".join(map(str, problem["numbers"])) + f" -> {problem['target']}"
        problem["answer"] = json.dumps({"target": problem["target"], "numbers": problem["numbers"]})
    return problems


def sft_messages(problem: dict, rng: random.Random) -> list[dict]:
    """One solver demonstration as chat messages (thinking included in the assistant turn)."""
    solved = solve_trace(problem["numbers"], problem["target"], rng)
    if solved is None:
        raise ValueError(f"problem {problem['prompt']!r} has no solution")
    trace, answer = solved
    return [
        {"role": "user", "content": problem["prompt"]},
        {"role": "assistant", "content": f"<think>\n{trace}\n</think>\n\n\\boxed{{{answer}}}"},
    ]


def build_char_tokenizer(out_dir: str | Path) -> Path:
    """The task's tokenizer (characters, and numbers 0..99 as single tokens) in the Qwen3 chat format, saved
    loadable by transformers."""
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for piece in CHARACTERS + NUMBERS:
        vocab.setdefault(piece, len(vocab))
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d+|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS[:3])
    tok.add_tokens(SPECIAL_TOKENS[3:])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    return Path(out_dir)
