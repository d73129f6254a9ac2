"""Tests for forkflow.rl: advantages, DAPO filter and shaping, token selection, and the policy loss against
direct hand computations from the formulas (plain Python floats, independent of the library's tensor code)."""

import functools
import math
import multiprocessing
import statistics
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from forkflow.rl import (
    AGGREGATIONS,
    DENOMINATORS,
    advantage_estimator,
    check_loss_saw_selection,
    dynamic_sampling_mask,
    group_statistics,
    grpo_advantages,
    loss_weights,
    overlong_penalty,
    ppo_policy_loss,
    rloo_advantages,
    select_tokens,
    select_tokens_global,
    selection_metrics,
    selection_size,
)

# ---------------------------------------------------------------- advantages


SCORES = [1.0, 0.0, -1.0, 1.0, 1.0, 0.5, 0.0]
GROUPS = [7, 3, 7, 3, 7, 3, 3]  # two prompts, interleaved, unequal group sizes


def _groups():
    by_group = {}
    for score, group in zip(SCORES, GROUPS, strict=True):
        by_group.setdefault(group, []).append(score)
    return by_group


def test_grpo_advantage_matches_hand_computation():
    by_group = _groups()
    expected = [
        (s - statistics.mean(by_group[g])) / (statistics.stdev(by_group[g]) + 1e-6)
        for s, g in zip(SCORES, GROUPS, strict=True)
    ]
    got = grpo_advantages(torch.tensor(SCORES), torch.tensor(GROUPS))
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_dr_grpo_advantage_is_centred_only():
    by_group = _groups()
    expected = [s - statistics.mean(by_group[g]) for s, g in zip(SCORES, GROUPS, strict=True)]
    got = grpo_advantages(torch.tensor(SCORES), torch.tensor(GROUPS), normalize_by_std=False)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_rloo_advantage_subtracts_mean_of_the_others():
    expected = []
    for i, (score, group) in enumerate(zip(SCORES, GROUPS, strict=True)):
        others = [s for j, (s, g) in enumerate(zip(SCORES, GROUPS, strict=True)) if g == group and j != i]
        expected.append(score - sum(others) / len(others))
    got = rloo_advantages(torch.tensor(SCORES), torch.tensor(GROUPS))
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def _equal_and_mixed_groups(value, dtype):
    """Groups of 2..8 copies of `value` (not exact in binary) interleaved with groups of distinct scores."""
    scores, group_ids = [], []
    for size in range(2, 9):
        scores += [value] * size + [0.0, 1.0, value]
        group_ids += [2 * size] * size + [2 * size + 1] * 3
    order = torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))
    return torch.tensor(scores, dtype=dtype)[order], torch.tensor(group_ids)[order]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [0.7, 5.7, 0.1])
@pytest.mark.parametrize(
    "estimator",
    [grpo_advantages, functools.partial(grpo_advantages, normalize_by_std=False), rloo_advantages],
    ids=["grpo", "dr_grpo", "rloo"],
)
def test_a_group_of_equal_scores_gets_exactly_zero_advantage(estimator, value, dtype):
    scores, group_ids = _equal_and_mixed_groups(value, dtype)
    got = estimator(scores, group_ids)
    assert got.dtype == torch.float32
    equal = group_ids % 2 == 0
    assert all(a == 0.0 for a in got[equal].tolist())
    assert all(a != 0.0 for a in got[~equal].tolist())  # the distinct groups still get a signal


def test_group_statistics_of_equal_values_are_exact():
    scores, group_ids = _equal_and_mixed_groups(0.7, torch.float32)
    mean, std, _ = group_statistics(scores, group_ids)
    equal = group_ids % 2 == 0
    assert torch.equal(mean[equal], scores[equal].double())
    assert std[equal].tolist() == [0.0] * int(equal.sum())


def test_advantages_are_chosen_by_name_and_reject_bad_input():
    assert advantage_estimator("grpo") is grpo_advantages
    assert advantage_estimator("rloo") is rloo_advantages
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        advantage_estimator("ppo")
    with pytest.raises(ValueError, match="at least 2 responses per prompt"):
        grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="one score and one group id"):
        grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]))


# ---------------------------------------------------------------- DAPO


def test_dynamic_sampling_keeps_only_groups_with_mixed_correctness():
    correct = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4, 4])  # 3 is a group of one
    keep = dynamic_sampling_mask(correct, groups)
    assert keep.tolist() == [False] * 6 + [True] * 3 + [False] * 3


def test_overlong_penalty_matches_dapo_formula():
    # L_max = 20, L_buf = 4: no penalty up to 16, then linear to -factor at 20, and -factor beyond
    lengths = torch.tensor([3, 16, 17, 18, 19, 20, 21, 400])
    expected = [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert overlong_penalty(lengths, max_length=20, buffer_length=4).tolist() == pytest.approx(expected)
    half = overlong_penalty(lengths, max_length=20, buffer_length=4, factor=0.5)
    assert half.tolist() == pytest.approx([0.5 * x for x in expected])
    with pytest.raises(ValueError, match="buffer_length 30"):
        overlong_penalty(lengths, max_length=20, buffer_length=30)


# ---------------------------------------------------------------- selection


@st.composite
def entropy_batches(draw):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    # few distinct values, so ties are common
    values = draw(
        st.lists(st.sampled_from([0.0, 0.01, 0.5, 0.5, 1.3, 2.0]), min_size=rows * cols, max_size=rows * cols)
    )
    mask = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    ratio = draw(st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]) | st.floats(0.01, 1.0))
    entropy = torch.tensor(values).reshape(rows, cols)
    response_mask = torch.tensor(mask).reshape(rows, cols)
    entropy[~response_mask] = 99.0  # padding is never selected, however high its entropy
    return entropy, response_mask, ratio


@settings(max_examples=150, deadline=None)
@given(entropy_batches())
def test_selection_keeps_exactly_ceil_ratio_n_response_tokens(batch):
    entropy, response_mask, ratio = batch
    n = int(response_mask.sum())
    k = math.ceil(Fraction(str(ratio)) * n)
    top = select_tokens(entropy, response_mask, "top", ratio)
    bottom = select_tokens(entropy, response_mask, "bottom", ratio)
    random = select_tokens(entropy, response_mask, "random", ratio, torch.Generator().manual_seed(0))
    everything = select_tokens(entropy, response_mask, "all", ratio)
    for selected in (top, bottom, random, everything):
        assert selected.shape == entropy.shape and selected.dtype == torch.bool
        assert not (selected & ~response_mask).any()  # never padding
    assert int(top.sum()) == k and int(random.sum()) == k and int(bottom.sum()) == n - k
    assert torch.equal(top | bottom, response_mask) and not (top & bottom).any()
    assert torch.equal(everything, response_mask)
    if 0 < k < n:  # every kept token is at least as uncertain as every dropped one
        assert entropy[top].min() >= entropy[bottom].max()


def test_selection_size_reads_ratio_as_written():
    assert selection_size(30, "top", 0.1) == 3  # binary 0.1 * 30 would round up to 4
    assert selection_size(10, "top", 0.2) == 2
    assert selection_size(11, "top", 0.2) == 3
    assert selection_size(11, "bottom", 0.2) == 8
    assert selection_size(11, "all", 0.2) == 11


def test_selection_ties_still_yield_exactly_k():
    entropy = torch.full((2, 10), 0.7)
    selected = select_tokens(entropy, torch.ones(2, 10, dtype=torch.bool), "top", 0.25)
    assert int(selected.sum()) == 5


def test_selection_carries_no_gradient():
    entropy = torch.rand(2, 6, requires_grad=True)
    selected = select_tokens(entropy, torch.ones(2, 6, dtype=torch.bool), "top", 0.5)
    assert not selected.requires_grad and selected.grad_fn is None


def test_selection_rejects_bad_arguments():
    entropy, mask = torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown token selection mode 'highest'"):
        select_tokens(entropy, mask, "highest")
    with pytest.raises(ValueError, match="ratio 1.5 must be in"):
        select_tokens(entropy, mask, "top", 1.5)
    with pytest.raises(ValueError, match="same shape"):
        select_tokens(entropy, mask[:, :3])
    with pytest.raises(ValueError, match="NaN or inf"):
        select_tokens(torch.full((2, 4), float("nan")), mask)


@pytest.mark.parametrize("mode", ["top", "bottom", "random", "all"])
def test_global_scope_over_one_micro_batch_equals_micro_scope(mode):
    entropy = torch.rand(3, 7, generator=torch.Generator().manual_seed(1))
    response_mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) > 0.3
    micro = select_tokens(entropy, response_mask, mode, 0.2, torch.Generator().manual_seed(3))
    (pooled,) = select_tokens_global([entropy], [response_mask], mode, 0.2, torch.Generator().manual_seed(3))
    assert torch.equal(micro, pooled)


def test_global_scope_ranks_micro_batches_together():
    generator = torch.Generator().manual_seed(4)
    entropies = [torch.rand(2, 5, generator=generator), torch.rand(3, 5, generator=generator) + 0.5]
    masks = [torch.rand(2, 5, generator=generator) > 0.2, torch.rand(3, 5, generator=generator) > 0.2]
    pooled = select_tokens_global(entropies, masks, "top", 0.3)
    whole = select_tokens(torch.cat(entropies), torch.cat(masks), "top", 0.3)
    assert torch.equal(torch.cat(pooled), whole)
    # the second micro-batch is more uncertain, so the pooled top-30% leans to it (micro scope would not)
    assert int(pooled[1].sum()) > selection_size(int(masks[1].sum()), "top", 0.3)


def _rank_selects(rank, init_file, entropy, response_mask, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    (selected,) = select_tokens_global(
        [entropy[rank]], [response_mask[rank]], "top", 0.2, group=dist.group.WORLD
    )
    results.put((rank, selected))
    dist.destroy_process_group()


def test_global_scope_across_ranks_equals_one_process_over_all_data(tmp_path):
    generator = torch.Generator().manual_seed(5)
    entropy = [torch.rand(2, 6, generator=generator), torch.rand(3, 4, generator=generator)]  # uneven ranks
    response_mask = [torch.rand(2, 6, generator=generator) > 0.3, torch.rand(3, 4, generator=generator) > 0.3]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [
        context.Process(target=_rank_selects, args=(r, tmp_path / "init", entropy, response_mask, results))
        for r in range(2)
    ]
    for process in ranks:
        process.start()
    by_rank = dict(results.get(timeout=60) for _ in ranks)
    for process in ranks:
        process.join(timeout=30)
        assert process.exitcode == 0
    values = torch.cat([e[m] for e, m in zip(entropy, response_mask, strict=True)])
    expected = torch.zeros(values.numel(), dtype=torch.bool)
    expected[torch.topk(values, selection_size(values.numel(), "top", 0.2)).indices] = True
    got = torch.cat([by_rank[r][response_mask[r]] for r in range(2)])
    assert torch.equal(got, expected)


def test_selection_metrics_match_hand_values():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 9.0], [0.3, 0.7, 0.2, 0.4]])
    response_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    selected = select_tokens(entropy, response_mask, "top", 0.3)  # ceil(0.3 * 7) = 3: 0.9, 0.7, 0.5
    clipped = torch.tensor([[True, True, False, True], [False, False, False, False]])
    metrics = selection_metrics(entropy, response_mask, selected, clipped)
    assert metrics["select/kept_frac"] == pytest.approx(3 / 7)
    assert metrics["select/threshold"] == pytest.approx(0.5)
    assert metrics["entropy/mean"] == pytest.approx((0.1 + 0.9 + 0.5 + 0.3 + 0.7 + 0.2 + 0.4) / 7)
    assert metrics["entropy/selected_mean"] == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert metrics["entropy/unselected_mean"] == pytest.approx((0.1 + 0.3 + 0.2 + 0.4) / 4)
    # quintiles of the kept tokens 0.5, 0.7, 0.9 (0.9 clipped; 0.1 is clipped but not kept): rank*5//3 = 0, 1, 3
    clipfrac = [metrics[f"select/clipfrac_q{q}"] for q in range(1, 6)]
    assert clipfrac[:2] == [0.0, 0.0] and clipfrac[3] == 1.0 and math.isnan(clipfrac[2]) and math.isnan(clipfrac[4])
    # all tokens kept: entropies 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9 -> quintile rank*5//7 = 0, 0, 1, 2, 2, 3, 4
    metrics = selection_metrics(entropy, response_mask, response_mask, clipped)
    assert [metrics[f"select/clipfrac_q{q}"] for q in range(1, 6)] == [0.5, 0.0, 0.0, 0.0, 1.0]
    assert math.isnan(metrics["entropy/unselected_mean"])


def test_check_loss_saw_selection_fails_loudly_on_a_mismatch():
    check_loss_saw_selection("top", 12, 12)
    with pytest.raises(RuntimeError, match="kept 12 response tokens, but the policy loss trained on 60"):
        check_loss_saw_selection("top", 12, 60)


# ---------------------------------------------------------------- policy loss

CLIP_LOW, CLIP_HIGH, CLIP_DUAL = 0.2, 0.28, 10.0
# (ratio, advantage) per token; rows are sequences. Covers, among selected tokens: inside the trust region,
# A>0 clipped above, A>0 below 1-eps (unclipped), A<0 clipped below, A<0 above 1+eps (unclipped),
# A<0 dual-clipped, A = 0.
RATIOS = [
    [1.0, 1.5, 0.5, 1.1, 12.0],
    [0.7, 1.4, 20.0, 1.0, 0.9],
    [1.2, 0.6, 1.05, 3.0, 1.0],
    [1.3, 0.7, 1.0, 1.0, 1.0],
]
ADVANTAGES = [
    [0.5, 1.0, 2.0, -1.0, -0.5],
    [-1.5, -0.7, -0.3, 0.0, 1.2],
    [1.0, -2.0, -1.0, 0.8, 0.3],
    [1.0, -1.0, 0.5, 0.0, 0.0],
]
RESPONSE = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
SELECTED = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]  # last row: none selected
NUM_SELECTED, NUM_EPS_CLIPPED, NUM_DUAL_CLIPPED = 11, 3, 2  # among selected tokens, counted by hand


def _hand_token(ratio, advantage):
    """(loss, d loss / d log π, eps-clipped, dual-clipped) for one token, from the formulas."""
    clipped_ratio = min(max(ratio, 1 - CLIP_LOW), 1 + CLIP_HIGH)
    unclipped_loss, clipped_loss = -advantage * ratio, -advantage * clipped_ratio
    loss = max(unclipped_loss, clipped_loss)
    eps_clipped = clipped_loss > unclipped_loss
    dual = advantage < 0 and loss > -advantage * CLIP_DUAL
    if dual:
        loss = -advantage * CLIP_DUAL
    gradient = 0.0 if eps_clipped or dual else -advantage * ratio  # d(-A r)/d log π = -A r
    return loss, gradient, eps_clipped, dual


def _hand_coefficients(aggregation, denominator, norm_length):
    """coefficient c_t with L = Σ_t c_t ℓ_t, built from the aggregation formulas."""
    counted = SELECTED if denominator == "selected" else RESPONSE
    per_row = [sum(row) for row in counted]
    rows_in = sum(1 for n in per_row if n > 0)
    coefficients = []
    for row, n in zip(SELECTED, per_row, strict=True):
        if aggregation == "token-mean":
            coefficients.append([s / sum(per_row) for s in row])
        elif aggregation == "seq-mean-token-mean":
            coefficients.append([s / n / rows_in if n else 0.0 for s in row])
        else:
            coefficients.append([s / (rows_in * norm_length) for s in row])
    return coefficients


def _policy_inputs():
    logprobs = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 2
    old_logprobs = logprobs - torch.tensor(RATIOS, dtype=torch.float64).log()
    return logprobs.requires_grad_(), old_logprobs, torch.tensor(ADVANTAGES, dtype=torch.float64)


@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_loss_and_gradient_match_hand_computation(aggregation, denominator):
    logprobs, old_logprobs, advantages = _policy_inputs()
    response, selected = torch.tensor(RESPONSE, dtype=torch.bool), torch.tensor(SELECTED, dtype=torch.bool)
    weights, normaliser = loss_weights(selected, response, aggregation, denominator, norm_length=8)
    out = ppo_policy_loss(logprobs, old_logprobs, advantages, weights)
    (out.loss_sum / normaliser).backward()

    coefficients = _hand_coefficients(aggregation, denominator, norm_length=8)
    loss, gradient, clipped, dual = 0.0, [], 0, 0
    for r in range(len(RATIOS)):
        gradient.append([])
        for t in range(5):
            token_loss, token_gradient, eps_clipped, dual_clipped = _hand_token(
                RATIOS[r][t], ADVANTAGES[r][t]
            )
            loss += coefficients[r][t] * token_loss
            gradient[r].append(coefficients[r][t] * token_gradient)
            clipped += SELECTED[r][t] * eps_clipped
            dual += SELECTED[r][t] * dual_clipped
    # float64 math, float32 weights (1/|D_s| is rounded to float32), hence 1e-6
    assert float(out.loss_sum.detach() / normaliser) == pytest.approx(loss, rel=1e-6)
    assert logprobs.grad.tolist() == [pytest.approx(row, rel=1e-6, abs=1e-12) for row in gradient]
    assert int(out.stats.tokens) == sum(map(sum, SELECTED)) == NUM_SELECTED
    assert (int(out.stats.clipped), int(out.stats.dual_clipped)) == (clipped, dual)
    assert (clipped, dual) == (NUM_EPS_CLIPPED, NUM_DUAL_CLIPPED)  # every branch of the loss is exercised


def test_policy_loss_summed_over_chunks_equals_whole_batch_loss():
    logprobs, old_logprobs, advantages = _policy_inputs()
    weights, normaliser = loss_weights(
        torch.tensor(SELECTED, dtype=torch.bool),
        torch.tensor(RESPONSE, dtype=torch.bool),
        "seq-mean-token-mean",
    )
    whole = ppo_policy_loss(logprobs, old_logprobs, advantages, weights)
    (whole.loss_sum / normaliser).backward()
    whole_gradient, logprobs.grad = logprobs.grad.clone(), None

    flat = [t.reshape(-1) for t in (logprobs, old_logprobs, advantages, weights)]  # packed as [N] chunks
    stats = None
    for chunk in (slice(0, 4), slice(4, 11), slice(11, 20)):
        out = ppo_policy_loss(*(t[chunk] for t in flat))
        (out.loss_sum / normaliser).backward()
        stats = out.stats if stats is None else stats + out.stats
    assert torch.allclose(logprobs.grad, whole_gradient)
    assert stats.metrics() == pytest.approx(whole.stats.metrics())
    assert stats.metrics()["pg/clipfrac"] == pytest.approx(NUM_EPS_CLIPPED / NUM_SELECTED)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_and_entropy_terms_match_hand_computation(estimator):
    logprobs = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    ref_logprobs = torch.tensor([-1.2, -1.5, -0.5], dtype=torch.float64)
    entropy = torch.tensor([0.3, 1.1, 2.0], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)  # no policy-gradient term: ratio 1, advantage 0
    out = ppo_policy_loss(
        logprobs,
        logprobs.detach(),
        zero,
        weights,
        ref_logprobs=ref_logprobs,
        kl_coef=0.1,
        kl_estimator=estimator,
        entropy=entropy,
        entropy_coef=0.01,
    )
    out.loss_sum.backward()
    expected_loss, expected_gradient = 0.0, []
    for lp, ref, h, w in zip(
        logprobs.tolist(), ref_logprobs.tolist(), entropy.tolist(), weights.tolist(), strict=True
    ):
        if estimator == "k1":
            kl, kl_gradient = lp - ref, 1.0
        else:  # e^d - d - 1, d = ref - lp
            kl, kl_gradient = math.exp(ref - lp) - (ref - lp) - 1, -math.exp(ref - lp) + 1
        expected_loss += w * (0.1 * kl - 0.01 * h)
        expected_gradient.append(w * 0.1 * kl_gradient)
    assert float(out.loss_sum.detach()) == pytest.approx(expected_loss, rel=1e-9)
    assert logprobs.grad.tolist() == pytest.approx(expected_gradient)
    assert entropy.grad.tolist() == pytest.approx([-0.01, -0.01, 0.0])


def test_empty_selection_gives_zero_loss_not_nan():
    weights, normaliser = loss_weights(
        torch.zeros(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    )
    out = ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), weights)
    assert float(out.loss_sum / normaliser) == 0.0


def test_policy_loss_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo_policy_loss(x, x, torch.zeros(2), x)
    with pytest.raises(ValueError, match="pass the reference policy"):
        ppo_policy_loss(x, x, x, x, kl_coef=0.1)
    with pytest.raises(ValueError, match="unknown KL estimator 'k2'"):
        ppo_policy_loss(x, x, x, x, ref_logprobs=x, kl_estimator="k2")
    with pytest.raises(ValueError, match="dual clip"):
        ppo_policy_loss(x, x, x, x, clip_dual=1.1)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        loss_weights(x.bool(), x.bool(), "mean")
    with pytest.raises(ValueError, match="unknown loss denominator"):
        loss_weights(x.bool(), x.bool(), denominator="some")
    with pytest.raises(ValueError, match=r"must both be \[B, T\]"):
        loss_weights(x.bool().reshape(-1), x.bool().reshape(-1))


def test_truncated_importance_weights_scale_the_policy_term_only():
    """TIS (verl's tis_imp_ratio_cap): ℓ_t = ρ_t · ℓ_pg,t + β · KL_t with ρ_t = min(π_old / π_rollout, C) given;
    loss and gradient against the hand formulas, every clip branch included."""
    logprobs, old_logprobs, advantages = _policy_inputs()
    weights = torch.tensor(SELECTED, dtype=torch.float64)
    tis = torch.rand(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    ref_logprobs = old_logprobs - 0.1
    out = ppo_policy_loss(logprobs, old_logprobs, advantages, weights, tis_weights=tis, ref_logprobs=ref_logprobs,
                          kl_coef=0.1, kl_estimator="k1")
    out.loss_sum.backward()
    loss, gradient = 0.0, []
    for r in range(len(RATIOS)):
        gradient.append([])
        for t in range(5):
            token_loss, token_gradient, _, _ = _hand_token(RATIOS[r][t], ADVANTAGES[r][t])
            rho, w, lp, ref = float(tis[r, t]), SELECTED[r][t], float(logprobs[r, t]), float(ref_logprobs[r, t])
            loss += w * (rho * token_loss + 0.1 * (lp - ref))
            gradient[r].append(w * (rho * token_gradient + 0.1))
    assert float(out.loss_sum.detach()) == pytest.approx(loss, rel=1e-9)
    assert logprobs.grad.tolist() == [pytest.approx(row, rel=1e-9, abs=1e-12) for row in gradient]
