"""ChunkFlow: chunk construction invariants (hypothesis), the state-aware schedule's gradients against a plain
full-sequence backward in float64, and cost-balanced rank assignment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from forkflow.chunkflow import (
    NO_TARGET,
    assign_ranks,
    build_chunks,
    build_micro_batches,
    chunk_chains,
    chunk_cost,
    chunked_backward,
    chunked_forward,
)
from forkflow.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

VOCAB = 64
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)


def tiny_model(moe: bool) -> Qwen3ForCausalLM:
    """float64, weights ~ N(0, 0.3) so that logits are spread and every layer matters."""
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rope_theta=1e6, **(MOE if moe else {}),
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def random_batch(lengths, seed=1, weighted=False):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    weights = [(torch.rand(n, generator=g) < 0.6).double() for n in lengths] if weighted else None
    return seqs, weights


def reference_gradients(model, seqs, weights, token_loss, normalizer):
    """Each sequence in one ordinary forward/backward: Σ_t w_t · token_loss_t / normalizer."""
    model.zero_grad()
    total = 0.0
    for i, seq in enumerate(seqs):
        logits = model(seq[None]).logits[0, :-1]  # [L-1, V]
        w = torch.ones(len(seq) - 1, dtype=torch.double) if weights is None else weights[i][1:]
        loss = (token_loss(logits, seq[1:], i) * w).sum() / normalizer
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def cross_entropy(logits, targets, _):
    return F.cross_entropy(logits, targets, reduction="none")


def max_grad_diff(model, ref):
    return max((p.grad - ref[n]).abs().max().item() for n, p in model.named_parameters())


CASES = {  # name: (sequence lengths, chunk size C, keep K, weighted)
    "K=1": ([20], 5, 1, False),
    "1<K<N": ([20], 5, 2, False),
    "K=N": ([20], 5, 4, False),
    "K>N": ([20], 5, 7, False),
    "short last chunk": ([17], 5, 2, False),
    "packed and split, weighted": ([3, 17, 5, 2, 12, 4, 1, 9], 5, 2, True),
}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_full_backward(case, moe):
    lengths, C, K, weighted = CASES[case]
    model = tiny_model(moe)
    seqs, weights = random_batch(lengths, weighted=weighted)
    chunks = build_chunks(seqs, C, loss_weights=weights)
    targets = sum(int(w[1:].sum()) for w in weights) if weighted else sum(n - 1 for n in lengths)
    ref_loss, ref = reference_gradients(model, seqs, weights, cross_entropy, targets)
    model.zero_grad()
    loss = chunked_backward(model, chunks, keep=K)
    assert max_grad_diff(model, ref) <= 1e-10
    assert loss == pytest.approx(ref_loss, abs=1e-12)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_padded_micro_batches_match_full_backward(moe):
    """The padded baseline through the same schedule and loss: right-padded forwards, same gradients."""
    lengths = [3, 17, 5, 2, 12, 4, 1, 9]
    model = tiny_model(moe)
    seqs, weights = random_batch(lengths, weighted=True)
    chunks = build_micro_batches(seqs, 3, loss_weights=weights)
    assert [[s.sequence for s in c.spans] for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert all(c.padded and not c.dependent for c in chunks)
    targets = sum(int(w[1:].sum()) for w in weights)
    ref_loss, ref = reference_gradients(model, seqs, weights, cross_entropy, targets)
    model.zero_grad()
    loss = chunked_backward(model, chunks)
    assert max_grad_diff(model, ref) <= 1e-10
    assert loss == pytest.approx(ref_loss, abs=1e-12)


def test_custom_loss_with_token_fields_and_global_normalizer():
    """The RL policy loss's shape: a per-token tensor aligned to the chunk, a normaliser passed in."""
    model = tiny_model(moe=False)
    seqs, weights = random_batch([14, 3, 6], weighted=True)
    advantages = [torch.randn(len(s), dtype=torch.double) for s in seqs]

    def policy_loss(output, chunk):
        logp = -F.cross_entropy(output.logits[0], chunk.targets, ignore_index=NO_TARGET, reduction="none")
        return -(logp * chunk.token_fields["advantages"] * chunk.loss_weights).sum()

    def reference(logits, targets, i):
        return F.cross_entropy(logits, targets, reduction="none") * advantages[i][1:]

    ref_loss, ref = reference_gradients(model, seqs, weights, reference, 7.0)
    model.zero_grad()
    chunks = build_chunks(seqs, 4, loss_weights=weights, token_fields={"advantages": advantages})
    loss = chunked_backward(model, chunks, keep=2, loss_fn=policy_loss, normalizer=7.0)
    assert max_grad_diff(model, ref) <= 1e-10
    assert loss == pytest.approx(ref_loss, abs=1e-12)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_chunked_forward_matches_full_forward(moe):
    """Per-position values (here next-token log-probs) gathered back per sequence, as the RL update uses;
    ChunkFlow chunks and padded micro-batches alike."""
    model = tiny_model(moe)
    seqs, _ = random_batch([3, 17, 5, 1, 12])

    def logprobs(output, chunk):
        logp = -F.cross_entropy(output.logits[0], chunk.targets, ignore_index=NO_TARGET, reduction="none")
        return torch.stack([logp, chunk.position_ids.double()], dim=-1)  # [T, 2]

    for chunks in (build_chunks(seqs, 5), build_micro_batches(seqs, 2)):
        per_sequence = chunked_forward(model, chunks, logprobs, num_sequences=len(seqs))
        for seq, values in zip(seqs, per_sequence, strict=True):
            logits = model(seq[None]).logits[0, :-1]
            expected = -F.cross_entropy(logits, seq[1:], reduction="none")
            assert torch.allclose(values[:-1, 0], expected, atol=1e-12, rtol=0)
            assert values[-1, 0] == 0 and torch.equal(values[:, 1], torch.arange(len(seq)).double())


# --------------------------------------------------------------------------------------- construction

lengths_and_chunk_size = st.tuples(st.lists(st.integers(1, 40), min_size=1, max_size=25), st.integers(1, 16))


@settings(max_examples=150, deadline=None)
@given(lengths_and_chunk_size)
def test_chunks_cover_every_token_once_in_order(case):
    lengths, C = case
    seqs = [torch.arange(n) + 1000 * i for i, n in enumerate(lengths)]  # a token id says where it came from
    chunks = build_chunks(seqs, C, token_fields={"copy": seqs})
    covered = {i: [] for i in range(len(seqs))}
    for chunk in chunk_chains(chunks):
        for c in chunk:
            assert 0 < len(c) <= C
            assert len(c.spans) == 1 or not c.dependent
            offset = 0
            for d, s in enumerate(c.spans):
                n = s.stop - s.start
                assert torch.equal(c.input_ids[offset : offset + n], seqs[s.sequence][s.start : s.stop])
                assert torch.equal(c.position_ids[offset : offset + n], torch.arange(s.start, s.stop))
                assert (c.segment_ids[offset : offset + n] == d).all()
                expected = torch.cat([seqs[s.sequence], torch.tensor([NO_TARGET])])[s.start + 1 : s.stop + 1]
                assert torch.equal(c.targets[offset : offset + n], expected)  # shifted before splitting
                weights = c.loss_weights[offset : offset + n]
                assert torch.equal(weights, (expected != NO_TARGET).float())
                assert torch.equal(c.token_fields["copy"][offset : offset + n], expected.clamp(min=0))
                covered[s.sequence].append((s.start, s.stop))
                offset += n
            assert offset == len(c)
    for i, n in enumerate(lengths):
        spans = covered[i]
        assert [a for a, _ in spans] == [0, *[b for _, b in spans[:-1]]] and spans[-1][1] == n
        assert len(spans) == (1 if n <= C else math.ceil(n / C))


@settings(max_examples=150, deadline=None)
@given(lengths_and_chunk_size)
def test_short_sequences_pack_into_few_standalone_chunks(case):
    lengths, C = case
    chunks = build_chunks([[0] * n for n in lengths], C)
    standalone = [c for c in chunks if not c.dependent]
    packed = sorted(s.sequence for c in standalone for s in c.spans)
    assert packed == [i for i, n in enumerate(lengths) if n <= C]
    fills = [len(c) for c in standalone]
    # first fit: no two chunks could have been one, so at most one chunk is half empty
    assert all(a + b > C for i, a in enumerate(fills) for b in fills[i + 1 :])
    assert len(standalone) <= 2 * sum(fills) / C + 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=30), st.integers(3, 12))
def test_small_sequences_fill_all_chunks_but_the_last_to_two_thirds(lengths, C):
    """With sequences at most C/3 long, a later chunk's sequence did not fit into any earlier chunk."""
    lengths = [min(n, C // 3) for n in lengths]
    fills = [len(c) for c in build_chunks([[0] * n for n in lengths], C)]
    assert all(fill > C - C // 3 for fill in fills[:-1])


def test_sequence_of_exactly_chunk_size_is_standalone():
    chunks = build_chunks([[1] * 8, [2] * 9, [3] * 3], 8)
    assert [(len(c), c.dependent) for c in chunks] == [(8, False), (3, False), (8, True), (1, True)]


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        build_chunks([[1, 2], []], 4)
    with pytest.raises(ValueError, match="sequence 0: loss_weights has 2 entries for 3 tokens"):
        build_chunks([[1, 2, 3]], 4, loss_weights=[[1, 1]])
    with pytest.raises(ValueError, match="chunk_size"):
        build_chunks([[1]], 0)
    chunks = build_chunks([list(range(10))], 4)
    with pytest.raises(ValueError, match="must be run together"):
        chunked_backward(tiny_model(moe=False), chunks[1:])
    with pytest.raises(ValueError, match="no loss tokens"):
        chunked_backward(tiny_model(moe=False), build_chunks([[1]], 4))


# ------------------------------------------------------------------------------------------- placement


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=30), st.integers(2, 12), st.integers(1, 5))
def test_rank_assignment_keeps_chains_together_and_balances_cost(lengths, C, world):
    chunks = build_chunks([[0] * n for n in lengths], C)
    pair_cost = 0.05
    shares = assign_ranks(chunks, world, pair_cost)
    assert sorted(id(c) for share in shares for c in share) == sorted(id(c) for c in chunks)
    for share in shares:
        for chain in chunk_chains(share):  # raises if a long sequence's chunks were split across ranks
            assert chain
    loads = [sum(chunk_cost(c, pair_cost) for c in share) for share in shares]
    heaviest_chain = max(sum(chunk_cost(c, pair_cost) for c in chain) for chain in chunk_chains(chunks))
    assert max(loads) <= sum(loads) / world + heaviest_chain  # greedy list-scheduling bound


def test_cost_counts_attention_over_earlier_chunks():
    a, b = build_chunks([list(range(8))], 4)
    assert chunk_cost(a, 1.0) == 4 + (1 + 2 + 3 + 4)
    assert chunk_cost(b, 1.0) == 4 + (5 + 6 + 7 + 8)
