"""Per-token log-probs and entropies straight from hidden states and the LM head, in row chunks, so that no
[T, V] logits tensor ever exists: peak extra memory is O(chunk × V) in the forward and in the backward.

Rollout scoring, entropy analysis and the RL loss all call `token_logprobs_and_entropy`; the decoding loop
calls `log_normalizer_and_entropy` on its [B, V] last-position logits, so both share one formula.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 1024  # rows; at Qwen3's vocabulary ~0.6 GB of fp32 logits
SCRATCH_ROWS = 32  # rows of the softmax statistics' scratch: ~19 MB at Qwen3's vocabulary, below glibc's mmap threshold


def _log_softmax_(z: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [N, V] scaled logits (fp32 or wider), replaced by log softmax(z); work [n, V] scratch, n <= N ->
    (logsumexp [N], entropy [N]), n rows at a time.

    With m the row's maximum, y = z - m and e = exp(y): lse = m + log Σe, H = -Σ p log p = log Σe - Σ e·y / Σe
    (no large terms cancel) and log p = y - log Σe. All in the caller's storage: on a CPU a fresh [N, V]
    tensor per call costs more in page faults than the arithmetic on it, so the scratch can be a few rows
    that stay in the heap.
    """
    lse, entropy = (z.new_empty(len(z)) for _ in range(2))
    for start in range(0, len(z), len(work)):
        rows = slice(start, start + len(work))
        m = z[rows].amax(-1, keepdim=True)
        y = torch.sub(z[rows], m, out=work[: len(m)])
        e = torch.exp(y, out=z[rows])
        total = e.sum(-1)
        log_total = total.log()
        lse[rows] = m[:, 0] + log_total
        entropy[rows] = log_total - e.mul_(y).sum(-1) / total
        torch.sub(y, log_total[:, None], out=z[rows])
    return lse, entropy.clamp_(min=0.0)  # rounding can leave a peaked row at -1e-7


def log_normalizer_and_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] fp32 or wider (already divided by the temperature) -> (logsumexp [N], entropy [N])."""
    return _log_softmax_(logits.clone(), logits.new_empty(min(len(logits), SCRATCH_ROWS), logits.shape[1]))


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision weights, the weights' own dtype when wider (fp64 in tests)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """hidden [c, H] @ weight [V, H]^T in the weights' dtype (or autocast's), then / temperature, into
    out [c, V] of the statistics' dtype: straight into it when every dtype agrees and no autocast is on."""
    if hidden.dtype == weight.dtype == out.dtype and not torch.is_autocast_enabled(hidden.device.type):
        torch.mm(hidden, weight.t(), out=out)
    else:
        out.copy_(hidden @ weight.t())
    return out.div_(temperature) if temperature != 1.0 else out


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Forward and backward both loop over row chunks, through one [chunk, V] buffer each.

    With z = x / T the scaled logits, p = softmax(z), g and h the upstream gradients of log p(y) and H:
        d log p(y) / d x = (onehot(y) − p) / T,      d H / d x = −p · (log p + H) / T,
    built as g·onehot(y) − p·(g + h·(log p + H)) in the log-probabilities' storage. When all rows fit in one
    chunk and a backward may follow, the forward's [N, V] log-probabilities are kept for it, which then needs no
    LM-head matmul of its own; otherwise only each row's logsumexp and entropy are saved, and the backward
    recomputes one chunk's logits at a time (a second matmul per chunk) instead of keeping [N, V].
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk_size: int, differentiable: bool):
        N = hidden.shape[0]
        dtype = statistics_dtype(weight.dtype)
        logprobs, entropy, lse = (torch.empty(N, dtype=dtype, device=hidden.device) for _ in range(3))
        z = torch.empty(min(N, chunk_size), weight.shape[0], dtype=dtype, device=hidden.device)
        work = z.new_empty(min(len(z), SCRATCH_ROWS), z.shape[1])
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(z[: len(hidden[rows])], hidden[rows], weight, temperature)
            target_logits = logits.gather(1, targets[rows, None])[:, 0]
            lse[rows], entropy[rows] = _log_softmax_(logits, work[: len(logits)])
            logprobs[rows] = target_logits - lse[rows]
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.logp = z if differentiable and N <= chunk_size else None
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
        kept, ctx.logp = ctx.logp, None  # used up in place: a retained graph's next backward recomputes
        z = kept if kept is not None else lse.new_empty(min(hidden.shape[0], ctx.chunk_size), weight.shape[0])
        work = z.new_empty(min(len(z), SCRATCH_ROWS), z.shape[1]) if grad_entropy is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            if kept is not None:
                logp = kept
            else:
                logp = _chunk_logits(z[: len(hidden[rows])], hidden[rows], weight, ctx.temperature)
                logp.sub_(lse[rows, None])
            g = grad_logprobs[rows, None].to(lse.dtype) if grad_logprobs is not None else None
            if grad_entropy is None:  # the common case, in place: -p · g, then + g at the targets
                grad_logits = logp.exp_().mul_(-g)
            else:  # -p · (g + h · (log p + H)), SCRATCH_ROWS rows at a time
                h = grad_entropy[rows, None].to(lse.dtype)
                for sub in range(0, len(logp), len(work)):
                    block = slice(sub, sub + len(work))
                    coef = torch.add(logp[block], entropy[rows][block, None], out=work[: len(logp[block])])
                    coef.mul_(h[block])
                    if g is not None:
                        coef.add_(g[block])
                    logp[block].exp_().mul_(coef).neg_()
                grad_logits = logp
            if g is not None:
                grad_logits.scatter_add_(1, targets[rows, None], g)
            if ctx.temperature != 1.0:
                grad_logits.div_(ctx.temperature)
            grad_logits = grad_logits.to(weight.dtype)
            if want_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if want_weight:  # accumulated in place, in the weight's dtype: no [V, H] temporary per chunk
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
        return grad_hidden, grad_weight, None, None, None, None


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
    softmax statistic in fp32; extra memory is one [min(N, chunk_size), V] fp32 buffer (and a scratch of
    SCRATCH_ROWS rows) in the forward and in the backward, besides the gradients themselves. When the
    result is differentiable and N <= chunk_size the forward's buffer, the log-probabilities, stays until the
    backward, which then skips the recomputing matmul.
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
    differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logprobs, entropy = _ChunkedLogprobEntropy.apply(
        flat_hidden, weight, targets.reshape(-1), float(temperature), chunk_size, differentiable
    )
    return logprobs.view(targets.shape), entropy.view(targets.shape)
