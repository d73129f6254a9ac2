"""The policy loss: PPO's clipped surrogate with clip-higher and dual clip, optional KL to a reference and
entropy bonus, aggregated over tokens in a form a chunked trainer can sum piece by piece.

How to use it. (1) Once per mini-batch, `loss_weights(selected, response_mask, aggregation, denominator)`
turns the [B, T] masks into a per-token weight w_t and a global normaliser Z such that every aggregation
mode reads L = Σ_t w_t ℓ_t / Z. (2) For each micro-batch or ChunkFlow chunk, pack w like any other
per-token tensor ([B, T] or a flat [N] chunk, any shape) and call `ppo_policy_loss`, which returns the SUM
Σ_t w_t ℓ_t over that piece; backpropagate `loss_sum / Z`. The pieces add up to exactly L, however the
tokens are split. Statistics come back as sums too (`PolicyLossStats`): add them over pieces, then call
`.metrics()`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
DENOMINATORS = ("selected", "all")
LOG_RATIO_LIMIT = 20.0  # |log π/π_old| and |log π_ref/π| are clamped here so exp() never overflows


def loss_weights(
    selected: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: str = "token-mean",
    denominator: str = "selected",
    norm_length: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights w [B, T] and normaliser Z (scalar) with L = Σ_t w_t ℓ_t / Z.

    selected, response_mask: [B, T] bool, one row per sequence; only selected response tokens get w ≠ 0.
    S_s = selected tokens of sequence s; D_s = the tokens counted in the denominator, S_s (`selected`,
    the paper's official code and v2) or all response tokens of s (`all`, as TRL: a ≈ρ× smaller gradient);
    Q = the sequences with D_s non-empty.

      token-mean               L = Σ_s Σ_{t∈S_s} ℓ_t / Σ_s |D_s|            (DAPO §3.3, token-level loss)
      seq-mean-token-mean      L = 1/|Q| Σ_{s∈Q} 1/|D_s| Σ_{t∈S_s} ℓ_t        (GRPO, arXiv:2402.03300 eq. 3)
      seq-mean-token-sum-norm  L = 1/(|Q|·L_norm) Σ_s Σ_{t∈S_s} ℓ_t          (Dr.GRPO, arXiv:2503.20783)

    L_norm is `norm_length`, a constant such as the maximum response length (default T). Unlike verl's
    mode of the same name, the last line divides by |Q| too, as in the Dr.GRPO objective, so the loss does
    not grow with the batch size. With `group`, the counts in Z are summed over its ranks (each rank's Z is
    then the global one). Z is at least 1 (an empty selection gives a zero loss, not NaN). Pass the masks of
    the whole scope the loss averages over (the mini-batch), then split w with the batch.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; choose one of {list(AGGREGATIONS)}")
    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown loss denominator {denominator!r}; choose one of {list(DENOMINATORS)}")
    if selected.shape != response_mask.shape or selected.dim() != 2:
        raise ValueError(
            f"selected {tuple(selected.shape)} and response_mask {tuple(response_mask.shape)} must both be "
            "[B, T] with one row per sequence (build the weights before packing into chunks)"
        )
    response = response_mask.bool()
    selected = selected.bool() & response  # padding never enters the loss
    counted = (selected if denominator == "selected" else response).float()
    weights = selected.float()  # [B, T]
    if aggregation == "token-mean":
        count = counted.sum()
    else:
        tokens_per_sequence = counted.sum(dim=-1, keepdim=True)  # [B, 1]
        count = (tokens_per_sequence > 0).float().sum()
        if aggregation == "seq-mean-token-mean":
            weights = weights / tokens_per_sequence.clamp(min=1)
    if group is not None:
        dist.all_reduce(count, group=group)
    normaliser = count.clamp(min=1)
    if aggregation == "seq-mean-token-sum-norm":
        normaliser = normaliser * (norm_length if norm_length is not None else response.shape[-1])
    return weights, normaliser


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimate of KL(π‖π_ref) per token: log π − log π_ref (Schulman, "Approximating KL divergence")."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(π‖π_ref) per token: e^d − d − 1 with d = log π_ref − log π; unbiased and ≥ 0
    (Schulman, "Approximating KL divergence"; the GRPO KL term, arXiv:2402.03300 eq. 4)."""
    log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return log_ratio.exp() - log_ratio - 1


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


@dataclass
class PolicyLossStats:
    """Sums over the tokens in the loss (w ≠ 0) of one piece; add pieces with `+`, then call `metrics()`."""

    tokens: torch.Tensor  # tokens with w ≠ 0 (what `check_loss_saw_selection` compares)
    clipped: torch.Tensor  # tokens whose gradient the ε clip cut (ratio outside [1−ε_low, 1+ε_high])
    dual_clipped: torch.Tensor  # tokens with A < 0 whose gradient the dual clip cut (ratio > c)
    approx_kl: torch.Tensor  # Σ (log π_old − log π): k1 estimate of KL(π_old‖π), how far the update moved
    ref_kl: torch.Tensor  # Σ of the KL-to-reference estimate (0 when the KL term is off)

    def __add__(self, other: PolicyLossStats) -> PolicyLossStats:
        return PolicyLossStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @classmethod
    def zeros(cls) -> PolicyLossStats:
        return cls(*(torch.zeros((), dtype=torch.float64) for _ in fields(cls)))

    def to(self, device) -> PolicyLossStats:
        return PolicyLossStats(*(getattr(self, f.name).to(device) for f in fields(self)))

    def metrics(self) -> dict[str, float]:
        """pg/clipfrac, pg/clipfrac_dual, pg/approx_kl, pg/ref_kl as means over the loss tokens."""
        sums = torch.stack([self.clipped, self.dual_clipped, self.approx_kl, self.ref_kl])
        means = (sums / self.tokens.clamp(min=1)).tolist()
        return dict(zip(["pg/clipfrac", "pg/clipfrac_dual", "pg/approx_kl", "pg/ref_kl"], means, strict=True))


@dataclass
class PolicyLoss:
    """What `ppo_policy_loss` returns for one piece of the batch."""

    loss_sum: torch.Tensor  # scalar Σ_t w_t ℓ_t with gradient; backpropagate loss_sum / Z
    clipped: torch.Tensor  # bool, the inputs' shape: a clip (ε or dual) cut this token's gradient
    stats: PolicyLossStats


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_dual: float | None = 10.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    tis_weights: torch.Tensor | None = None,
) -> PolicyLoss:
    """Σ_t w_t ℓ_t of the per-token PPO loss with DAPO's clip-higher and dual clip, over a piece of any shape.

    All per-token tensors share one shape ([B, T] or a flat [N] chunk); advantages are per token (broadcast
    the per-sequence advantage first). With r_t = π(o_t)/π_old(o_t) and A_t the advantage:

        ℓ_clip = max(−A r, −A clip(r, 1−ε_low, 1+ε_high))    PPO (arXiv:1707.06347 eq. 7), negated;
                                                             ε_low ≠ ε_high is DAPO clip-higher (§3.1)
        ℓ_pg   = min(ℓ_clip, −c A)  if A < 0 else ℓ_clip      dual clip (Ye et al., arXiv:1912.09729),
                                                             on negative advantages only, as in verl
        ℓ      = ℓ_pg + β · KL_t(π‖π_ref) − α · H_t          β = kl_coef (k1 or k3), α = entropy_coef

    With `tis_weights` (truncated importance sampling, Yao et al. 2025 as verl's TIS: per token
    min(π_old(o_t) / π_rollout(o_t), C), no gradient) ℓ_pg is multiplied by them: the correction for
    sampling with a rollout engine whose probabilities differ from the trainer's (vLLM kernels, bf16).
    The KL and entropy terms (both off by default, as in DAPO) use the same weights as the policy term.
    `entropy` is the per-token entropy with its graph, needed only when entropy_coef ≠ 0. Positions with
    w = 0 (padding) must still hold finite values (0 will do): a NaN there would reach the gradient.
    """
    pieces = {"old_logprobs": old_logprobs, "advantages": advantages, "weights": weights}
    if ref_logprobs is not None:
        pieces["ref_logprobs"] = ref_logprobs
    if entropy is not None:
        pieces["entropy"] = entropy
    if tis_weights is not None:
        pieces["tis_weights"] = tis_weights
    for name, tensor in pieces.items():
        if tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but logprobs has {tuple(logprobs.shape)}; every "
                "per-token input must have the same shape (expand per-sequence advantages over tokens)"
            )
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(
            f"clip_low {clip_low} must be in [0, 1) and clip_high {clip_high} >= 0 (DAPO: 0.2, 0.28)"
        )
    if clip_dual is not None and clip_dual <= 1 + clip_high:
        raise ValueError(
            f"dual clip c = {clip_dual} must exceed 1 + clip_high = {1 + clip_high} (DAPO uses 10)"
        )
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef is set but ref_logprobs is None; pass the reference policy's log-probs")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef is set but entropy is None; pass the per-token entropy with its graph")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")

    dtype = torch.promote_types(logprobs.dtype, torch.float32)  # bf16 in, float32 math; float64 stays
    logprobs, old_logprobs, advantages, weights = (
        t.to(dtype) for t in (logprobs, old_logprobs, advantages, weights)
    )
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    token_loss = torch.maximum(unclipped_loss, clipped_loss)
    eps_clipped = clipped_loss > unclipped_loss
    if clip_dual is None:
        dual_clipped = torch.zeros_like(eps_clipped)
    else:
        dual_loss = -advantages * clip_dual
        dual_clipped = (advantages < 0) & (token_loss > dual_loss)
        token_loss = torch.where(dual_clipped, dual_loss, token_loss)
    if tis_weights is not None:
        token_loss = token_loss * tis_weights.to(dtype)

    ref_kl = torch.zeros_like(token_loss)
    if ref_logprobs is not None:
        ref_kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs.to(dtype))
        token_loss = token_loss + kl_coef * ref_kl
    if entropy_coef != 0:
        token_loss = token_loss - entropy_coef * entropy.to(dtype)

    in_loss = (weights != 0).float()
    stats = PolicyLossStats(
        tokens=in_loss.sum(),
        clipped=(eps_clipped.float() * in_loss).sum(),
        dual_clipped=(dual_clipped.float() * in_loss).sum(),
        approx_kl=(-log_ratio.detach() * in_loss).sum(),
        ref_kl=(ref_kl.detach() * in_loss).sum(),
    )
    return PolicyLoss(loss_sum=(weights * token_loss).sum(), clipped=eps_clipped | dual_clipped, stats=stats)
