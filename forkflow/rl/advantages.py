"""Outcome-reward advantage estimators over groups of responses to the same prompt (GRPO, Dr.GRPO, RLOO).

Each estimator maps one scalar score per response to one advantage per response; the trainer broadcasts
it over the response's tokens. Estimators are chosen by name from config through `advantage_estimator`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def group_statistics(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-element mean, unbiased std and size of the element's group.

    values: [B] float; group_ids: [B] int, equal ids mark responses to the same prompt (any order).
    Returns (mean [B], std [B], size [B]); a group of one has std 0 (it has no spread).
    """
    if values.shape != group_ids.shape or values.dim() != 1:
        raise ValueError(
            f"scores {tuple(values.shape)} and group_ids {tuple(group_ids.shape)} must both be [B] "
            "(one score and one group id per response)"
        )
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    values = values.float()
    sums = torch.zeros(len(counts), device=values.device).index_add_(0, index, values)
    mean = (sums / counts)[index]
    squared = torch.zeros(len(counts), device=values.device).index_add_(0, index, (values - mean) ** 2)
    std = torch.where(counts > 1, (squared / (counts - 1).clamp(min=1)).sqrt(), 0.0)[index]
    return mean, std, counts[index]


def _require_groups_of_two(sizes: torch.Tensor, estimator: str) -> None:
    if bool((sizes < 2).any()):
        raise ValueError(
            f"{estimator} needs at least 2 responses per prompt, but a group has 1; "
            "sample n >= 2 responses per prompt (rollout n) or check the group ids"
        )


def grpo_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, normalize_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO group-relative advantage (DeepSeekMath, arXiv:2402.03300, §4.1.2, outcome supervision):

        A_i = (r_i − mean(r_G)) / (std(r_G) + ε)        (normalize_by_std=True, GRPO / DAPO)
        A_i =  r_i − mean(r_G)                          (normalize_by_std=False, Dr.GRPO, arXiv:2503.20783)

    with G the group of responses to the prompt of response i and std the unbiased sample std (as verl).
    scores: [B]; group_ids: [B] int. Returns advantages [B].
    """
    mean, std, sizes = group_statistics(scores, group_ids)
    _require_groups_of_two(sizes, "GRPO")
    centred = scores.float() - mean
    return centred / (std + eps) if normalize_by_std else centred


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out baseline (Ahmadian et al., arXiv:2402.14740, eq. 6):

        A_i = r_i − 1/(n−1) · Σ_{j≠i} r_j  =  n/(n−1) · (r_i − mean(r_G)),   n = |G|.

    scores: [B]; group_ids: [B] int. Returns advantages [B].
    """
    mean, _, sizes = group_statistics(scores, group_ids)
    _require_groups_of_two(sizes, "RLOO")
    return sizes / (sizes - 1) * (scores.float() - mean)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
}


def advantage_estimator(name: str) -> Callable[..., torch.Tensor]:
    """The estimator named `name` in config (grpo or rloo); Dr.GRPO is grpo with normalize_by_std=False."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    return ADVANTAGE_ESTIMATORS[name]
