"""Per-token log-probs and entropies straight from hidden states and the LM head, in row chunks, so that no
[T, V] logits tensor ever exists: peak extra memory is O(chunk × V) in the forward and in the backward.

Rollout scoring, entropy analysis and the RL loss all call `token_logprobs_and_entropy`; the decoding loop
calls `log_normalizer_and_entropy` on its [B, V] last-position logits, so both share one formula.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 1024  # rows; at Qwen3's vocabulary ~1.2 GB of fp32 temporaries


def log_normalizer_and_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] fp32 or wider (already divided by the temperature) -> (logsumexp [N], entropy [N]).

    log p(v) = logits[v] - logsumexp; H = -Σ p log p = logsumexp - Σ p · logits.
    """
    lse = torch.logsumexp(logits, dim=-1)
    probs = (logits - lse[:, None]).exp_()
    entropy = lse - probs.mul_(logits).sum(-1)  # in place: one [N, V] temporary besides the logits
    return lse, entropy.clamp_(min=0.0)  # rounding can leave a peaked row at -1e-7


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision weights, the weights' own dtype when wider (fp64 in tests)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """hidden [c, H] @ weight [V, H]^T in the weights' dtype, then / temperature in the statistics' dtype."""
    logits = (hidden @ weight.t()).to(statistics_dtype(weight.dtype))
    return logits.div_(temperature) if temperature != 1.0 else logits


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Forward and backward both loop over row chunks; only each row's logsumexp and entropy are saved.

    With z = x / T the scaled logits, p = softmax(z), g and h the upstream gradients of log p(y) and H:
        d log p(y) / d x = (onehot(y) − p) / T,      d H / d x = −p · (log p + H) / T,
    so the backward recomputes one chunk's logits at a time (a second LM-head matmul per chunk) instead of
    keeping [T, V] probabilities, and builds g·onehot(y) − p·(g + h·(log p + H)) in the logits' storage.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk_size: int):
        N = hidden.shape[0]
        dtype = statistics_dtype(weight.dtype)
        logprobs, entropy, lse = (torch.empty(N, dtype=dtype, device=hidden.device) for _ in range(3))
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows], weight, temperature)
            lse[rows], entropy[rows] = log_normalizer_and_entropy(logits)
            logprobs[rows] = logits.gather(1, targets[rows, None])[:, 0] - lse[rows]
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)  # an output nobody differentiates arrives as None: no work for it
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logp = _chunk_logits(hidden[rows], weight, ctx.temperature).sub_(lse[rows, None])
            g = grad_logprobs[rows, None].to(lse.dtype) if grad_logprobs is not None else None
            if grad_entropy is None:  # the common case, in place: -p · g, then + g at the targets
                grad_logits = logp.exp_().mul_(-g)
            else:
                coef = logp.add(entropy[rows, None]).mul_(grad_entropy[rows, None].to(lse.dtype))
                if g is not None:
                    coef.add_(g)
                grad_logits = logp.exp_().mul_(coef).neg_()
            if g is not None:
                grad_logits.scatter_add_(1, targets[rows, None], g)
            if ctx.temperature != 1.0:
                grad_logits.div_(ctx.temperature)
            grad_logits = grad_logits.to(weight.dtype)
            if want_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if want_weight:  # accumulated in place, in the weight's dtype: no [V, H] temporary per chunk
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
        return grad_hidden, grad_weight, None, None, None


def token_logprobs_and_entropy(
    hidden: torch.Tensor,  # [N, H] or [B, T, H]
    weight: torch.Tensor,  # [V, H], the LM head
    targets: torch.Tensor,  # [N] or [B, T] token ids
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden · Wᵀ / T)[target] and the entropy of softmax(hidden · Wᵀ / T), per row.

    Returns (logprobs, entropy) shaped like `targets`, in fp32 (fp64 for fp64 weights). Both are
    differentiable with respect to `hidden` and `weight` (the entropy for an entropy bonus; selection uses
    it detached). Logits are computed chunk by chunk in the weights' dtype and every
    softmax statistic in fp32; peak extra memory is about 2 · chunk_size · V fp32 values, besides the
    gradients themselves.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on the rows"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} does not match the LM head weight {tuple(weight.shape)}"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    logprobs, entropy = _ChunkedLogprobEntropy.apply(
        flat_hidden, weight, targets.reshape(-1), float(temperature), chunk_size
    )
    return logprobs.view(targets.shape), entropy.view(targets.shape)
