"""Outcome-reward advantage estimators over groups of responses to the same prompt (GRPO, Dr.GRPO, RLOO).

Each estimator maps one scalar score per response to one advantage per response; the trainer broadcasts
it over the response's tokens. Estimators are chosen by name from config through `advantage_estimator`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def group_statistics(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-element mean, unbiased std and size of the element's group, computed in float64.

    values: [B] float; group_ids: [B] int, equal ids mark responses to the same prompt (any order).
    Returns (mean [B] float64, std [B] float64, size [B] int); a group of one has std 0 (it has no spread).
    A group whose values are all equal has mean exactly that value and std exactly 0, so `values - mean`
    is exactly 0 there: a float sum divided by n can miss a value such as 0.7 by an ulp, and GRPO's
    division by (std + eps) would blow that ulp up into a spurious advantage.
    """
    if values.shape != group_ids.shape or values.dim() != 1:
        raise ValueError(
            f"scores {tuple(values.shape)} and group_ids {tuple(group_ids.shape)} must both be [B] "
            "(one score and one group id per response)"
        )
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    values = values.double()
    groups = torch.zeros(len(counts), dtype=torch.float64, device=values.device)
    mean = (groups.index_add(0, index, values) / counts)[index]
    lowest = groups.scatter_reduce(0, index, values, "amin", include_self=False)[index]
    highest = groups.scatter_reduce(0, index, values, "amax", include_self=False)[index]
    mean = torch.where(lowest == highest, values, mean)
    squared = groups.index_add(0, index, (values - mean) ** 2)
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
    A group of equal scores gets advantage exactly 0 (no spread, so no signal), with or without the std.
    scores: [B]; group_ids: [B] int. Returns advantages [B] float32 (statistics are taken in float64).
    """
    mean, std, sizes = group_statistics(scores, group_ids)
    _require_groups_of_two(sizes, "GRPO")
    centred = scores.double() - mean  # exactly 0 in a group of equal scores, so its advantages are 0
    advantages = centred / (std + eps) if normalize_by_std else centred
    return advantages.float()


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out baseline (Ahmadian et al., arXiv:2402.14740, eq. 6):

        A_i = r_i − 1/(n−1) · Σ_{j≠i} r_j  =  n/(n−1) · (r_i − mean(r_G)),   n = |G|.

    A group of equal scores gets advantage exactly 0.
    scores: [B]; group_ids: [B] int. Returns advantages [B] float32 (statistics are taken in float64).
    """
    mean, _, sizes = group_statistics(scores, group_ids)
    _require_groups_of_two(sizes, "RLOO")
    return (sizes / (sizes - 1) * (scores.double() - mean)).float()


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
