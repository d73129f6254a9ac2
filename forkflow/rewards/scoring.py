"""Rewards for a batch of responses: verifiers chosen by name (built-in) or import path (user), run in a
`VerifierPool` so that a slow or hanging check scores `failed` and is counted instead of stalling the step."""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from forkflow.config import ConfigError
from forkflow.rewards.math_verifier import verify_math, verify_math_answer_line
from forkflow.rewards.synthetic_tasks import verify_arithmetic, verify_countdown
from forkflow.rewards.verifier_pool import VerifierPool, describe_error

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
    because the pool's worker processes import it by name. A path that does not lead to a function is a
    ConfigError that says what to fix."""
    module_name, colon, attribute = import_path.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(
            f"verifier {import_path!r}: write a user verifier as 'package.module:function' (e.g. "
            f"'my_rewards:score'), or use a built-in one: {', '.join(BUILTIN_VERIFIERS)}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None)
        if isinstance(error, ModuleNotFoundError) and missing and f"{module_name}.".startswith(f"{missing}."):
            raise ConfigError(
                f"verifier {import_path!r}: there is no module {missing!r} to import; check the spelling, and "
                "install the package or put its directory on PYTHONPATH (for a file in the current directory: "
                "PYTHONPATH=. forkflow ...)"
            ) from error
        raise ConfigError(
            f"verifier {import_path!r}: importing {module_name!r} failed: {describe_error(error)}"
        ) from error
    except Exception as error:  # the module itself is broken: say where
        raise ConfigError(
            f"verifier {import_path!r}: importing {module_name!r} raised {describe_error(error)}"
        ) from error
    function = module
    for name in attribute.split("."):
        if not hasattr(function, name):
            raise ConfigError(
                f"verifier {import_path!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {attribute!r}; check the function's name after the ':'"
            )
        function = getattr(function, name)
    if not callable(function):
        raise ConfigError(
            f"verifier {import_path!r} is a {type(function).__name__}, not a function (response, ground_truth)"
        )
    return function


def resolve_verifier(name: str) -> Verifier:
    """A built-in verifier by name (math, math_answer_line, countdown, arithmetic) or a user one by path;
    anything else is a ConfigError naming `name`."""
    if name in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[name]
    if ":" in name:
        return load_reward_function(name)
    raise ConfigError(
        f"unknown verifier {name!r}; use one of {', '.join(BUILTIN_VERIFIERS)} or a user function written "
        "'package.module:function'"
    )


@dataclass(frozen=True)
class RewardValues:
    """The reward for each verdict: 1/0 by default, DAPO's ±1 with incorrect=-1.0."""

    correct: float = 1.0
    incorrect: float = 0.0
    failed: float = 0.0  # unverifiable: the check timed out, raised, died, or returned neither a bool nor a number


@dataclass
class ScoredBatch:
    """A batch's rewards and what went wrong while checking it; the caller logs `first_error` once."""

    rewards: list[float]  # one per response
    correct: list[bool]  # the correctness flags (for accuracy and DAPO dynamic sampling), False if unverifiable
    timeouts: int  # checks killed at the pool's timeout
    errors: int  # checks that raised, died, or returned neither a bool nor a finite number
    first_error: str | None  # one line about the lowest-numbered error: item, verifier, exception, file:line


def _verifier_name(verifier: Verifier) -> str:
    """"module:function", the way a user verifier is named in a config."""
    module = getattr(verifier, "__module__", None) or "?"
    return f"{module}:{getattr(verifier, '__qualname__', type(verifier).__name__)}"


def _bad_verdict(verdict: object) -> str | None:
    """Why `verdict` is not a bool or a finite number, or None if it is one."""
    if isinstance(verdict, bool) or (isinstance(verdict, numbers.Real) and math.isfinite(verdict)):
        return None
    kind = type(verdict)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    shown = repr(verdict)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"returned {name} {shown}; return a bool (correct or not) or a finite number (the reward)"


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
    correct when positive. A check that times out, raises, kills its worker or returns anything else scores
    values.failed, is not correct, and is counted (`timeouts` or `errors`); nothing is printed.
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
    rewards, correct, errors, timeouts = [], [], dict(results.errors), set(results.timeouts)
    for index, verdict in enumerate(results.values):
        problem = None if index in errors or index in timeouts else _bad_verdict(verdict)
        if problem is not None:
            errors[index] = problem
        if index in errors or index in timeouts:
            rewards.append(values.failed)
            correct.append(False)
        elif isinstance(verdict, bool):
            rewards.append(values.correct if verdict else values.incorrect)
            correct.append(verdict)
        else:
            rewards.append(float(verdict))
            correct.append(verdict > 0)
    first_error = None
    if errors:
        index = min(errors)
        first_error = f"item {index} ({_verifier_name(verifiers[index])}): {errors[index]}"
    return ScoredBatch(rewards, correct, len(timeouts), len(errors), first_error)
