"""State-aware scheduling: forward/backward of a chunked batch with activations kept for at most K chunks.

A long sequence's N dependent chunks run forward in ascending order, each storing its per-layer keys and
values as detached leaves that later chunks attend to; only the last K chunks keep their graphs. Those are
backpropagated in descending order, then the other N - K are recomputed and backpropagated, also
descending, each injecting the gradient its K/V leaves accumulated from every later chunk (DESIGN §4).
Descending order matters: a chunk's leaf gradient is complete only once all later chunks are done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from forkflow.chunkflow.chunks import NO_TARGET, Chunk, chunk_chains
from forkflow.models.qwen3 import CausalLMOutput, KVCache, Qwen3ForCausalLM

# loss_fn(output of the chunk's forward [1, T, ...], chunk) -> SUM of the chunk's per-token losses (a scalar).
# The per-token tensors it needs (targets, loss_weights, token_fields) come aligned on the chunk, and the
# output carries hidden states, lazy logits and router logits; the scheduler divides by the batch-wide
# normaliser, so a loss never averages per chunk.
LossFn = Callable[[CausalLMOutput, Chunk], torch.Tensor]


def next_token_loss(output: CausalLMOutput, chunk: Chunk) -> torch.Tensor:
    """Σ_t w_t · CE(logits_t, target_t) over the chunk (the SFT loss)."""
    logits = output.logits[0]  # [T, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = chunk.targets.to(logits.device)
    ce = F.cross_entropy(logits, targets, ignore_index=NO_TARGET, reduction="none")  # [T]
    return (ce * chunk.loss_weights.to(logits.device)).sum()


def total_loss_weight(chunks: Sequence[Chunk]) -> float:
    """The default normaliser: the batch's summed loss weights (its number of targets for 0/1 weights)."""
    return float(sum(c.loss_weights.sum() for c in chunks))


def _forward_chunk(
    model: Qwen3ForCausalLM,
    chain: list[Chunk],
    index: int,
    key_leaves: list[list[torch.Tensor]],
    value_leaves: list[list[torch.Tensor]],
) -> tuple[CausalLMOutput, list[torch.Tensor], list[torch.Tensor]]:
    """Forward chunk `index` of `chain` on top of the per-layer K/V of the chunks before it.

    Returns the output and the chunk's own per-layer keys and values [1, KV, T, D], attached to its graph.
    The prefix is concatenated from the leaf tensors on every call, so each later chunk's gradient lands on
    (and accumulates in) the leaves' .grad.
    """
    device = model.lm_head.weight.device
    chunk = chain[index]
    cache = model.new_cache(1)
    prefix = chain[:index]
    if prefix:
        cache = KVCache(
            keys=[torch.cat(layer, dim=2) for layer in zip(*key_leaves[:index], strict=True)],
            values=[torch.cat(layer, dim=2) for layer in zip(*value_leaves[:index], strict=True)],
            positions=torch.cat([c.position_ids for c in prefix])[None].to(device),  # [1, P]
            segments=torch.cat([c.segment_ids for c in prefix])[None].to(device),
        )
    P = len(cache)
    output = model(
        chunk.input_ids[None].to(device),  # [1, T]
        position_ids=chunk.position_ids[None].to(device),
        segment_ids=chunk.segment_ids[None].to(device),
        cache=cache,
    )
    return output, [k[:, :, P:] for k in cache.keys], [v[:, :, P:] for v in cache.values]


def _chunk_loss(model, chain, index, key_leaves, value_leaves, loss_fn: LossFn, normalizer: float):
    """(loss_fn(chunk) / normalizer, own keys, own values); the output (logits...) is dropped on return."""
    output, keys, values = _forward_chunk(model, chain, index, key_leaves, value_leaves)
    return loss_fn(output, chain[index]) / normalizer, keys, values


def _backward_with_leaf_grads(loss, keys, values, key_leaves: list | None, value_leaves: list | None) -> None:
    """Backpropagate a chunk's loss plus the gradient later chunks sent to its K/V leaves."""
    outputs, grads = [loss], [None]
    if key_leaves is not None:
        for own, leaf in zip(keys + values, key_leaves + value_leaves, strict=True):
            if leaf.grad is not None:
                outputs.append(own)
                grads.append(leaf.grad)
    torch.autograd.backward(outputs, grads)


def _backward_chain(
    model: Qwen3ForCausalLM, chain: list[Chunk], keep: int, loss_fn: LossFn, normalizer: float
) -> float:
    n = len(chain)
    first_kept = max(n - keep, 0)
    key_leaves: list = [None] * n
    value_leaves: list = [None] * n
    kept = {}  # index -> (scaled loss, own keys, own values) of the chunks whose graphs are kept
    for i in range(n):  # forward ascending; graphs only for the last `keep` chunks
        if i >= first_kept:
            kept[i] = _chunk_loss(model, chain, i, key_leaves, value_leaves, loss_fn, normalizer)
            keys, values = kept[i][1:]
        else:
            with torch.no_grad():  # only the K/V are needed now; the chunk is recomputed for its backward
                _, keys, values = _forward_chunk(model, chain, i, key_leaves, value_leaves)
        if i < n - 1:  # the last chunk's K/V feed no later chunk
            key_leaves[i] = [k.detach().requires_grad_() for k in keys]
            value_leaves[i] = [v.detach().requires_grad_() for v in values]
    total = 0.0
    for i in reversed(range(n)):  # kept chunks first, then recompute the rest, all descending
        if i in kept:
            loss, keys, values = kept.pop(i)
        else:
            loss, keys, values = _chunk_loss(model, chain, i, key_leaves, value_leaves, loss_fn, normalizer)
        _backward_with_leaf_grads(loss, keys, values, key_leaves[i], value_leaves[i])
        total += loss.item()
        key_leaves[i] = value_leaves[i] = None  # no earlier chunk reads them
    return total


def chunked_backward(
    model: Qwen3ForCausalLM,
    chunks: Sequence[Chunk],
    keep: int = 1,
    loss_fn: LossFn = next_token_loss,
    normalizer: float | None = None,
) -> float:
    """Accumulate into the parameters' .grad the gradient of Σ_chunks loss_fn(chunk) / normalizer.

    keep: K, the number of chunks of one long sequence whose activations stay in memory at once.
    normalizer: defaults to the batch's total loss weight (summed next-token cross-entropy / number of
    targets); pass the global count when `chunks` is one rank's share of a larger batch.
    Returns the loss (this call's share of it) as a float.
    """
    if keep < 1:
        raise ValueError(f"keep (K) must be >= 1, got {keep}")
    normalizer = total_loss_weight(chunks) if normalizer is None else normalizer
    if normalizer <= 0:
        raise ValueError("the batch has no loss tokens (all loss weights are 0); nothing to train on")
    chains = chunk_chains(chunks)
    return float(sum(_backward_chain(model, chain, keep, loss_fn, normalizer) for chain in chains))


def unchunk(pieces: Iterable[tuple[Chunk, torch.Tensor]], lengths: Sequence[int]) -> list[torch.Tensor]:
    """(chunk, values [T, ...] aligned with the chunk) pairs -> per sequence [L, ...], entry t for position t.
    Positions no piece covers stay 0."""
    out: list = [None] * len(lengths)
    for chunk, values in pieces:
        offset = 0
        for span in chunk.spans:
            n = span.stop - span.start
            if out[span.sequence] is None:
                out[span.sequence] = values.new_zeros((lengths[span.sequence], *values.shape[1:]))
            out[span.sequence][span.start : span.stop] = values[offset : offset + n]
            offset += n
    return out


@torch.no_grad()
def chunked_forward(
    model: Qwen3ForCausalLM,
    chunks: Sequence[Chunk],
    fn: Callable[[CausalLMOutput, Chunk], torch.Tensor],
    num_sequences: int | None = None,
) -> list[torch.Tensor]:
    """Forward every chunk without gradient (dependent chunks in order, on the K/V of the ones before) and
    gather fn(output, chunk) -> [T, ...] per sequence: a list of [L, ...] in the batch's sequence order.
    Memory stays at one chunk's activations plus the K/V of the longest sequence."""
    lengths: dict[int, int] = {}
    pieces = []
    for chain in chunk_chains(chunks):
        keys: list[list[torch.Tensor]] = []
        values: list[list[torch.Tensor]] = []
        for i, chunk in enumerate(chain):
            output, own_keys, own_values = _forward_chunk(model, chain, i, keys, values)
            keys.append(own_keys)
            values.append(own_values)
            pieces.append((chunk, fn(output, chunk)))
            del output  # free this chunk's activations before the next forward
            for span in chunk.spans:
                lengths[span.sequence] = max(lengths.get(span.sequence, 0), span.stop)
    count = max(lengths, default=-1) + 1 if num_sequences is None else num_sequences
    return unchunk(pieces, [lengths.get(i, 0) for i in range(count)])
