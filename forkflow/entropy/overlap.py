"""Two models' entropies over the same tokens: overlap of their top-ρ positions, and the mean entropy change
per 5 %-percentile bucket of the first model's entropy (the paper's Fig. 5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forkflow.entropy.stats import percentile_buckets, top_fraction


def top_overlap(entropies_a: torch.Tensor, entropies_b: torch.Tensor, rho: float) -> float:
    """|S_A ∩ S_B| / |S_A|, S_X the top-ρ positions by X's entropy (same size for both)."""
    if entropies_a.shape != entropies_b.shape:
        raise ValueError(f"entropies cover {entropies_a.numel()} and {entropies_b.numel()} tokens")
    a, b = top_fraction(entropies_a, rho), top_fraction(entropies_b, rho)
    return (a & b).sum().item() / a.sum().item()


@dataclass
class BucketChange:
    low_percentile: float
    high_percentile: float
    tokens: int
    mean_entropy_a: float
    mean_change: float  # mean of H_B - H_A over the bucket's positions


def entropy_change_by_bucket(
    entropies_a: torch.Tensor, entropies_b: torch.Tensor, buckets: int = 20
) -> list[BucketChange]:
    """Buckets are equal-count groups of positions ranked by A's entropy (lowest first)."""
    a, change = entropies_a.double(), entropies_b.double() - entropies_a.double()
    return [
        BucketChange(
            100 * b / buckets,
            100 * (b + 1) / buckets,
            len(index),
            a[index].mean().item() if len(index) else float("nan"),
            change[index].mean().item() if len(index) else float("nan"),
        )
        for b, index in enumerate(percentile_buckets(a, buckets))
    ]
