"""DAPO's reward-side pieces (Yu et al., arXiv:2503.14476): the dynamic-sampling group filter and overlong
reward shaping. Clip-higher and the token-level loss live in `forkflow.rl.losses`."""

from __future__ import annotations

import torch

from forkflow.rl.advantages import group_statistics


def dynamic_sampling_mask(correct: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Which responses to keep under DAPO dynamic sampling (§3.2: 0 < |{o_i correct}| < G per group).

    A group is kept when its correctness has non-zero spread, i.e. it holds both correct and incorrect
    responses; groups that are all right or all wrong give GRPO zero advantage and only dilute the batch.
    Pass correctness *before* overlong shaping, so a length penalty never makes a uniform group look mixed.
    A group of one has no spread and is dropped.

    correct: [B] bool (or 0/1, for which the spread is exact); group_ids: [B] int. Returns keep [B] bool.
    """
    _, std, _ = group_statistics(correct.float(), group_ids)
    return std > 0


def overlong_penalty(
    lengths: torch.Tensor, max_length: int, buffer_length: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment R_length (§3.4), added to the score of each response:

        R_len(y) = 0                                        |y| ≤ L_max − L_buf
                 = ((L_max − L_buf) − |y|) / L_buf · factor  L_max − L_buf < |y| ≤ L_max
                 = −factor                                   |y| > L_max

    i.e. min(−(|y| − (L_max − L_buf)) / L_buf · factor, 0) clamped at −factor. verl's DAPO reward manager
    computes the unclamped middle line; its lengths never exceed L_max (generation stops there), where the
    line reaches −factor, so both agree on every length verl can see.

    lengths: [B] response lengths in tokens. Returns penalties [B] float, each in [−factor, 0].
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(
            f"overlong buffer_length {buffer_length} must be in (0, max_length={max_length}]; "
            "DAPO uses max_length 20480 with buffer_length 4096"
        )
    if factor < 0:
        raise ValueError(f"overlong penalty factor {factor} must be >= 0 (it is the size of the penalty)")
    excess = lengths.float() - (max_length - buffer_length)
    return (-excess / buffer_length * factor).clamp(min=-factor, max=0.0)
