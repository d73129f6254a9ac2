"""The rollout engine against transformers' greedy generate, chi-square tests of its sampling, teacher-forced
forwards for its log-probs and entropies, continuous batching against each request alone, bf16 rollouts against
the fp32 model, and `forkflow generate` end to end."""

import dataclasses
import json
import math
import multiprocessing

import pytest
import torch
from tokenizers import Tokenizer

from forkflow.chat import THINKING_BUDGET_TEXT, load_tokenizer
from forkflow.models import from_pretrained
from forkflow.rollout import (
    EntropyAwareTemperature,
    PromptError,
    SamplingParams,
    ThinkingBudget,
    TorchBackend,
    cpu_kernels,
    engine,
    generate,
    sampling,
    weights,
)
from forkflow.rollout.cli import main as generate_cli
from forkflow.rollout.cli import max_new_tokens
from forkflow.rollout.cli import parser as generate_parser
from forkflow.rollout.sampling import BLOCK, keyed_uniforms, sample_plain, to_uniform
from forkflow.rollout.weights import CHUNK, Head
from forkflow.train.rl_data import load_rl_prompts
from tests.test_train_rl import write_rl_setup

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [100, 1, 2, 4], [50, 60, 70, 80, 90]]  # mixed lengths
KEYS = [10, 11, 12, 13]


def flat(samples):
    return [s for row in samples for s in row]


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    return ids, mask


@pytest.mark.parametrize("layout", ["kernel", "onednn", "plain"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_greedy_equals_transformers_generate(tiny_checkpoint, moe, layout, monkeypatch):
    """Decoding weights for forkflow's CPU kernels (what CPU fp32 gets, attention on the kernel too), prepacked
    for oneDNN (CPU fp32 without a C compiler: attention through SDPA) and plain ones through F.linear (other
    devices; a CPU bf16 rollout without bf16 matmuls: SDPA)."""
    monkeypatch.setattr(weights, "layout_of", lambda weight: layout)
    monkeypatch.setattr(engine, "attention_kernel", lambda keys: layout == "kernel")
    path, ref = tiny_checkpoint(moe=moe)
    model = from_pretrained(path)
    first = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    stop = first[0][0].token_ids[3].item()  # a token greedy decoding does produce, so some rows stop early
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop,))
    ours = [s[0] for s in generate(model, PROMPTS, params)]
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        theirs = ref.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=stop, pad_token_id=0
        )[:, ids.shape[1] :]
    assert any(s.finish_reason == "stop" for s in ours) and any(s.finish_reason == "length" for s in ours)
    for sample, row in zip(ours, theirs, strict=True):
        n = len(sample.token_ids)
        assert sample.token_ids.tolist() == row[:n].tolist()
        assert sample.finish_reason == ("stop" if row[n - 1] == stop else "length")
        assert (sample.sample_logprobs == 0).all()


def reference_distribution(logits, temperature, top_k=0, top_p=1.0):
    """softmax(logits / T) restricted to the top-k, then to the smallest prefix whose mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k else order
    total, mass, prefix = sum(probs[i].item() for i in kept), 0.0, []
    for i in kept:
        if mass >= top_p:
            break
        prefix.append(i)
        mass += probs[i].item() / total
    out = torch.zeros_like(probs)
    out[prefix] = probs[prefix]
    return out / out.sum()


def chi_square(counts, expected_probs, total):
    """Pearson's statistic over the cells with expected count >= 5 (the rest pooled), and its degrees of
    freedom."""
    expected = expected_probs * total
    big = expected >= 5
    observed_cells = [*counts[big].tolist(), counts[~big].sum().item()]
    expected_cells = [*expected[big].tolist(), expected[~big].sum().item()]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed_cells, expected_cells, strict=True) if e > 0)
    return stat, sum(e > 0 for e in expected_cells) - 1


def chi_square_critical(df, z=3.719):  # Wilson-Hilferty; z = 3.719 is the one-sided p = 1e-4 normal quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.95), (1.4, 0, 0.8), (1.0, 0, 1.0)])
def test_first_token_frequencies_match_filtered_softmax(tiny_checkpoint, temperature, top_k, top_p):
    path, ref = tiny_checkpoint()
    model = from_pretrained(path)
    prompt, draws = [7, 3, 99, 12], 6000
    params = SamplingParams(
        n=draws, max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=1
    )
    first_tokens = torch.tensor([s.token_ids[0].item() for s in generate(model, [prompt], params)[0]])
    counts = torch.bincount(first_tokens, minlength=128).double()
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0, -1]
    expected = reference_distribution(logits, temperature, top_k, top_p)
    assert counts[expected == 0].sum() == 0  # nothing outside the top-k / top-p set is ever drawn
    stat, df = chi_square(counts, expected, draws)
    assert df > 5 and stat < chi_square_critical(df)
    # the same test does reject a wrong temperature
    wrong = reference_distribution(logits, temperature * 1.5, top_k, top_p)
    assert chi_square(counts, wrong.clamp(min=1e-12), draws)[0] > chi_square_critical(df)


def teacher_forced(model, prompt, tokens):
    """T = 1 logits [L, V] (fp64) predicting each of `tokens` after `prompt`, from one full forward."""
    ids = torch.tensor([[*prompt, *tokens]])
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1 : -1].double()


def entropy(logits):
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("T,top_k,top_p", [(0.8, 40, 0.9), (1.0, 0, 1.0)], ids=["filtered", "plain"])
def test_logprobs_and_entropies_equal_a_teacher_forced_forward(tiny_checkpoint, moe, T, top_k, top_p):
    path, _ = tiny_checkpoint(moe=moe)
    model = from_pretrained(path)
    params = SamplingParams(
        n=3,
        max_new_tokens=10,
        temperature=T,
        top_k=top_k,
        top_p=top_p,
        seed=3,
        stop_token_ids=tuple(range(10)),
    )
    steps = []
    samples = [
        s for row in generate(model, PROMPTS, params, on_step=lambda t, f: steps.append(t)) for s in row
    ]
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    assert sum(steps) == sum(len(s.token_ids) for s in samples)  # finished rows cost nothing more
    assert steps == sorted(steps, reverse=True) and steps[-1] < steps[0]
    for s in samples:
        logits = teacher_forced(model, PROMPTS[s.prompt_index], s.token_ids.tolist())
        tokens = s.token_ids[:, None]
        assert torch.allclose(
            s.logprobs.double(), torch.log_softmax(logits, -1).gather(1, tokens)[:, 0], atol=1e-4
        )
        assert torch.allclose(s.entropies.double(), entropy(logits / T), atol=1e-4)
        drawn_from = torch.stack([reference_distribution(z, T, top_k, top_p) for z in logits])
        assert torch.allclose(s.sample_logprobs.double(), drawn_from.gather(1, tokens)[:, 0].log(), atol=1e-4)


def test_entropy_aware_decoding_uses_the_high_temperature_above_the_threshold(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    model = from_pretrained(path)
    rule = EntropyAwareTemperature(high=1.5, low=0.4, threshold=3.9)
    params = SamplingParams(n=2, max_new_tokens=12, entropy_aware=rule, seed=5)
    temperatures_used = set()
    for s in (s for row in generate(model, PROMPTS, params) for s in row):
        logits = teacher_forced(model, PROMPTS[s.prompt_index], s.token_ids.tolist())
        T = torch.where(entropy(logits) > rule.threshold, rule.high, rule.low)
        temperatures_used |= {round(t, 6) for t in T.tolist()}
        want = torch.log_softmax(logits / T[:, None], -1).gather(1, s.token_ids[:, None])[:, 0]
        assert torch.allclose(s.sample_logprobs.double(), want, atol=1e-4)
        assert torch.allclose(s.entropies.double(), entropy(logits), atol=1e-4)  # reported at temperature 1
    assert temperatures_used == {rule.high, rule.low}


def check_thinking_budget(backend, model) -> list:
    """Budget 3, a 4-token suffix, answer budget 4, on a prompt still thinking and one that has left it: the
    suffix is forced at the budget and the answer allowed after it, the forced tokens have sampling log-prob 0
    and the answer's are the model's (T = 1, teacher-forced, within 1e-4). Returns (forced sample, the
    teacher-forced log-probs of its tokens) pairs."""
    think_end, suffix = 127, (100, 101, 127, 102)
    budget = ThinkingBudget(budget=3, suffix_ids=suffix, think_end_id=think_end, answer_budget=4)
    params = SamplingParams(n=4, max_new_tokens=6, thinking=budget, seed=0)
    thinking_prompt, closed_prompt = [1, 2, 3], [1, think_end, 5]  # the second has already left thinking
    forced = []
    for s in (s for row in backend.generate([thinking_prompt, closed_prompt], params) for s in row):
        tokens = s.token_ids.tolist()
        if s.prompt_index == 1 or think_end in tokens[:3]:
            assert s.forced_span is None and len(tokens) == 6
            continue
        assert s.forced_span == (3, 7) and tuple(tokens[3:7]) == suffix and len(tokens) == 3 + 4 + 4
        assert (s.sample_logprobs[3:7] == 0).all()
        logits = teacher_forced(model, thinking_prompt, tokens)  # the answer is drawn after the forced suffix
        want = torch.log_softmax(logits, -1).gather(1, s.token_ids[:, None])[:, 0]
        assert torch.allclose(s.sample_logprobs[7:].double(), want[7:], atol=1e-4)
        forced.append((s, want))
    assert len(forced) >= 3
    return forced


def test_thinking_budget_forces_the_suffix_then_allows_the_answer_budget(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint()[0])
    for s, want in check_thinking_budget(TorchBackend(model), model):  # the model's log-probs, forced ones too
        assert torch.allclose(s.logprobs.double(), want, atol=1e-4)


def test_seed_reproduces_and_backend_matches_engine(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    model = from_pretrained(path)

    def run(seed):
        params = SamplingParams(n=2, max_new_tokens=8, seed=seed, min_p=0.05)
        return [s.token_ids.tolist() for row in TorchBackend(model).generate(PROMPTS, params) for s in row]

    assert run(0) == run(0) != run(1)


def test_a_prompts_samples_do_not_depend_on_the_batch_it_is_drawn_in(tiny_checkpoint):
    """Counter-based sampling keyed by (seed, prompt key, sample, position): a prompt drawn alone, in another
    order or beside other prompts gets the same samples (what makes N ranks equal one process)."""
    model = from_pretrained(tiny_checkpoint()[0])
    params = SamplingParams(n=3, max_new_tokens=10, seed=5)
    together = generate(model, PROMPTS, params, prompt_keys=[10, 11, 12, 13])
    alone = generate(model, [PROMPTS[2]], params, prompt_keys=[12])
    reordered = generate(model, PROMPTS[::-1], params, prompt_keys=[13, 12, 11, 10])
    tokens = [[s.token_ids.tolist() for s in row] for row in together]
    assert [s.token_ids.tolist() for s in alone[0]] == tokens[2]
    assert [[s.token_ids.tolist() for s in row] for row in reordered] == tokens[::-1]
    assert tokens[0][0] != tokens[0][1]  # the samples of one prompt differ


def test_an_empty_backend_samples_from_the_weights_it_is_given_and_frees_them(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint()[0])
    backend = TorchBackend.empty(model.config, torch.device("cpu"))
    backend.load_weights((name, p.detach().clone()) for name, p in model.named_parameters())
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0)
    assert [[s.token_ids.tolist() for s in row] for row in backend.generate(PROMPTS, params)] == [
        [s.token_ids.tolist() for s in row] for row in generate(model, PROMPTS, params)]
    backend.release()
    assert all(p.is_meta for p in backend.model.parameters())
    TorchBackend(model).release()  # a backend over the trainer's own model never frees it
    assert not any(p.is_meta for p in model.parameters())


def test_bad_prompts_are_named(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    model = from_pretrained(path)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(PromptError, match=r"prompts\[1\]: prompt is empty"):
        generate(model, [[1], []], params)
    with pytest.raises(PromptError, match="512"):
        generate(model, [[1] * 600], params)
    with pytest.raises(PromptError, match="token id 128 is outside"):
        generate(model, [[1, 128]], params)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# ---------------------------------------------------------------------------------- continuous batching


def slot_tokens(prompts, params):
    """The KV-cache tokens the engine gives every request: longest prompt + longest response."""
    return max(map(len, prompts)) + params.longest_response


def generate_counting_steps(model, prompts, params, **options):
    """generate(...) and the number of tokens of each decoding step (the batch size)."""
    steps = []
    return generate(model, prompts, params, on_step=lambda tokens, _: steps.append(tokens), **options), steps


def assert_same_samples(got, want):
    """The same tokens, finish reasons and forced spans; log-probs and entropies within 1e-5."""
    for a, b in zip(flat(got), flat(want), strict=True):
        assert a.sample_index == b.sample_index
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.finish_reason == b.finish_reason
        assert a.forced_span == b.forced_span
        for field in ("logprobs", "sample_logprobs", "entropies"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-5, rtol=0)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}], ids=["plain", "filtered"])
def test_continuous_batching_gives_every_request_what_it_gets_alone(tiny_checkpoint, moe, sampling):
    """max_batch_tokens of one slot decodes each (prompt, sample) request alone; with more slots, queued
    requests take the place of finished rows at once (the batch stays full until the queue is empty, then
    shrinks: it never waits for a whole batch to end). Every bound gives every request the same tokens,
    log-probs and entropies."""
    model = from_pretrained(tiny_checkpoint(moe=moe)[0])
    params = SamplingParams(n=3, max_new_tokens=10, seed=5, stop_token_ids=tuple(range(1, 8)), **sampling)
    slot = slot_tokens(PROMPTS, params)
    alone = generate(model, PROMPTS, params, prompt_keys=KEYS, max_batch_tokens=slot)
    assert {s.finish_reason for s in flat(alone)} == {"stop", "length"}
    assert_same_samples(alone[2:3], generate(model, PROMPTS[2:3], params, prompt_keys=KEYS[2:3]))
    for max_batch_tokens, slots in [(2 * slot, 2), (5 * slot + 3, 5), (None, 12)]:
        batched, steps = generate_counting_steps(model, PROMPTS, params, prompt_keys=KEYS,
                                                 max_batch_tokens=max_batch_tokens)
        assert steps[0] == slots and steps == sorted(steps, reverse=True)
        assert sum(steps) == sum(len(s.token_ids) for s in flat(alone))
        assert_same_samples(batched, alone)


@pytest.mark.parametrize("layout", ["kernel", "onednn", "plain"])
def test_projection_ops_equal_the_product_then_the_op(layout):
    """silu / add / mul after a projection (one pass with the product where the layout allows) against
    F.linear and the op."""
    g = torch.Generator().manual_seed(0)
    w, x, other = (torch.randn(shape, generator=g) for shape in ((48, 32), (5, 1, 32), (5, 1, 48)))
    projection, product = weights.Projection(w, layout), torch.nn.functional.linear(x, w)
    for got, want in [
        (projection(x), product),
        (projection.silu(x), torch.nn.functional.silu(product)),
        (projection.add(x, other), product + other),
        (projection.mul(x, other), product * other),
    ]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_matmul_equals_the_float64_product(threads):
    """forkflow's CPU matmul kernel (`cpu_kernels.matmul`) against float64, over batches on both sides of its
    tile widths (8 and 16 rows), weight rows on both sides of its groups of 6, strided inputs, and its
    epilogues."""
    g = torch.Generator().manual_seed(0)
    for B, K, N in [(1, 1, 1), (3, 7, 5), (8, 64, 6), (9, 33, 13), (16, 64, 50), (17, 5, 12), (40, 96, 37)]:
        w = torch.randn(N, K, generator=g)
        x = torch.randn(B, 2 * K, generator=g)[:, ::2]  # rows K apart in memory, columns 2 apart
        other = torch.randn(B, N, generator=g)
        packed = cpu_kernels.pack(w)
        want = x.double() @ w.double().T
        for op, expected in [("none", want), ("add", want + other.double()), ("mul", want * other.double())]:
            got = cpu_kernels.matmul(x, packed, N, threads, op, None if op == "none" else other)
            assert got.shape == (B, N) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * K ** 0.5, msg=f"{B, K, N, op}")


def test_cpu_matmul_rows_do_not_depend_on_the_batch_or_the_threads():
    """A row's product is the same bits alone (an 8-row tile), in a batch of 40 (16-row tiles) and on any
    number of threads: the engine's samples do not depend on which rows decode together."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(100, 80, generator=g), torch.randn(40, 80, generator=g)
    packed = cpu_kernels.pack(w)
    batch = cpu_kernels.matmul(x, packed, 100, 1)
    assert torch.equal(cpu_kernels.matmul(x, packed, 100, 4), batch)
    for row in (0, 17, 39):
        assert torch.equal(cpu_kernels.matmul(x[row : row + 1], packed, 100, 2)[0], batch[row])
    assert weights.layout_of(w) == "kernel"  # what CPU fp32 decoding gets where the kernel compiles (CI does)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("threads", [1, 3])
def test_block_exponentials_equal_the_float64_formula(kernel, threads, monkeypatch):
    """A chunk's pass of plain sampling (`sampling.block_exponentials`), on forkflow's CPU kernel and on torch's
    ops, against float64: the new running maximum, exp(max(z - M', floor)), the block masses and Σ e · y, with
    logits far below the floor, the padding of a last partial block (the dtype's lowest value) and running
    maxima below and above the chunk's."""
    monkeypatch.setattr(weights, "_projection_threads", threads)
    if not kernel:
        monkeypatch.setattr(sampling.cpu_kernels, "available", lambda: False)
    g = torch.Generator().manual_seed(2)
    for B, k in [(1, 1), (3, 5), (7, 2)]:
        z = torch.randn(B, k, BLOCK, generator=g) * 20
        z[:, 0, :3] = -500.0  # below M' + EXP_FLOOR
        z[-1, -1, 100:] = torch.finfo(torch.float32).min  # a padded last block
        running = torch.full((B,), torch.finfo(torch.float32).min)
        running[0] = z[0].max() + 3.0  # a maximum from an earlier chunk
        want_max = torch.maximum(running, z.amax((1, 2))).double()
        y = (z.double() - want_max[:, None, None]).clamp_min(sampling.EXP_FLOOR)
        want_e = y.exp()
        new_max, e, masses, dot = sampling.block_exponentials(z.clone(), running)
        assert torch.equal(new_max.double(), want_max)
        # fp32's z - M' is off by up to |y| · 2^-24 (5e-6 relative error in e at the floor)
        torch.testing.assert_close(e.double(), want_e, rtol=1e-5, atol=0)
        torch.testing.assert_close(masses.double(), want_e.sum(-1), rtol=1e-5, atol=0)
        torch.testing.assert_close(dot.double(), (want_e * y).sum((1, 2)), rtol=1e-5, atol=1e-5)
    z = torch.randn(3, 1, BLOCK, generator=g)
    z[1, 0, 5], z[2, 0, 9] = float("nan"), float("inf")  # a broken model's logits stay visible as NaN
    new_max, _, _, dot = sampling.block_exponentials(z, torch.full((3,), torch.finfo(torch.float32).min))
    assert new_max[0].isfinite() and dot[0].isfinite()
    assert not new_max[1:].isfinite().any() and dot[1:].isnan().all()


def float64_attention(q, keys, values, lengths):
    """softmax(q · Kᵀ / sqrt(D)) · V in float64 for each row over its first lengths[b] columns, query head i on
    key/value head i // G: [B, heads · D]."""
    B, heads, D = q.shape
    G = heads // keys.shape[1]
    rows = []
    for b, n in enumerate(lengths.tolist()):
        k, v = (t[b, :, :n].double().repeat_interleave(G, 0) for t in (keys, values))  # [heads, n, D]
        p = (torch.einsum("hd,hnd->hn", q[b].double(), k) * D**-0.5).softmax(-1)
        rows.append(torch.einsum("hn,hnd->hd", p, v).flatten())
    return torch.stack(rows)


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_attention_equals_the_float64_softmax(threads):
    """forkflow's CPU decoding attention (`cpu_kernels.decode_attention`) against float64: the new keys and values
    land in each row's slot at its last column, and the attention over the slot matches with G = 1, 2 and 8
    query heads per key/value head, head sizes 64, 72 and 128, rows that see 1 column, the whole capacity and
    lengths on both sides of its chunks of 64 keys (the online softmax's rescaling), scores spread wide enough
    that a chunk's maximum moves, q, k and v strided as the engine's are (views of q/k/v together), cache slots
    beyond the batch; and a row's result is the same bits alone, in the batch and on any number of threads."""
    g = torch.Generator().manual_seed(3)
    for B, heads, KV, D, capacity in [(5, 4, 2, 64, 200), (6, 16, 8, 128, 130), (3, 8, 8, 72, 70), (2, 16, 2, 128, 65)]:
        keys, values = (torch.randn(B + 2, KV, capacity, D, generator=g) for _ in range(2))
        keys[:, :, 64:] *= 4  # later chunks hold larger scores: the running maximum moves
        qkv = torch.randn(B, 1, heads + 2 * KV, D, generator=g)
        q, k, v = qkv[:, 0].split([heads, KV, KV], dim=1)  # rows (heads + 2 KV) · D apart
        q = q * 2
        lengths = torch.randint(1, capacity + 1, (B,), generator=g)
        lengths[:2] = torch.tensor([1, capacity])
        want_keys, want_values = keys.clone(), values.clone()
        for b, n in enumerate(lengths.tolist()):
            want_keys[b, :, n - 1], want_values[b, :, n - 1] = k[b], v[b]
        alone_keys, alone_values = keys[1:].clone(), values[1:].clone()
        got = cpu_kernels.decode_attention(q, k, v, keys, values, lengths, D**-0.5, threads)
        assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
        assert got.shape == (B, heads * D) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), float64_attention(q, keys, values, lengths), rtol=1e-5, atol=1e-5,
                                   msg=f"{B, heads, KV, D, capacity}")  # fmt: skip
        alone = cpu_kernels.decode_attention(q[1:2], k[1:2], v[1:2], alone_keys, alone_values, lengths[1:2],
                                             D**-0.5, 1)  # fmt: skip
        assert torch.equal(alone[0], got[1])
    keys, values = (torch.randn(2, 2, 8, 64, generator=g) for _ in range(2))
    q, k, v = torch.randn(2, 4, 64, generator=g), torch.randn(2, 2, 64, generator=g), torch.randn(2, 2, 64, generator=g)
    keys[1, 0, 2, 5] = float("nan")  # a broken model's key: its head's queries come out NaN, as with SDPA
    got = cpu_kernels.decode_attention(q, k, v, keys, values, torch.tensor([8, 8]), 0.125, threads)
    assert got[0].isfinite().all() and got[1, :128].isnan().all() and got[1, 128:].isfinite().all()


def _matmul_in_a_child(queue):
    w, x = torch.ones(60, 8), torch.ones(3, 8)
    queue.put(cpu_kernels.matmul(x, cpu_kernels.pack(w), 60, 2).sum().item())


def test_cpu_kernels_run_in_a_forked_child():
    """The kernels' worker threads do not survive fork(): a child of a process whose pool is running starts
    a pool of its own (a child that waited on its parent's workers would hang)."""
    w = torch.randn(60, 8)
    cpu_kernels.matmul(torch.randn(3, 8), cpu_kernels.pack(w), 60, 2)  # the parent's pool is up
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_matmul_in_a_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the kernel hung in a forked child")
    assert child.exitcode == 0 and queue.get(timeout=5) == 3 * 60 * 8


def test_without_a_compiler_decoding_falls_back_to_onednn_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FORKFLOW_CACHE", str(tmp_path))
    cpu_kernels.library.cache_clear()
    try:
        assert weights.layout_of(torch.zeros(4, 4)) == "onednn"
        assert "CPU decoding kernel is unavailable" in capsys.readouterr().err
    finally:
        cpu_kernels.library.cache_clear()


def test_small_ops_run_on_one_thread_and_projections_on_all():
    """Inside `small_ops_on_one_thread` torch runs on one thread except in `on_all_threads`; the count
    comes back after the block, also when it raises."""
    seen = []
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"), weights.small_ops_on_one_thread(torch.device("cpu")):
            seen.append(torch.get_num_threads())
            seen.append(weights.on_all_threads(torch.get_num_threads))
            seen.append(torch.get_num_threads())
            raise RuntimeError("inside")
        seen.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(1)
    assert seen == [1, 2, 1, 2]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_two_threads_decode_what_one_thread_decodes(tiny_checkpoint, moe):
    """With two torch threads the engine runs its projections, attention and MoE layers on both and its
    other ops on one (`weights.small_ops_on_one_thread`): the same samples as on one thread, and the thread
    count is what it was after the call."""
    model = from_pretrained(tiny_checkpoint(moe=moe)[0])
    params = SamplingParams(n=3, max_new_tokens=10, seed=5, stop_token_ids=tuple(range(1, 8)))
    one = generate(model, PROMPTS, params)
    torch.set_num_threads(2)
    try:
        two = generate(model, PROMPTS, params)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert_same_samples(two, one)


def test_requests_that_stop_at_their_first_token_or_run_to_the_budget_come_back_whole(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint()[0])
    params = SamplingParams(n=3, max_new_tokens=6, seed=2)
    unstopped = generate(model, PROMPTS, params)
    stop = unstopped[1][0].token_ids[0].item()  # sample 0 of prompt 1 stops at its first token
    params = dataclasses.replace(params, stop_token_ids=(stop,))
    slot = slot_tokens(PROMPTS, params)
    for max_batch_tokens in (slot, 2 * slot, None):
        samples = generate(model, PROMPTS, params, max_batch_tokens=max_batch_tokens)
        assert samples[1][0].token_ids.tolist() == [stop] and samples[1][0].finish_reason == "stop"
        for got, full in zip(flat(samples), flat(unstopped), strict=True):
            tokens = full.token_ids.tolist()
            end = tokens.index(stop) + 1 if stop in tokens else len(tokens)
            assert got.token_ids.tolist() == tokens[:end]
            assert got.finish_reason == ("stop" if stop in tokens else "length")
            assert len(got.logprobs) == len(got.sample_logprobs) == len(got.entropies) == end
            torch.testing.assert_close(got.logprobs, full.logprobs[:end], atol=1e-5, rtol=0)
        assert sum(s.finish_reason == "length" and len(s.token_ids) == 6 for s in flat(samples)) >= 3
    one_token = dataclasses.replace(params, max_new_tokens=1, stop_token_ids=())
    firsts = generate(model, PROMPTS, one_token, max_batch_tokens=slot_tokens(PROMPTS, one_token))
    assert [s.token_ids.tolist() for s in flat(firsts)] == [s.token_ids[:1].tolist() for s in flat(unstopped)]
    assert {s.finish_reason for s in flat(firsts)} == {"length"}


def test_thinking_budget_under_continuous_batching(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint()[0])
    budget = ThinkingBudget(budget=3, suffix_ids=(100, 101, 127, 102), think_end_id=127, answer_budget=4)
    params = SamplingParams(n=4, max_new_tokens=6, thinking=budget, seed=0, stop_token_ids=(9,))
    prompts = [[1, 2, 3], [1, 127, 5], [9, 8]]  # the second has already left thinking
    at_once = generate(model, prompts, params)
    assert sum(s.forced_span is not None for s in flat(at_once)) >= 4
    slot = slot_tokens(prompts, params)
    for max_batch_tokens in (slot, 3 * slot):
        assert_same_samples(generate(model, prompts, params, max_batch_tokens=max_batch_tokens), at_once)


def test_max_batch_tokens_below_one_request_says_what_to_set(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint()[0])
    params = SamplingParams(max_new_tokens=10)
    with pytest.raises(ValueError, match=r"max_batch_tokens=16 cannot hold one request.*set max_batch_tokens >= 17"):
        generate(model, PROMPTS, params, max_batch_tokens=16)
    with pytest.raises(ValueError, match="set max_batch_tokens >= 17"):  # the backend passes it on
        TorchBackend(model, max_batch_tokens=16).generate(PROMPTS, params)
    with pytest.raises(TypeError, match=r"max_batch_tokens must be a number of KV-cache tokens \(int\) or None"):
        generate(model, PROMPTS, params, max_batch_tokens=100.0)
    empty = TorchBackend.empty(model.config, torch.device("cpu"), max_batch_tokens=17)
    empty.load_weights((name, p.detach()) for name, p in model.named_parameters())
    steps = []
    empty.generate(PROMPTS, params, on_step=lambda tokens, _: steps.append(tokens))
    assert set(steps) == {1}  # one slot: the requests decode one at a time


def test_uniforms_are_never_0_or_1():
    """The grid's ends: a uniform of 0 would draw the first block or token of any nonzero probability (before
    the grid was shifted, tokens of probability e^-40 came once per ~13,000 draws over Qwen3's vocabulary)."""
    ends = to_uniform(torch.tensor([0, 511, 512, 2**32 - 1]))
    assert ends.tolist() == [2.0**-24, 2.0**-24, 3 * 2.0**-24, 1 - 2.0**-24]
    u = keyed_uniforms(torch.arange(1000), torch.zeros(1000, dtype=torch.long), 300)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005


def test_plain_sampling_never_draws_a_negligible_block_or_token():
    """One token holds nearly all the mass of Qwen3's vocabulary (the others e^-40 below it, or beyond the
    floor at e^-100, as most of a trained model's): with every uniform at its smallest (2^-24) the draw is that
    token, in each of its chunk's positions, and S and H are exact (the floored logits add nothing visible)."""
    vocab = 151936
    for low in (-40.0, -100.0):
        for winner in (0, 100, CHUNK + 5, vocab - 1):
            logits = torch.full((vocab,), low)
            logits[winner] = 0.0
            uniforms = torch.full((1, 2 * -(-vocab // BLOCK)), 2.0**-24)
            step = sample_plain(torch.ones(1, 1), Head(logits[:, None]), uniforms)
            assert step.tokens.tolist() == [winner]
            want = torch.log_softmax(logits.double(), -1)
            assert step.log_normalizer.item() == pytest.approx(torch.logsumexp(logits.double(), -1).item(), abs=1e-6)
            assert step.entropies.item() == pytest.approx(-(want.exp() * want).sum().item(), abs=1e-6)


def test_plain_sampling_draws_softmax_over_blocks_and_chunks():
    """sample_plain over three chunks of logits, the last ending in a partial block, the probability mass
    spread over all of them: its tokens follow softmax(z) (chi-square), its log-normalizer, entropy and
    log-probs are exact."""
    vocab, draws = 2 * CHUNK + 300, 6000
    g = torch.Generator().manual_seed(0)
    logits = torch.full((vocab,), -30.0)
    support = torch.cat([torch.randperm(vocab - 300, generator=g)[:40], torch.arange(vocab - 8, vocab)])
    logits[support] = torch.randn(len(support), generator=g) * 1.5
    head, hidden = Head(logits[:, None]), torch.ones(500, 1)  # hidden · weightᵀ = the logits, for 500 rows at once
    steps = [
        sample_plain(hidden, head, keyed_uniforms(torch.arange(k, k + 500), torch.zeros(500, dtype=torch.long),
                                                    2 * -(-vocab // BLOCK)))
        for k in range(0, draws, 500)
    ]
    tokens = torch.cat([s.tokens for s in steps])
    want = torch.log_softmax(logits.double(), -1)
    entropy_want = -(want.exp() * want).sum()
    for s in steps:
        torch.testing.assert_close(s.log_normalizer.double(), torch.logsumexp(logits.double(), -1).expand(500))
        torch.testing.assert_close(s.entropies.double(), entropy_want.expand(500), atol=1e-5, rtol=0)
        torch.testing.assert_close(s.sample_logprobs.double(), want[s.tokens], atol=1e-5, rtol=0)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[logits == -30].sum() == 0
    stat, df = chi_square(counts, want.exp(), draws)
    assert df > 20 and stat < chi_square_critical(df)
    assert chi_square(counts, torch.softmax(logits.double() / 1.3, -1), draws)[0] > chi_square_critical(df)


@pytest.mark.parametrize("matmuls", ["native", "emulated"])
def test_bf16_rollout_logprobs_are_the_fp32_models_within_bf16_rounding(tiny_checkpoint, matmuls, monkeypatch):
    """A bf16 TorchBackend (weights cast from the fp32 model, continuous batching on) samples with log-probs
    near the fp32 model's teacher-forced ones for the same tokens. Measured on this tiny model (weights
    ~ N(0, 0.3), logits of tens): largest gap 0.11-0.15, mean 0.06-0.08 over seeds 0-2; bounds set at twice that.
    A bug (a wrong position, key or mask) makes gaps of several nats. "emulated": as on a CPU without bf16
    matmuls (AVX2), where oneDNN cannot prepack bf16 and the weights stay plain."""
    if matmuls == "emulated":
        monkeypatch.setattr(weights, "cpu_bf16_matmuls", lambda: False)
    model = from_pretrained(tiny_checkpoint()[0])
    params = SamplingParams(n=4, max_new_tokens=16, seed=0)
    backend = TorchBackend.empty(model.config, torch.device("cpu"), torch.bfloat16, slot_tokens(PROMPTS, params) * 5)
    backend.load_weights((name, p.detach()) for name, p in model.named_parameters())
    gaps = []
    for s in flat(backend.generate(PROMPTS, params)):
        logits = teacher_forced(model, PROMPTS[s.prompt_index], s.token_ids.tolist())
        want = torch.log_softmax(logits, -1).gather(1, s.token_ids[:, None])[:, 0]
        gaps.append((s.logprobs.double() - want).abs())
    gaps = torch.cat(gaps)
    assert 0 < gaps.mean() < 0.15 and gaps.max() < 0.3, (gaps.mean(), gaps.max())
    native = matmuls == "native" and weights.cpu_bf16_matmuls()
    assert backend.decode_weights.head.chunks[0][1].layout == ("onednn" if native else "plain")


# ------------------------------------------------------------------------------------------- the CLI


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_generate_cli_with_chat_prompts_and_thinking_budget(qwen3_vocab_checkpoint, tmp_path):
    prompts = write_lines(
        tmp_path / "in.jsonl",
        [
            {"prompt": "What is 2 + 2?", "answer": "4"},
            {"prompt": [{"role": "user", "content": "Name a prime."}]},
            {"prompt_ids": [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]},
        ],
    )
    out = tmp_path / "out.jsonl"
    options = "--n 2 --max-new-tokens 6 --thinking-budget 3 --top-k 50 --seed 7".split()
    argv = ["--model", str(qwen3_vocab_checkpoint), "--prompts", str(prompts), "--out", str(out), *options]
    assert generate_cli(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = Tokenizer.from_file(str(qwen3_vocab_checkpoint / "tokenizer.json"))
    suffix = tokenizer.encode(THINKING_BUDGET_TEXT, add_special_tokens=False).ids
    expected_order = [(p, s) for p in range(3) for s in range(2)]
    assert [(r["prompt_index"], r["sample_index"]) for r in lines] == expected_order
    assert lines[0]["answer"] == "4"  # input fields travel with the samples
    for r in lines:
        n = len(r["token_ids"])
        assert len(r["logprobs"]) == len(r["entropies"]) == len(r["sample_logprobs"]) == len(r["tokens"]) == n
        assert r["finish_reason"] in ("stop", "length") and isinstance(r["text"], str)
        start, end = r["forced_span"]  # random weights never close </think>: every sample hits the budget
        assert start == 3 and r["token_ids"][start:end] == suffix
        assert r["prompt_ids"][-3:] == [151644, 77091, 198]  # the assistant generation prompt


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"prompt_ids": [1, 2]}', '{"text": "hi"}'], "in.jsonl line 2: needs 'prompt'"),
        (['{"prompt": "   "}'], "in.jsonl line 1: prompt is empty"),
        (['{"prompt_ids": []}'], "in.jsonl line 1: prompt is empty"),
        (['{"prompt_ids": [1, "a"]}'], "line 1: field 'prompt_ids' must be a list of token ids"),
        (['{"prompt_ids": [1]}', "", json.dumps({"prompt_ids": [1] * 600})], "line 3: prompt has 600 tokens"),
        (['{"prompt_ids": [1]}', "{not json"], "in.jsonl line 2: not valid JSON"),
        (['{"prompt": "hello"}'], "line 1: the prompt is text, but"),
        (['{"problem": "1 2 -> 3"}'], "line 1: the prompt is text, but"),  # {problem, ...}: no answer needed
        (['{"prompt": [{"content": "hi"}]}'], "line 1: prompt[0] must be an object with 'role'"),
    ],
)
def test_generate_cli_names_the_bad_line(tiny_checkpoint, tmp_path, capsys, lines, message):
    path, _ = tiny_checkpoint()  # no tokenizer files: prompt_ids only
    prompts = write_lines(tmp_path / "in.jsonl", lines)
    code = generate_cli(["--model", str(path), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_cli_max_batch_tokens_writes_the_same_samples(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint()
    prompts = write_lines(tmp_path / "in.jsonl", [{"prompt_ids": p} for p in PROMPTS])
    argv = ["--model", str(path), "--prompts", str(prompts), "--n", "3", "--max-new-tokens", "8"]
    outputs = []
    for name, options in (("all", []), ("bounded", ["--max-batch-tokens", "30"])):  # 2 slots of 4 + 8 + ...
        assert generate_cli([*argv, "--out", str(tmp_path / name), *options]) == 0
        outputs.append([json.loads(line)["token_ids"] for line in (tmp_path / name).read_text().splitlines()])
    assert outputs[0] == outputs[1]
    assert generate_cli([*argv, "--out", str(tmp_path / "small"), "--max-batch-tokens", "12"]) == 2
    err = capsys.readouterr().err
    assert "forkflow generate: --max-batch-tokens: max_batch_tokens=12 cannot hold one request" in err
    assert "Traceback" not in err and not (tmp_path / "small").exists()


def test_generate_cli_reads_the_layouts_train_and_eval_read(tmp_path):
    """The demo's own data files ({problem, answer}) and verl's layout, rendered as `forkflow train` and `eval`
    render them (one loader); `--thinking-budget 512` works without --max-new-tokens (the README's command)."""
    root = write_rl_setup(tmp_path)  # root/init: a tiny Qwen3 with the demo's tokenizer; root/train.jsonl
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()[:2]]
    rows[1] = {"data_source": "countdown", "prompt": [{"role": "user", "content": rows[1]["problem"]}],
               "reward_model": {"style": "rule", "ground_truth": rows[1]["answer"]}}
    prompts = write_lines(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    argv = ["--model", str(root / "init"), "--prompts", str(prompts), "--out", str(out), "--n", "2"]
    assert generate_cli([*argv, "--thinking-budget", "512"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    expected = load_rl_prompts(prompts, load_tokenizer(root / "init"), chat=True, enable_thinking=True,
                               template=None, max_prompt_tokens=256)
    assert [r["prompt_ids"] for r in lines] == [p.prompt_ids for p in expected for _ in range(2)]
    assert lines[0]["answer"] == rows[0]["answer"] and lines[2]["reward_model"] == rows[1]["reward_model"]


@pytest.mark.parametrize("options,expected", [
    ([], 256),
    (["--thinking-budget", "512"], 512 + 256),  # the default answer budget after the thinking budget
    (["--thinking-budget", "512", "--answer-budget", "100"], 612),
    (["--thinking-budget", "512", "--max-new-tokens", "600"], 600),
])
def test_generate_max_new_tokens_default_leaves_room_after_the_thinking_budget(options, expected):
    args = generate_parser().parse_args(["--model", "m", "--prompts", "p.jsonl", "--out", "o.jsonl", *options])
    assert max_new_tokens(args) == expected
