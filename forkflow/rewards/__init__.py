"""Rewards for RLVR: answer extraction and math verification, synthetic verifiable tasks, user reward
functions by import path, and batch scoring in a process pool with a wall-clock timeout per item."""

from forkflow.rewards.answers import last_answer_line, last_boxed, normalize_dapo_answer
from forkflow.rewards.math_verifier import MATH_MODES, verify_math, verify_math_answer_line
from forkflow.rewards.scoring import (
    BUILTIN_VERIFIERS,
    RewardValues,
    ScoredBatch,
    load_reward_function,
    resolve_verifier,
    score_responses,
)
from forkflow.rewards.synthetic_tasks import (
    arithmetic_tasks,
    countdown_tasks,
    parse_number,
    verify_arithmetic,
    verify_countdown,
)
from forkflow.rewards.verifier_pool import PoolResults, VerifierPool

__all__ = [
    "BUILTIN_VERIFIERS",
    "MATH_MODES",
    "PoolResults",
    "RewardValues",
    "ScoredBatch",
    "VerifierPool",
    "arithmetic_tasks",
    "countdown_tasks",
    "last_answer_line",
    "last_boxed",
    "load_reward_function",
    "normalize_dapo_answer",
    "parse_number",
    "resolve_verifier",
    "score_responses",
    "verify_arithmetic",
    "verify_countdown",
    "verify_math",
    "verify_math_answer_line",
]
