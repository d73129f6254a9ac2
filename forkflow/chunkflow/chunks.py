"""Chunk construction: a global batch of sequences becomes chunks of at most C tokens (DESIGN §4).

Sequences longer than C are split into consecutive dependent chunks; the others are bin-packed (first-fit
decreasing) into standalone chunks. Labels are shifted at the sequence level before splitting, so a
chunk's last token predicts the next chunk's first token. The baseline ChunkFlow is compared with, padded
micro-batches of whole sequences, is built here too (`build_micro_batches`), as chunks that the schedule
runs as right-padded batches, so that one loss function serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

NO_TARGET = -100  # target of a sequence's last token (nothing follows it); its loss weight is 0


class Span(NamedTuple):
    """Tokens [start, stop) of batch sequence `sequence`: one document of a chunk."""

    sequence: int
    start: int
    stop: int


@dataclass
class Chunk:
    """At most C tokens run as one [1, T] forward: packed whole sequences, or one piece of a long one; or, with
    `padded`, whole sequences run as one right-padded [B, L_max] forward (`build_micro_batches`).

    Per-token tensors are aligned with `targets`: entry t describes the token predicted at position t
    (loss weight, and any `token_fields` such as advantages or old log-probs). A padded chunk's tensors are
    the same concatenation of its sequences, padding excluded: the forward's output comes back in that order.
    """

    input_ids: torch.Tensor  # [T] long
    position_ids: torch.Tensor  # [T] restart at 0 per packed document, continue across dependent chunks
    segment_ids: torch.Tensor  # [T] index of the token's document within the chunk
    targets: torch.Tensor  # [T] long, next token of the sequence or NO_TARGET
    loss_weights: torch.Tensor  # [T] float
    token_fields: dict[str, torch.Tensor]  # name -> [T, ...]
    spans: tuple[Span, ...]  # the documents, in order; a dependent chunk has exactly one
    part: int = 0  # index of this chunk among its sequence's chunks
    num_parts: int = 1  # 1: standalone; > 1: one of the dependent chunks of a long sequence
    padded: bool = False  # run as a right-padded batch of its documents (one row each), not one packed row

    @property
    def dependent(self) -> bool:
        return self.num_parts > 1

    @property
    def sequence(self) -> int:
        """The batch index of a dependent chunk's sequence (chunks sharing it form one chain)."""
        return self.spans[0].sequence

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose totals are <= capacity, longest first into the first bin
    with room (ties by index, so the result is deterministic)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclass
class _ShiftedSequence:
    input_ids: torch.Tensor  # [L]
    targets: torch.Tensor  # [L]
    loss_weights: torch.Tensor  # [L]
    token_fields: dict[str, torch.Tensor]  # name -> [L, ...]


def _shift(ids: torch.Tensor, weights: torch.Tensor, fields: dict[str, torch.Tensor]) -> _ShiftedSequence:
    """Position t gets token t+1's target, weight and fields; the last position gets none."""
    targets = torch.cat([ids[1:], ids.new_full((1,), NO_TARGET)])
    shifted_weights = torch.cat([weights[1:], weights.new_zeros(1)])
    shifted_fields = {k: torch.cat([v[1:], v.new_zeros((1, *v.shape[1:]))]) for k, v in fields.items()}
    return _ShiftedSequence(ids, targets, shifted_weights, shifted_fields)


def _make_chunk(spans: list[Span], shifted: list[_ShiftedSequence], part: int = 0, num_parts: int = 1,
                padded: bool = False):
    def gather(get) -> torch.Tensor:
        return torch.cat([get(shifted[s.sequence])[s.start : s.stop] for s in spans])

    return Chunk(
        input_ids=gather(lambda q: q.input_ids),
        position_ids=torch.cat([torch.arange(s.start, s.stop) for s in spans]),
        segment_ids=torch.cat([torch.full((s.stop - s.start,), d) for d, s in enumerate(spans)]),
        targets=gather(lambda q: q.targets),
        loss_weights=gather(lambda q: q.loss_weights),
        token_fields={k: gather(lambda q, k=k: q.token_fields[k]) for k in shifted[0].token_fields},
        spans=tuple(spans),
        part=part,
        num_parts=num_parts,
        padded=padded,
    )


def _shifted_sequences(
    sequences: Sequence[Sequence[int] | torch.Tensor],
    loss_weights: Sequence[Sequence[float] | torch.Tensor] | None,
    token_fields: dict[str, Sequence[torch.Tensor]] | None,
) -> list[_ShiftedSequence]:
    """Each sequence with its targets, weights and fields shifted (see `build_chunks`), inputs checked."""
    token_fields = token_fields or {}
    shifted = []
    for i, seq in enumerate(sequences):
        ids = torch.as_tensor(seq, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError(f"sequence {i} is empty")
        weights = torch.ones(len(ids)) if loss_weights is None else torch.as_tensor(loss_weights[i])
        weights = weights if weights.is_floating_point() else weights.float()
        fields = {name: torch.as_tensor(values[i]) for name, values in token_fields.items()}
        for name, t in [("loss_weights", weights), *fields.items()]:
            if t.shape[:1] != ids.shape:
                entries = t.shape[0] if t.dim() else 0
                raise ValueError(f"sequence {i}: {name} has {entries} entries for {len(ids)} tokens")
        shifted.append(_shift(ids, weights, fields))
    return shifted


def build_chunks(
    sequences: Sequence[Sequence[int] | torch.Tensor],
    chunk_size: int,
    loss_weights: Sequence[Sequence[float] | torch.Tensor] | None = None,
    token_fields: dict[str, Sequence[torch.Tensor]] | None = None,
) -> list[Chunk]:
    """Chunks of at most `chunk_size` tokens covering every token of `sequences` exactly once, in order.

    sequences: token ids per sequence. loss_weights: per sequence, the weight of predicting each token
    (entry 0 is never used: nothing predicts a sequence's first token); default 1 for every token.
    token_fields: name -> per sequence a tensor [L, ...] aligned like loss_weights (e.g. advantages),
    shifted with the labels. Returns the standalone chunks, then each long sequence's chunks in order.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shifted = _shifted_sequences(sequences, loss_weights, token_fields)
    lengths = [len(q.input_ids) for q in shifted]
    short = [i for i, n in enumerate(lengths) if n <= chunk_size]
    bins = first_fit_decreasing([lengths[i] for i in short], chunk_size)
    chunks = [_make_chunk([Span(short[j], 0, lengths[short[j]]) for j in b], shifted) for b in bins]
    for i, n in enumerate(lengths):
        if n > chunk_size:
            starts = range(0, n, chunk_size)
            for part, start in enumerate(starts):
                span = Span(i, start, min(start + chunk_size, n))
                chunks.append(_make_chunk([span], shifted, part, len(starts)))
    return chunks


def build_micro_batches(
    sequences: Sequence[Sequence[int] | torch.Tensor],
    micro_batch_size: int,
    loss_weights: Sequence[Sequence[float] | torch.Tensor] | None = None,
    token_fields: dict[str, Sequence[torch.Tensor]] | None = None,
) -> list[Chunk]:
    """The padded baseline: consecutive groups of `micro_batch_size` whole sequences, in data order, each a
    `padded` chunk that the schedule runs as one [B, L_max] right-padded forward with an attention mask.

    Arguments and per-token tensors as in `build_chunks`, so the same loss function runs on either; the
    chunks are standalone whatever their length (there is no C).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    shifted = _shifted_sequences(sequences, loss_weights, token_fields)
    spans = [Span(i, 0, len(q.input_ids)) for i, q in enumerate(shifted)]
    return [
        _make_chunk(spans[start : start + micro_batch_size], shifted, padded=True)
        for start in range(0, len(spans), micro_batch_size)
    ]


def chunk_chains(chunks: Sequence[Chunk]) -> list[list[Chunk]]:
    """Chunks grouped into the units the scheduler runs: each standalone chunk alone, each long sequence's
    dependent chunks together in order. Groups keep the order of their first chunk."""
    chains: list[list[Chunk]] = []
    by_sequence: dict[int, list[Chunk]] = {}
    for chunk in chunks:
        if not chunk.dependent:
            chains.append([chunk])
        elif chunk.sequence in by_sequence:
            by_sequence[chunk.sequence].append(chunk)
        else:
            by_sequence[chunk.sequence] = [chunk]
            chains.append(by_sequence[chunk.sequence])
    for chain in chains:
        chain.sort(key=lambda c: c.part)
        if [c.part for c in chain] != list(range(chain[0].num_parts)):
            raise ValueError(
                f"sequence {chain[0].sequence}: got chunk parts {[c.part for c in chain]} of "
                f"{chain[0].num_parts}; all chunks of a long sequence must be run together"
            )
    return chains
