"""forkflow's Qwen3 against transformers' (the reference), and the three attention layouts against plain forwards."""

import pytest
import torch

from forkflow.models import ExpertLoad, KVCache, Qwen3Config, Qwen3ForCausalLM, from_pretrained, load_balancing_loss

PARITY_CASES = [
    pytest.param(False, dict(num_key_value_heads=4), id="dense-gqa1"),
    pytest.param(False, dict(num_key_value_heads=1), id="dense-gqa4"),
    pytest.param(False, dict(num_key_value_heads=1, tie_word_embeddings=True), id="dense-tied"),
    pytest.param(True, dict(norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4), id="moe-norm-step2"),
    pytest.param(True, dict(norm_topk_prob=False, mlp_only_layers=[1], num_hidden_layers=3), id="moe-nonorm-mlponly"),
    pytest.param(True, dict(num_key_value_heads=1, tie_word_embeddings=True), id="moe-tied-gqa4"),
]


@pytest.mark.parametrize("moe,overrides", PARITY_CASES)
def test_logits_match_transformers(tiny_checkpoint, moe, overrides):
    path, ref = tiny_checkpoint(moe=moe, **overrides)
    model = from_pretrained(path, dtype=torch.float32)
    assert model.config.head_dim != model.config.hidden_size // model.config.num_attention_heads
    ids = torch.randint(0, 128, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert got.shape == (3, 13, 128)
    assert (got - want).abs().max().item() <= 1e-5


def test_padded_batch_with_positions_matches_transformers(tiny_checkpoint):
    path, ref = tiny_checkpoint(moe=True)
    model = from_pretrained(path)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-5


def _random_model(moe=False, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rope_theta=1e4,
        **(dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True) if moe else {}),
    )
    return Qwen3ForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("moe", [False, True])
def test_padded_rows_equal_unpadded(moe):
    model = _random_model(moe)
    rows = [torch.randint(0, 64, (n,)) for n in (7, 3, 5)]
    T = 7
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):  # right-pad one row, left-pad another
        if i == 1:
            ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
        else:
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(ids, position_ids=pos, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            assert (batch[i][mask[i].bool()] - alone).abs().max().item() < 1e-10


@pytest.mark.parametrize("moe", [False, True])
def test_packed_documents_equal_separate_forwards(moe):
    model = _random_model(moe)
    docs = [torch.randint(0, 64, (n,)) for n in (5, 2, 6)]
    ids = torch.cat(docs)[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, segment_ids=seg).logits[0]
        separate = torch.cat([model(d[None]).logits[0] for d in docs])
    assert (packed - separate).abs().max().item() < 1e-10


@pytest.mark.parametrize("moe", [False, True])
def test_chunk_with_prefix_kv_equals_slice_of_full_forward(moe):
    model = _random_model(moe)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        outs = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 5), (5, 9), (9, 12))]
    assert len(cache) == 12
    assert (torch.cat(outs, dim=1) - full).abs().max().item() < 1e-10
    # a cache built by hand from detached keys (how ChunkFlow continues a sequence) gives the same
    P = 5
    with torch.no_grad():
        prefix = model.new_cache(2)
        model(ids[:, :P], cache=prefix)
        leaves = KVCache([k.clone() for k in prefix.keys], [v.clone() for v in prefix.values],
                         prefix.positions.clone(), prefix.segments.clone())
        rest = model(ids[:, P:], cache=leaves).logits
    assert (rest - full[:, P:]).abs().max().item() < 1e-10


def test_hidden_states_without_logits_and_gradients_flow():
    model = _random_model()
    out = model(torch.randint(0, 64, (2, 6)))
    assert "logits" not in out.__dict__  # the LM head has not run
    assert out.hidden_states.shape == (2, 6, 32)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_load_balancing_matches_transformers(tiny_checkpoint):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    path, ref = tiny_checkpoint(moe=True, num_hidden_layers=3)
    model = from_pretrained(path)
    ids = torch.randint(0, 128, (2, 10))
    out = model(ids)
    cfg = model.config
    want = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
    got = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_balanced_routing_gives_top_k(k):
    # near-uniform probabilities whose top-k slots are spread evenly over the 4 experts
    logits = (torch.tensor([[4.0, 3, 2, 1], [1, 4, 3, 2], [2, 1, 4, 3], [3, 2, 1, 4]]) * 1e-6,)
    assert abs(load_balancing_loss(logits, 4, k).item() - k) < 1e-4


def test_global_batch_load_balance_equals_concatenation():
    model = _random_model(moe=True)
    cfg = model.config
    a, b = torch.randint(0, 64, (2, 7)), torch.randint(0, 64, (3, 7))
    mask_b = torch.ones_like(b)
    mask_b[0, :2] = 0
    mask_a = torch.ones_like(a)

    load = ExpertLoad(cfg.num_experts, cfg.num_experts_per_tok)
    for ids, mask in ((a, mask_a), (b, mask_b)):
        load.add(model(ids, attention_mask=mask).router_logits, mask)
    global_loss = load.loss()
    global_loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    ids, mask = torch.cat([a, b]), torch.cat([mask_a, mask_b])
    concat = load_balancing_loss(model(ids, attention_mask=mask).router_logits, cfg.num_experts,
                                 cfg.num_experts_per_tok, mask)
    concat.backward()
    assert torch.allclose(global_loss, concat, atol=1e-12)
    assert grads and all(torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-12)
                         for n, g in grads.items())
    # the per-micro-batch variant differs: each micro-batch is balanced on its own
    per_mb = sum(
        load_balancing_loss(model(x, attention_mask=m).router_logits, cfg.num_experts, cfg.num_experts_per_tok, m)
        for x, m in ((a, mask_a), (b, mask_b))
    ) / 2
    assert not torch.allclose(per_mb, concat, atol=1e-6)


def _masked_attention(q, k, v, layout, scale):
    """The layout's rule by hand: softmax over the visible keys of q · kᵀ, GQA by repeating k/v heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~layout.mask(), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize(
    "segments,positions,split",
    [
        pytest.param([[0] * 5 + [1] * 2 + [2] * 6, [3] * 9 + [4] * 4], None, True, id="packed-rows"),
        # the same id on two runs: the second run also sees the first; no per-document split
        pytest.param([[0] * 5 + [1] * 2 + [0] * 6, [3] * 13], None, False, id="segment-reused"),
        # left padding (segment -1) at positions 0, 0, 0: not a run of documents from 0
        pytest.param([[-1] * 3 + [0] * 10, [0] * 13], [[0, 0, 0] + list(range(10)), list(range(13))], False,
                     id="left-padding"),
    ],
)  # fmt: skip
def test_attention_by_document_equals_the_masked_rule(segments, positions, split):
    from forkflow.models.qwen3 import AttentionLayout, attend

    seg = torch.tensor(segments)
    if positions is None:  # positions restart at each document
        starts = torch.nn.functional.pad(seg.diff(dim=1) != 0, (1, 0), value=True).long()
        index = torch.arange(seg.shape[1]).expand_as(seg)
        pos = index - torch.cummax(index * starts, dim=1).values
    else:
        pos = torch.tensor(positions)
    layout = AttentionLayout(pos, seg, pos, seg)
    assert (layout.documents is not None) == split
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 13, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 4, 13, 8, generator=g, dtype=torch.float64)
    got = attend(q, k, v, layout, 0.3)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want = _masked_attention(q, k, v, layout, 0.3)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    assert (got - want).abs().max().item() < 1e-12
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a - b).abs().max().item() < 1e-12
