"""Token-entropy statistics of the forking-token paper: percentiles, the share of near-deterministic tokens,
exact top/bottom-ρ position sets, and equal-count buckets by entropy percentile."""

from __future__ import annotations

import math

import torch

PERCENTILES = (50, 80, 90, 95, 99)
NEAR_ZERO = 0.01  # the paper: 50.6 % of Qwen3-8B's CoT tokens on AIME have H below this


def percentile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated percentile by sorting (torch.quantile refuses more than 2^24 values)."""
    ordered = values.sort().values
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def entropy_summary(entropies: torch.Tensor) -> dict:
    """entropies [N] (all tokens pooled) -> percentiles, mean, and the shares the paper reports."""
    if entropies.numel() == 0:
        raise ValueError("no tokens to summarise")
    entropies = entropies.double()
    values = {str(q): percentile(entropies, q) for q in PERCENTILES}
    return {
        "tokens": entropies.numel(),
        "mean": entropies.mean().item(),
        "percentiles": values,
        f"fraction_below_{NEAR_ZERO}": (entropies < NEAR_ZERO).double().mean().item(),
        "fraction_above_p80": (entropies > values["80"]).double().mean().item(),
    }


def top_fraction(values: torch.Tensor, rho: float, largest: bool = True) -> torch.Tensor:
    """Bool mask [N] of the exactly ceil(ρ·N) largest (or smallest) values, by torch.topk."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    k = math.ceil(rho * values.numel())
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.topk(values, k, largest=largest).indices] = True
    return mask


def percentile_buckets(values: torch.Tensor, buckets: int) -> list[torch.Tensor]:
    """Indices of `values` split into `buckets` equal-count groups by rank (lowest first); ties split by
    position, so a mass of zero entropies spreads over the low buckets instead of piling into one."""
    order = torch.argsort(values, stable=True)
    n = len(order)
    return [order[b * n // buckets : (b + 1) * n // buckets] for b in range(buckets)]
