"""Rewards for a batch of responses: verifiers chosen by name (built-in) or import path (user), run in a
`VerifierPool` so that a slow or hanging check scores `failed` and is counted instead of stalling the step."""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from forkflow.rewards.math_verifier import verify_math, verify_math_answer_line
from forkflow.rewards.synthetic_tasks import verify_arithmetic, verify_countdown
from forkflow.rewards.verifier_pool import VerifierPool

Verifier = Callable[[str, str], "bool | float"]  # (response, ground_truth) -> correct, or a reward

BUILTIN_VERIFIERS: dict[str, Verifier] = {
    "math": verify_math,  # last \boxed{} compared by math-verify
    "math_answer_line": verify_math_answer_line,  # DAPO's strict "Answer:" string check
    "countdown": verify_countdown,
    "arithmetic": verify_arithmetic,
}


def load_reward_function(import_path: str) -> Verifier:
    """The user function at "package.module:function", taking (response, ground_truth) and returning a bool
    (correct or not) or a number (the reward itself). It must live at module level of an importable module,
    because the pool's worker processes import it by name."""
    module_name, colon, attribute = import_path.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"reward function {import_path!r} must be written 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"reward function {import_path!r}: cannot import {module_name!r} ({error})"
        ) from error
    function = module
    for name in attribute.split("."):
        if not hasattr(function, name):
            raise ValueError(
                f"reward function {import_path!r}: {module_name!r} has no attribute {attribute!r}"
            )
        function = getattr(function, name)
    if not callable(function):
        raise ValueError(f"reward function {import_path!r} is a {type(function).__name__}, not a function")
    return function


def resolve_verifier(name: str) -> Verifier:
    """A built-in verifier by name (math, math_answer_line, countdown, arithmetic) or a user one by path."""
    if name in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[name]
    if ":" in name:
        return load_reward_function(name)
    raise ValueError(
        f"unknown verifier {name!r}; use one of {sorted(BUILTIN_VERIFIERS)} or 'package.module:function'"
    )


@dataclass(frozen=True)
class RewardValues:
    """The reward for each verdict: 1/0 by default, DAPO's ±1 with incorrect=-1.0."""

    correct: float = 1.0
    incorrect: float = 0.0
    failed: float = 0.0  # the check timed out, raised, or returned something that is not a bool or number


@dataclass
class ScoredBatch:
    rewards: list[float]  # one per response
    correct: list[bool]  # the correctness flags (for accuracy and DAPO dynamic sampling), False if failed
    timed_out: int  # checks abandoned at the pool's timeout
    failed: int  # checks that raised, died, or returned neither a bool nor a number
    first_error: str | None  # the failure of the lowest-numbered failed item, for the log


def score_responses(
    pool: VerifierPool,
    verifier: Verifier | Sequence[Verifier],
    responses: Sequence[str],
    ground_truths: Sequence[str],
    values: RewardValues = RewardValues(),
) -> ScoredBatch:
    """Check each response against its ground truth in `pool` and turn the verdicts into rewards.

    `verifier` is one function for all responses or one per response (e.g. by each row's data_source).
    A bool verdict becomes values.correct / values.incorrect; a number is the reward itself and counts as
    correct when positive; a timeout or failure scores values.failed and is counted.
    """
    verifiers = [verifier] * len(responses) if callable(verifier) else list(verifier)
    if not len(verifiers) == len(responses) == len(ground_truths):
        raise ValueError(
            f"score_responses: {len(responses)} responses, {len(ground_truths)} ground truths and "
            f"{len(verifiers)} verifiers; give one of each per response"
        )
    for index, (response, truth) in enumerate(zip(responses, ground_truths, strict=True)):
        if not isinstance(response, str) or not isinstance(truth, str):
            raise TypeError(
                f"score_responses: item {index} has response {type(response).__name__} and ground truth "
                f"{type(truth).__name__}; both must be str"
            )
    results = pool.run(
        [(check, (r, t)) for check, r, t in zip(verifiers, responses, ground_truths, strict=True)]
    )
    rewards, correct, errors, timed_out = [], [], dict(results.errors), set(results.timed_out)
    for index, verdict in enumerate(results.values):
        if isinstance(verdict, bool):
            rewards.append(values.correct if verdict else values.incorrect)
            correct.append(verdict)
        elif isinstance(verdict, numbers.Real):
            rewards.append(float(verdict))
            correct.append(verdict > 0)
        else:  # timed out, failed, or returned something else
            rewards.append(values.failed)
            correct.append(False)
            if index not in errors and index not in timed_out:
                errors[index] = f"the verifier returned {type(verdict).__name__}; return a bool or a number"
    first_error = f"item {min(errors)}: {errors[min(errors)]}" if errors else None
    return ScoredBatch(rewards, correct, len(timed_out), len(errors), first_error)
