"""State-aware scheduling: forward/backward of a chunked batch with activations kept for at most K chunks.

A long sequence's N dependent chunks run forward in ascending order, each storing its per-layer keys and
values as detached leaves that later chunks attend to; only the last K chunks keep their graphs. Those are
backpropagated in descending order, then the other N - K are recomputed and backpropagated, also
descending, each injecting the gradient its K/V leaves accumulated from every later chunk (DESIGN §4).
Descending order matters: a chunk's leaf gradient is complete only once all later chunks are done.
The padded baseline's micro-batches (`build_micro_batches`) go through the same functions, one right-padded
forward each.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from forkflow.chunkflow.chunks import NO_TARGET, Chunk, chunk_chains
from forkflow.models.qwen3 import BlockKVCache, CausalLMOutput, Qwen3ForCausalLM

# loss_fn(output of the chunk's forward [1, T, ...], chunk) -> SUM of the chunk's per-token losses (a scalar).
# The per-token tensors it needs (targets, loss_weights, token_fields) come aligned on the chunk, and the
# output carries hidden states, lazy logits and router logits; the scheduler divides by the batch-wide
# normaliser, so a loss never averages per chunk.
LossFn = Callable[[CausalLMOutput, Chunk], torch.Tensor]


def next_token_loss(output: CausalLMOutput, chunk: Chunk) -> torch.Tensor:
    """Σ_t w_t · CE(logits_t, target_t) over the chunk (the SFT loss)."""
    # from the hidden states' row rather than `output.logits[0]`: selecting from [1, T, V] logits would make
    # the backward allocate a second full [1, T, V] gradient only to copy the [T, V] one into it
    logits = output.lm_head(output.hidden_states[0])  # [T, V]
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

    Returns the output and the chunk's own per-layer keys and values [1, KV, T, D], attached to its graph
    (none for a padded chunk, which stands alone: `_padded_forward`). The earlier chunks' leaves go to the
    model as blocks, never concatenated (`BlockKVCache`): attention runs over them one by one, so each later
    chunk's gradient lands on (and accumulates in) the leaves' .grad, and no copy of the prefix, of its
    gradient or a [T, P + T] mask is made.
    """
    device = model.lm_head.weight.device
    chunk = chain[index]
    if chunk.padded:
        return _padded_forward(model, chunk), [], []
    prefix = chain[:index]
    layers = range(model.config.num_hidden_layers)
    no_tokens = torch.zeros(0, dtype=torch.long)
    cache = BlockKVCache(
        keys=[[leaves[layer] for leaves in key_leaves[:index]] for layer in layers],  # per layer [1, KV, C, D]...
        values=[[leaves[layer] for leaves in value_leaves[:index]] for layer in layers],
        positions=torch.cat([no_tokens, *(c.position_ids for c in prefix)])[None].to(device),  # [1, P]
        segments=torch.cat([no_tokens, *(c.segment_ids for c in prefix)])[None].to(device),
    )
    output = model(
        chunk.input_ids[None].to(device),  # [1, T]
        position_ids=chunk.position_ids[None].to(device),
        segment_ids=chunk.segment_ids[None].to(device),
        cache=cache,
    )
    return output, [blocks[-1] for blocks in cache.keys], [blocks[-1] for blocks in cache.values]


def _padded_forward(model: Qwen3ForCausalLM, chunk: Chunk) -> CausalLMOutput:
    """A padded chunk's documents as one right-padded [B, L_max] forward with an attention mask; the output's
    hidden states (and router logits) of the real tokens come back as [1, T, ...] in the chunk's order, so a
    loss function cannot tell it from a packed chunk. No K/V is kept: padded chunks stand alone."""
    device = model.lm_head.weight.device
    lengths = torch.tensor([span.stop - span.start for span in chunk.spans])
    real = torch.arange(int(lengths.max()))[None] < lengths[:, None]  # [B, L_max], row-major = chunk order
    input_ids = torch.zeros(real.shape, dtype=torch.long)
    input_ids[real] = chunk.input_ids
    real = real.to(device)
    output = model(input_ids.to(device), attention_mask=real.long())
    router_logits = tuple(r[real.flatten()] for r in output.router_logits)  # [B·L_max, E] -> [T, E]
    return CausalLMOutput(output.hidden_states[real][None], output.lm_head, router_logits)


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


class _LeafStore:
    """The K/V leaves of a chain's recomputed chunks and their gradients, carved from one allocation per
    dtype (leaves) and one more (gradients, zeroed) made at the chain's first chunk.

    Leaves and gradients allocated chunk by chunk are long-lived tensors scattered between the chunks'
    short-lived activations, and they fragment the heap: at 8K tokens with C = 1024 that cost about 17 MB
    of resident memory on top of their own 14 MB (benchmarks/bench_chunkflow.py, glibc malloc).
    """

    def __init__(self, lengths: list[int]):
        self.lengths = lengths  # tokens of each recomputed chunk
        self.stored = self.grads = None  # per chunk: per-layer keys then values [1, KV, T, D]

    def leaves(self, index: int, own: list[torch.Tensor]) -> list[torch.Tensor]:
        """Chunk `index`'s own K/V copied into its buffers, made leaves whose .grad is its zeroed gradient
        buffers (later chunks' gradients accumulate there in place). Call this before any graph saves a
        leaf: the buffers share version counters, and copying bumps them."""
        if self.stored is None:  # the first chunk's K/V tell shapes and dtypes (autocast mixes them)
            specs = [(t.shape[:2] + (T,) + t.shape[3:], t.dtype) for T in self.lengths for t in own]
            self.stored, self.grads = (_carve(specs, own[0].device, zeros) for zeros in (False, True))
        mine = slice(index * len(own), (index + 1) * len(own))
        leaves = self.stored[mine]
        for leaf, grad, t in zip(leaves, self.grads[mine], own, strict=True):
            leaf.copy_(t).requires_grad_()
            leaf.grad = grad
        return leaves


def _carve(specs: list[tuple[torch.Size, torch.dtype]], device, zeros: bool) -> list[torch.Tensor]:
    """Contiguous tensors of the given (shape, dtype), views of one allocation per dtype."""
    out: list = [None] * len(specs)
    for dtype in dict.fromkeys(d for _, d in specs):
        picked = [i for i, (_, d) in enumerate(specs) if d == dtype]
        sizes = [math.prod(specs[i][0]) for i in picked]
        flat = (torch.zeros if zeros else torch.empty)(sum(sizes), dtype=dtype, device=device)
        for i, part in zip(picked, flat.split(sizes), strict=True):
            out[i] = part.view(specs[i][0])
    return out


def _stored_leaves(model, chain, index, key_leaves, value_leaves, store: _LeafStore) -> list[torch.Tensor]:
    """Forward chunk `index` without a graph (it is recomputed for its backward) and keep its per-layer keys
    then values as leaves in `store`; the chunk's output and own K/V die on return."""
    with torch.no_grad():
        _, keys, values = _forward_chunk(model, chain, index, key_leaves, value_leaves)
    return store.leaves(index, keys + values)


def _chain_program(n: int, keep: int) -> list[int]:
    """The units a chain of n chunks runs, in order: 0 is a forward without graph (a chunk whose K/V are
    stored for recompute), j >= 1 is j forwards with graphs followed by their j backwards (j = 1: one
    chunk's forward + backward). A standalone chunk is [1]."""
    j = min(n, keep)
    return [0] * (n - j) + [j] + [1] * (n - j)


def _chain_units(model: Qwen3ForCausalLM, chain: list[Chunk], keep: int, loss_fn: LossFn, normalizer: float,
                 losses: list[float]) -> Iterator[None]:
    """Run the chain's schedule one unit of `_chain_program` per resumption (yields after each unit),
    appending each chunk's scaled loss to `losses`."""
    n = len(chain)
    first_kept = max(n - keep, 0)
    key_leaves: list = [None] * n
    value_leaves: list = [None] * n
    store = _LeafStore([len(c) for c in chain[:first_kept]])
    for i in range(first_kept):  # forward ascending without graphs; the K/V become leaves
        leaves = _stored_leaves(model, chain, i, key_leaves, value_leaves, store)
        key_leaves[i], value_leaves[i] = leaves[: len(leaves) // 2], leaves[len(leaves) // 2 :]
        yield
    kept = {}  # index -> (scaled loss, own keys, own values) of the chunks whose graphs are kept
    for i in range(first_kept, n):  # graphs for the last `keep` chunks; the last one feeds no chunk
        kept[i] = _chunk_loss(model, chain, i, key_leaves, value_leaves, loss_fn, normalizer)
        if i < n - 1:
            leaves = [t.detach().requires_grad_() for t in kept[i][1] + kept[i][2]]  # alive in the graph anyway
            key_leaves[i], value_leaves[i] = leaves[: len(leaves) // 2], leaves[len(leaves) // 2 :]
    for i in reversed(range(n)):  # kept chunks first, then recompute the rest, all descending
        if i in kept:
            loss, keys, values = kept.pop(i)
        else:
            loss, keys, values = _chunk_loss(model, chain, i, key_leaves, value_leaves, loss_fn, normalizer)
        _backward_with_leaf_grads(loss, keys, values, key_leaves[i], value_leaves[i])
        losses.append(loss.item())
        key_leaves[i] = value_leaves[i] = None  # no earlier chunk reads them
        if i <= first_kept:
            yield


def _placeholder_unit(model: Qwen3ForCausalLM, unit: int) -> None:
    """A unit of the given kind on a one-token input whose loss is 0: the same sequence of FSDP collectives
    (all-gathers per forward, reduce-scatters per backward) as a real unit, no gradient."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.lm_head.weight.device)
    if unit == 0:
        with torch.no_grad():
            model(ids)
        return
    losses = [model(ids).hidden_states.sum() * 0.0 for _ in range(unit)]
    for loss in reversed(losses):
        loss.backward()


def lockstep(programs: Sequence[Sequence[int]]) -> list[int]:
    """One sequence of units that contains every rank's program as a subsequence: at each slot, the unit
    that most ranks run next (ties: the smaller unit). Every rank computes the same answer."""
    positions = [0] * len(programs)
    plan = []
    while True:
        upcoming = Counter(p[i] for p, i in zip(programs, positions, strict=True) if i < len(p))
        if not upcoming:
            return plan
        unit = min(upcoming, key=lambda u: (-upcoming[u], u))
        plan.append(unit)
        positions = [i + (i < len(p) and p[i] == unit) for p, i in zip(programs, positions, strict=True)]


def _run_in_lockstep(model, programs: list[list[int]], units: Iterator[None], group) -> None:
    """Run this rank's units (the generator `units`, one resumption per entry of its program) so that all
    ranks of `group` issue the same FSDP collectives in the same order: where another rank's unit has no
    counterpart here, this rank runs a placeholder unit of the same kind."""
    mine = [u for program in programs for u in program]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    position = 0
    # FSDP reshards the root (embedding, norm, LM head) at the end of every backward, but the LM head runs
    # in the loss, outside the root's forward, so a unit's second pending graph would backpropagate through
    # freed weights; the root stays gathered until the schedule ends
    model.set_reshard_after_backward(False, recurse=False)
    try:
        for unit in lockstep(everyone):
            if position < len(mine) and mine[position] == unit:
                next(units)
                position += 1
            else:
                _placeholder_unit(model, unit)
    finally:
        model.set_reshard_after_backward(True, recurse=False)
        model.reshard()


def chunked_backward(
    model: Qwen3ForCausalLM,
    chunks: Sequence[Chunk],
    keep: int = 1,
    loss_fn: LossFn = next_token_loss,
    normalizer: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> float:
    """Accumulate into the parameters' .grad the gradient of Σ_chunks loss_fn(chunk) / normalizer.

    keep: K, the number of chunks of one long sequence whose activations stay in memory at once.
    normalizer: defaults to the batch's total loss weight (summed next-token cross-entropy / number of
    targets); pass the global count when `chunks` is one rank's share of a larger batch.
    group: the ranks of an FSDP-sharded model. Every forward and backward of a sharded model is a collective,
    so the ranks, whose shares differ in chunks and chain lengths, run their schedules in lockstep
    (`lockstep`), padding with one-token placeholder units; a rank may have no chunks at all.
    Returns the loss (this call's share of it) as a float.
    """
    if keep < 1:
        raise ValueError(f"keep (K) must be >= 1, got {keep}")
    normalizer = total_loss_weight(chunks) if normalizer is None else normalizer
    if normalizer <= 0:
        raise ValueError("the batch has no loss tokens (all loss weights are 0); nothing to train on")
    chains = chunk_chains(chunks)
    losses: list[float] = []
    units = (None for chain in chains for _ in _chain_units(model, chain, keep, loss_fn, normalizer, losses))
    if group is None:
        for _ in units:
            pass
    else:
        _run_in_lockstep(model, [_chain_program(len(chain), keep) for chain in chains], units, group)
    return float(sum(losses))


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
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Forward every chunk without gradient (dependent chunks in order, on the K/V of the ones before) and
    gather fn(output, chunk) -> [T, ...] per sequence: a list of [L, ...] in the batch's sequence order.
    Memory stays at one chunk's activations plus the K/V of the longest sequence. group: as in
    `chunked_backward` (the ranks of a sharded model run the same number of forwards)."""
    lengths: dict[int, int] = {}
    pieces = []

    def forwards():
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
                yield

    if group is None:
        for _ in forwards():
            pass
    else:
        _run_in_lockstep(model, [[0] * len(chunks)], forwards(), group)
    count = max(lengths, default=-1) + 1 if num_sequences is None else num_sequences
    return unchunk(pieces, [lengths.get(i, 0) for i in range(count)])
