"""ChunkFlow (arXiv:2503.02356): variable-length batches trained as chunks of at most C tokens, with
activation memory bounded by K chunks whatever the longest sequence."""

from forkflow.chunkflow.chunks import (
    NO_TARGET,
    Chunk,
    Span,
    build_chunks,
    build_micro_batches,
    chunk_chains,
    first_fit_decreasing,
)
from forkflow.chunkflow.placement import assign_ranks, attention_pair_cost, chunk_cost
from forkflow.chunkflow.schedule import (
    LossFn,
    chunked_backward,
    chunked_forward,
    next_token_loss,
    total_loss_weight,
    unchunk,
)

__all__ = [
    "NO_TARGET",
    "Chunk",
    "LossFn",
    "Span",
    "assign_ranks",
    "attention_pair_cost",
    "build_chunks",
    "build_micro_batches",
    "chunk_chains",
    "chunk_cost",
    "chunked_backward",
    "chunked_forward",
    "first_fit_decreasing",
    "next_token_loss",
    "total_loss_weight",
    "unchunk",
]
