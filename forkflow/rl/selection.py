"""Forking-token selection: which response tokens the policy gradient trains on, ranked by the current
policy's entropy (Wang et al., "Beyond the 80/20 Rule", arXiv:2506.01939: the DAPO objective with the
indicator I[H_t ≥ τ_ρ] on each token, τ_ρ the entropy of the batch's top-ρ cut-off; see DESIGN.md §3).

Modes: `top` keeps the k = ceil(ρ·N) highest-entropy response tokens (exact top-k, ties broken so exactly k
are kept), `bottom` keeps the other N − k (the paper's bottom-(1−ρ) control, the exact complement of `top`),
`random` keeps k uniformly at random, `all` keeps every response token. Padding is never selected and no
gradient flows through the mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.distributed as dist

SELECTION_MODES = ("all", "top", "bottom", "random")


def selection_size(num_response_tokens: int, mode: str, ratio: float) -> int:
    """How many of N response tokens `mode` keeps: N (all), k = ceil(ρ·N) (top, random) or N − k (bottom).

    ρ is taken as the decimal it is written as (0.1 means 1/10), so ceil(0.1 · 30) = 3, not the 4 that
    binary floating point would give.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown token selection mode {mode!r}; choose one of {list(SELECTION_MODES)}")
    if mode == "all":
        return num_response_tokens
    if not 0 < ratio <= 1:
        raise ValueError(f"token selection ratio {ratio} must be in (0, 1]; the paper's best is 0.2")
    top_k = math.ceil(Fraction(repr(float(ratio))) * num_response_tokens)
    return num_response_tokens - top_k if mode == "bottom" else top_k


def _select_among(
    entropy: torch.Tensor, mode: str, ratio: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Selection over a flat list of response-token entropies: [N] float → [N] bool."""
    num_tokens = entropy.numel()
    num_kept = selection_size(num_tokens, mode, ratio)  # also validates mode and ratio
    chosen = torch.zeros(num_tokens, dtype=torch.bool, device=entropy.device)
    if mode == "all":
        return ~chosen
    if mode == "random":
        device = generator.device if generator is not None else entropy.device
        chosen[
            torch.randperm(num_tokens, generator=generator, device=device)[:num_kept].to(entropy.device)
        ] = True
        return chosen
    top_k = num_kept if mode == "top" else num_tokens - num_kept
    chosen[torch.topk(entropy, top_k, sorted=False).indices] = True
    return chosen if mode == "top" else ~chosen  # bottom is exactly the complement of top


def _response_entropies(entropy: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The detached entropies of the response tokens, row-major: [B, T] (or any shape) → [N]."""
    if entropy.shape != response_mask.shape:
        raise ValueError(
            f"entropy {tuple(entropy.shape)} and response_mask {tuple(response_mask.shape)} must have the "
            "same shape (one entropy per token position)"
        )
    values = entropy.detach()[response_mask.bool()]
    if not bool(torch.isfinite(values).all()):
        raise ValueError("entropy has NaN or inf at response tokens; check the logits of the update forward")
    return values


def select_tokens(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "top",
    ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Select tokens in one scope (e.g. a micro-batch): entropy [B, T], response_mask [B, T] → bool [B, T].

    Ranks all response tokens of the scope together (pooled over sequences, padding excluded) and keeps
    `selection_size(N, mode, ratio)` of them; see the module docstring for the modes. Works on detached
    entropy, so the mask carries no gradient. `generator` seeds `random`.
    """
    return select_tokens_global([entropy], [response_mask], mode, ratio, generator)[0]


def _gather_across_ranks(local: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, int]:
    """All ranks' [N_r] vectors concatenated in rank order, and where this rank's part starts."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([local.numel()], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    padded = local.new_zeros(max(max(counts), 1))  # all_gather needs equal sizes on every rank
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]), sum(counts[:rank])


def select_tokens_global(
    entropies: Sequence[torch.Tensor],
    response_masks: Sequence[torch.Tensor],
    mode: str = "top",
    ratio: float = 0.2,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
    row_keys: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Select tokens over several micro-batches and, given a process `group`, over all its ranks.

    entropies[i], response_masks[i]: [B_i, T_i] per micro-batch → one bool [B_i, T_i] per micro-batch.
    The response-token entropies of every micro-batch (and every rank, by all-gather; about 4 bytes per
    response token of the whole scope on each rank) are ranked together, so k = ceil(ρ·N) is exact over
    the scope; every rank computes the same selection and keeps its own part. For `random` across ranks,
    seed `generator` identically on every rank. Over one micro-batch and no group this is `select_tokens`.
    row_keys[i] ([B_i] int64, distinct over all ranks) place the rows in one order before ranking, the
    order of a single process holding the whole scope: then ties in `top`/`bottom` and the draw of
    `random` do not depend on how the rows are spread over ranks (8 more bytes per token are gathered).
    """
    if len(entropies) != len(response_masks) or not entropies:
        raise ValueError(
            f"got {len(entropies)} entropy tensors and {len(response_masks)} response masks; "
            "give one of each per micro-batch, at least one"
        )
    local = [_response_entropies(e, m) for e, m in zip(entropies, response_masks, strict=True)]
    if group is None:
        scope, offset = torch.cat(local), 0
    else:
        scope, offset = _gather_across_ranks(torch.cat(local), group)
    if row_keys is None:
        chosen = _select_among(scope, mode, ratio, generator)
    else:  # rank in the order of (row key, position) over the whole scope
        token_keys = torch.cat([
            (keys.to(mask.device)[:, None] * 2**32 + torch.arange(mask.shape[-1], device=mask.device))[mask.bool()]
            for keys, mask in zip(row_keys, response_masks, strict=True)
        ])
        if group is not None:
            token_keys = _gather_across_ranks(token_keys, group)[0]
        order = torch.argsort(token_keys.to(scope.device))
        chosen = torch.empty_like(scope, dtype=torch.bool)
        chosen[order] = _select_among(scope[order], mode, ratio, generator)
    masks = []
    for values, response_mask in zip(local, response_masks, strict=True):
        selected = torch.zeros(response_mask.shape, dtype=torch.bool, device=response_mask.device)
        selected[response_mask.bool()] = chosen[offset : offset + values.numel()].to(selected.device)
        offset += values.numel()
        masks.append(selected)
    return masks


def selection_metrics(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    selected: torch.Tensor,
    clipped: torch.Tensor | None = None,
) -> dict[str, float]:
    """What the selection did, for the step log. All tensors share one shape ([B, T] or flat chunks).

    select/kept_frac          kept / response tokens
    select/threshold          lowest entropy among kept tokens (the top-k cut-off in `top` mode)
    entropy/mean              mean entropy of response tokens
    entropy/selected_mean     ... of kept tokens;  entropy/unselected_mean: of the other response tokens
    select/clipfrac_q1..q5    with `clipped` (from the policy loss): fraction of the loss's tokens (the
                              kept ones, the only ones whose ratio the update computes) whose gradient the
                              clip cut, per entropy quintile of the kept tokens (q1 lowest): in `all` mode
                              the quintiles of every response token, in `top` mode of the forking tokens
    An empty set gives NaN.
    """
    response = response_mask.bool()
    values = entropy.detach().float()[response]  # [N]
    kept = selected.bool()[response]  # [N]
    nan = values.new_tensor(float("nan"))

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean() if x.numel() else nan

    stats = {
        "select/kept_frac": kept.float().sum() / max(values.numel(), 1),
        "select/threshold": values[kept].min() if bool(kept.any()) else nan,
        "entropy/mean": mean(values),
        "entropy/selected_mean": mean(values[kept]),
        "entropy/unselected_mean": mean(values[~kept]),
    }
    if clipped is not None:
        kept_values, kept_clipped = values[kept], clipped.bool()[response][kept].float()
        rank = torch.empty_like(kept_values, dtype=torch.long)
        rank[torch.argsort(kept_values, stable=True)] = torch.arange(kept_values.numel(), device=values.device)
        quintile = rank * 5 // max(kept_values.numel(), 1)
        for q in range(5):
            stats[f"select/clipfrac_q{q + 1}"] = mean(kept_clipped[quintile == q])
    return dict(zip(stats, torch.stack(list(stats.values())).tolist(), strict=True))


def check_loss_saw_selection(mode: str, selected_count: int, loss_token_count: int) -> None:
    """Fail loudly if the loss trained on a different number of tokens than the selection kept.

    The paper's official code once silently ignored the ratio (the loss saw all tokens), so the trainer
    calls this every step with the selection's count and `PolicyLossStats.tokens`.
    """
    if selected_count != loss_token_count:
        raise RuntimeError(
            f"token selection mode {mode!r} kept {selected_count} response tokens, but the policy loss "
            f"trained on {loss_token_count}; the selection mask is not reaching the loss (build the loss "
            "weights with forkflow.rl.loss_weights(selected, response_mask, ...))"
        )
