"""`verify_math`: whether a response's final math answer equals the ground truth, either by math-verify on the
last `\\boxed{}` or by DAPO's strict string check of the last `Answer:` line."""

from __future__ import annotations

import logging

from math_verify import parse, verify

from forkflow.rewards.answers import last_answer_line, last_boxed, normalize_dapo_answer

MATH_MODES = ("boxed", "answer_line")
DAPO_TAIL_CHARS = 300  # DAPO looks for the answer only here (MATH-500's longest answer has 159 characters)


def _not_timeout_disabled_warning(record: logging.LogRecord) -> bool:
    # math-verify warns once per process that its timeouts are off; here that is deliberate (VerifierPool
    # enforces them), and every pool worker would repeat the warning in the training log.
    return not record.getMessage().startswith("Timeout is disabled")


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_not_timeout_disabled_warning)


def _require_text(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"verify_math: {name} must be a str, got {type(value).__name__}")


def verify_math(response: str, ground_truth: str, mode: str = "boxed") -> bool:
    """Whether `response` answers `ground_truth` correctly.

    boxed        the last `\\boxed{...}` of the response (balanced braces) and the ground truth (itself
                 unwrapped if written as `\\boxed{...}`) are parsed and compared by math-verify, so
                 `\\frac{1}{2}` equals `0.5`; no box means wrong.
    answer_line  DAPO's verifier: in the last 300 characters, the last `Answer: ...` line and the ground
                 truth, both normalised by `normalize_dapo_answer`, must be equal strings.

    math-verify's own timeouts (signal.alarm, main thread only) are off, so this runs in any thread; batch
    scoring runs it in a `VerifierPool`, which enforces a wall-clock timeout per item.
    """
    _require_text(response, "response")
    _require_text(ground_truth, "ground_truth")
    if not ground_truth.strip():
        raise ValueError("verify_math: ground_truth is empty; check the data row's answer field")
    if mode == "boxed":
        answer = last_boxed(response)
        if answer is None:
            return False
        gold = parse(f"\\boxed{{{last_boxed(ground_truth) or ground_truth}}}", parsing_timeout=None)
        predicted = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        return bool(gold) and bool(predicted) and verify(gold, predicted, timeout_seconds=None)
    if mode == "answer_line":
        answer = last_answer_line(response[-DAPO_TAIL_CHARS:])
        return answer is not None and normalize_dapo_answer(answer) == normalize_dapo_answer(ground_truth)
    raise ValueError(f"verify_math: unknown mode {mode!r}; choose one of {list(MATH_MODES)}")


def verify_math_answer_line(response: str, ground_truth: str) -> bool:
    """`verify_math` in DAPO's `answer_line` mode, as a two-argument verifier."""
    return verify_math(response, ground_truth, mode="answer_line")
