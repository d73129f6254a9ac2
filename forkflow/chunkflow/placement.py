"""Spreading a chunked batch over data-parallel ranks by estimated cost.

Every rank builds the same chunks from the same global batch, so each can compute the whole assignment
locally; a long sequence's chunks stay on one rank (they pass K/V to each other).
"""

from __future__ import annotations

from collections.abc import Sequence

from forkflow.chunkflow.chunks import Chunk, chunk_chains
from forkflow.models.qwen3 import Qwen3Config


def attention_pair_cost(config: Qwen3Config) -> float:
    """Cost of one (query, key) attention pair relative to one token through the matmuls, from FLOP counts:
    4·heads·head_dim per pair and layer (scores and weighted sum) against 2·(weights a token meets)."""
    h, d = config.hidden_size, config.head_dim
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    layers = config.num_hidden_layers
    sparse = sum(config.is_sparse_layer(i) for i in range(layers))
    mlp = 3 * h * (sparse * config.num_experts_per_tok * config.moe_intermediate_size
                   + (layers - sparse) * config.intermediate_size)
    per_token = 2 * (layers * attention + mlp + h * config.vocab_size)
    return 4 * config.num_attention_heads * d * layers / per_token


def chunk_cost(chunk: Chunk, pair_cost: float) -> float:
    """Estimated work of a chunk: its tokens plus its causal attention pairs weighted by `pair_cost`
    (a dependent chunk's queries also see every key of the chunks before it)."""
    pairs = sum((s.stop - s.start) * (s.start + s.stop + 1) // 2 for s in chunk.spans)
    return len(chunk) + pair_cost * pairs


def assign_ranks(chunks: Sequence[Chunk], world_size: int, pair_cost: float) -> list[list[Chunk]]:
    """Chunks per rank, balancing estimated cost: chains (a standalone chunk, or all chunks of one long
    sequence) go, costliest first, to the least-loaded rank (ties to the lowest rank). Deterministic, so
    every rank computes the same answer."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    chains = chunk_chains(chunks)
    costs = [sum(chunk_cost(c, pair_cost) for c in chain) for chain in chains]
    loads = [0.0] * world_size
    ranks: list[list[Chunk]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(chains)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        ranks[rank].extend(chains[i])
        loads[rank] += costs[i]
    return ranks
