"""RL math for forkflow as pure functions on tensors: advantages, the policy loss and its aggregation,
forking-token selection and DAPO's reward-side pieces; config strings pick estimators and modes by name."""

from forkflow.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    advantage_estimator,
    group_statistics,
    grpo_advantages,
    rloo_advantages,
)
from forkflow.rl.dapo import dynamic_sampling_mask, overlong_penalty
from forkflow.rl.losses import (
    AGGREGATIONS,
    DENOMINATORS,
    KL_ESTIMATORS,
    PolicyLoss,
    PolicyLossStats,
    kl_k1,
    kl_k3,
    loss_weights,
    ppo_policy_loss,
)
from forkflow.rl.selection import (
    SELECTION_MODES,
    check_loss_saw_selection,
    select_tokens,
    select_tokens_global,
    selection_metrics,
    selection_size,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "DENOMINATORS",
    "KL_ESTIMATORS",
    "SELECTION_MODES",
    "PolicyLoss",
    "PolicyLossStats",
    "advantage_estimator",
    "check_loss_saw_selection",
    "dynamic_sampling_mask",
    "group_statistics",
    "grpo_advantages",
    "kl_k1",
    "kl_k3",
    "loss_weights",
    "overlong_penalty",
    "ppo_policy_loss",
    "rloo_advantages",
    "select_tokens",
    "select_tokens_global",
    "selection_metrics",
    "selection_size",
]
