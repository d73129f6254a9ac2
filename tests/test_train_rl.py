"""The RLVR trainer end to end on a tiny model: the update's gradient against a direct computation of the
forking-token DAPO loss, metrics, exact resume, interrupted checkpoints, and bad data."""

import json
import math
import shutil
import sys

import pytest
import torch

from forkflow import cli
from forkflow.config import load_config
from forkflow.demo.task import build_char_tokenizer, make_problems
from forkflow.distributed import latest_checkpoint
from forkflow.jsonl import InputError, write_jsonl
from forkflow.models import Qwen3Config, Qwen3ForCausalLM, from_pretrained, save_pretrained
from forkflow.rewards import VerifierPool
from forkflow.rl import select_tokens
from forkflow.rollout import weights
from forkflow.train.rl import Response, RLConfig, RLTrainer


def write_rl_setup(root, moe: bool = False, head_dim: int = 8):
    """root/init: a tiny random Qwen3 (tied embeddings; MoE: 4 experts, top-2) with the demo's character
    tokenizer; root/train.jsonl: 40 countdown problems. (vLLM's CPU attention needs head_dim >= 32.)"""
    tokenizer_dir = build_char_tokenizer(root / "init")
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True) if moe else {}
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256, rope_theta=1e4,
                      tie_word_embeddings=True, **experts)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(0.1)
    save_pretrained(model, tokenizer_dir)
    problems = make_problems(0)[:40]
    write_jsonl(root / "train.jsonl", ({"problem": p["prompt"], "answer": p["answer"]} for p in problems))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_rl_setup(tmp_path_factory.mktemp("rl"))


def tiny_overrides(root, out, **overrides) -> list[str]:
    items = [f"model.path={root / 'init'}", f"data.train={root / 'train.jsonl'}", f"out={out}",
             "prompts_per_step=2", "mini_batch_prompts=1", "steps=2", "rollout.n=4", "rollout.max_new_tokens=12",
             "reward.verifier=countdown", "algo.dynamic_sampling=false", "chunkflow.chunk_size=24",
             "optim.lr=1e-3", "device=cpu", "progress=false", "reward.workers=1"]
    return items + [f"{k}={v}" for k, v in overrides.items()]


def tiny_config(root, out, **overrides) -> RLConfig:
    return load_config(RLConfig, None, tiny_overrides(root, out, **overrides))


def random_batch(seed=0, size=6) -> list[Response]:
    """Random prompts and responses (two groups of three), advantages -1, 0, 1, 0 reward."""
    g = torch.Generator().manual_seed(seed)
    return [Response(i // 3, torch.randint(5, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g),
                     torch.randint(5, 40, (int(torch.randint(2, 11, (1,), generator=g)),), generator=g),
                     False, 0.0, False, advantage=float(i % 3) - 1.0) for i in range(size)]


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_update_gradient_equals_direct_formula(setup, tmp_path, entropy_coef):
    """ChunkFlow update (sequences split across chunks) vs. a plain full forward of the DAPO loss (with an
    entropy bonus −α·H_t on the selected tokens when α ≠ 0)."""
    trainer = RLTrainer(tiny_config(setup, tmp_path / "run", **{"chunkflow.chunk_size": 7,
                                                               "algo.entropy_coef": entropy_coef}))
    batch = random_batch()
    model = trainer.model
    old = [torch.full((len(r.token_ids),), -3.0) for r in batch]  # a fixed old policy: ratios ≠ 1, clipping bites
    model.zero_grad()
    metrics = trainer.accumulate_gradients(batch, old)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    R = max(len(r.token_ids) for r in batch)
    ent, mask = torch.zeros(len(batch), R), torch.zeros(len(batch), R, dtype=bool)
    rows, entropies = [], []
    for b, r in enumerate(batch):
        ids = torch.cat([r.prompt_ids, r.token_ids])[None]
        logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1]  # predicting each response token
        logp = torch.log_softmax(logits, -1)
        lp = logp.gather(1, r.token_ids[:, None])[:, 0]
        rows.append(lp)
        entropies.append(-(logp.exp() * logp).sum(-1))
        ent[b, : len(lp)] = entropies[-1].detach()
        mask[b, : len(lp)] = True
    selected = select_tokens(ent, mask, "top", 0.2)
    assert int(selected.sum()) == math.ceil(0.2 * int(mask.sum()))
    loss = 0
    for b, (r, lp) in enumerate(zip(batch, rows, strict=True)):
        ratio = torch.exp(lp - (-3.0))
        a = r.advantage
        clipped = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
        if a < 0:
            clipped = torch.minimum(clipped, torch.full_like(clipped, -a * 10.0))
        loss = loss + ((clipped - entropy_coef * entropies[b]) * selected[b, : len(lp)]).sum()
    (loss / selected.sum()).backward()
    assert metrics["select/kept_frac"] == pytest.approx(int(selected.sum()) / int(mask.sum()))
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_padded_batching_gives_the_chunkflow_gradients(setup, tmp_path):
    """chunkflow.batching=padded runs both passes in right-padded micro-batches: same selection, same loss."""
    batch = random_batch(1)
    old = [torch.full((len(r.token_ids),), -2.5) for r in batch]
    grads, metrics = [], []
    for batching in ("chunkflow", "padded"):
        trainer = RLTrainer(tiny_config(setup, tmp_path / batching, **{
            "chunkflow.batching": batching, "chunkflow.chunk_size": 5, "chunkflow.micro_batch_size": 4}))
        calls = []  # the shapes of the model's forwards
        trainer.model.register_forward_pre_hook(lambda module, args, record=calls.append: record(args[0].shape))
        trainer.model.zero_grad()
        metrics.append(trainer.accumulate_gradients(batch, old))
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        if batching == "padded":  # 6 sequences in micro-batches of 4 and 2, twice (no-grad pass, grad pass)
            widths = [max(len(r.prompt_ids) + len(r.token_ids) for r in part) for part in (batch[:4], batch[4:])]
            assert [tuple(c) for c in calls] == [(4, widths[0]), (2, widths[1])] * 2
        else:
            assert all(shape[0] == 1 and shape[1] <= 5 for shape in calls)
    assert metrics[0]["select/kept_frac"] == metrics[1]["select/kept_frac"]
    assert metrics[0]["pg/loss"] == pytest.approx(metrics[1]["pg/loss"], abs=1e-6)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


SAMPLING = {  # (temperature, top_p): whether the rollout's own statistics are the update's quantities
    (1.0, 1.0): True,  # the engine's T = 1 log-probs
    (0.7, 1.0): True,  # its sampling log-probs, unfiltered at T
    (1.0, 0.9): True,  # T = 1 log-probs are of the unfiltered distribution whatever top-p keeps
    (0.7, 0.9): False,  # sampling log-probs after top-p: not log softmax(z/T), recomputed
}


@pytest.mark.parametrize(("temperature", "top_p"), SAMPLING)
def test_rollout_statistics_are_the_updates_or_absent(setup, tmp_path, temperature, top_p):
    trainer = RLTrainer(tiny_config(setup, tmp_path / "run", **{
        "rollout.temperature": temperature, "rollout.top_p": top_p, "rollout.max_new_tokens": 16}))
    with VerifierPool(1, 10.0) as pool:
        batch, _ = trainer.generate_batch(pool, {"gen": 0.0, "reward": 0.0})
    if not SAMPLING[temperature, top_p]:
        assert all(r.rollout_logprobs is None and r.rollout_entropies is None for r in batch)
        return
    logprobs, entropies = trainer.response_statistics(trainer.model, batch)  # a teacher-forced forward
    for r, lp, ent in zip(batch, logprobs, entropies, strict=True):
        assert torch.allclose(r.rollout_logprobs, lp, atol=1e-5), (r.rollout_logprobs, lp)
        assert torch.allclose(r.rollout_entropies, ent, atol=1e-5)
    bf16 = RLTrainer(tiny_config(setup, tmp_path / "bf16", precision="bf16"))
    sample = trainer.backend.generate([batch[0].prompt_ids.tolist()], trainer.sampling(0))[0][0]
    assert bf16.rollout_statistics(sample) == (None, None)


def run_step(trainer, monkeypatch) -> tuple[list[dict], int]:
    """One train_step; returns each mini-batch update's gradients and the number of no-grad forwards."""
    grads, forwards = [], []
    accumulate, statistics = trainer.accumulate_gradients, trainer.response_statistics

    def recorded(*args):
        metrics = accumulate(*args)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return metrics

    monkeypatch.setattr(trainer, "accumulate_gradients", recorded)
    monkeypatch.setattr(trainer, "response_statistics", lambda *a: forwards.append(1) or statistics(*a))
    with VerifierPool(1, 10.0) as pool:
        trainer.train_step(pool)
    return grads, len(forwards)


def test_reusing_the_rollout_statistics_gives_the_recomputed_gradients(setup, tmp_path, monkeypatch):
    """Two mini-batches (no optimizer steps, so both runs see the same weights): the rollout's entropies rank the
    first and its log-probs are the second's π_old, against the same from teacher-forced no-grad forwards."""
    cfg = {"rollout.max_new_tokens": 16, "select.scope": "mini"}
    reused = RLTrainer(tiny_config(setup, tmp_path / "reused", **cfg))
    monkeypatch.setattr(reused.optimizer, "step", lambda *args, **kwargs: None)
    got, forwards = run_step(reused, monkeypatch)
    assert forwards == 1  # the second mini-batch's ranking only
    forced = RLTrainer(tiny_config(setup, tmp_path / "forced", **cfg))
    monkeypatch.setattr(forced.optimizer, "step", lambda *args, **kwargs: None)
    monkeypatch.setattr(RLTrainer, "reuses_rollout_statistics", property(lambda self: False))
    want, forwards = run_step(forced, monkeypatch)
    assert forwards == 2  # π_old of the batch before the first update, the second mini-batch's ranking
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        for n in a:
            assert torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4), n


def test_filtered_sampling_recomputes(setup, tmp_path, monkeypatch):
    trainer = RLTrainer(tiny_config(setup, tmp_path / "run", prompts_per_step=1, **{
        "rollout.temperature": 0.7, "rollout.top_p": 0.9}))
    assert run_step(trainer, monkeypatch)[1] == 1  # one mini-batch: its ranking forward
    trainer = RLTrainer(tiny_config(setup, tmp_path / "unfiltered", prompts_per_step=1, **{
        "rollout.temperature": 0.7}))
    assert run_step(trainer, monkeypatch)[1] == 0  # ranked by the rollout's entropies, on-policy


def test_train_command_writes_metrics_and_a_transformers_checkpoint(setup, tmp_path):
    """`forkflow train configs/rl_tiny.yaml` (top-20 %), pointed at the tiny model and data."""
    argv = ["train", "configs/rl_tiny.yaml", *tiny_overrides(setup, tmp_path / "run"),
            f"eval.files=[{setup / 'train.jsonl'}]", "eval.k=2"]
    assert cli.main(argv) == 0
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward/mean", "acc/mean", "response_len/mean", "response_len/clip_frac", "entropy/mean",
                "entropy/selected_mean", "select/kept_frac", "pg/clipfrac", "grad_norm", "lr", "time/gen_s",
                "time/reward_s", "time/update_s", "time/step_s", "tokens_per_s", "select/clipfrac_q5"):
        assert key in records[0], key
    assert all(0.19 < r["select/kept_frac"] < 0.3 for r in records)
    assert records[0]["entropy/selected_mean"] > records[0]["entropy/mean"]
    assert "eval/train/avg@2" in records[-1] and (tmp_path / "run" / "config.yaml").is_file()
    import transformers

    transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "run" / "model")  # the final model: Hugging Face


def test_resume_continues_exactly(setup, tmp_path):
    RLTrainer(tiny_config(setup, tmp_path / "full", steps=3)).train()
    RLTrainer(tiny_config(setup, tmp_path / "cut", steps=2)).train()
    # an interrupted save of a later step must be ignored on resume
    partial = tmp_path / "cut" / "checkpoints" / ".tmp-step-00000003"
    partial.mkdir()
    (partial / "config.json").write_text("{")
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000002"
    RLTrainer(tiny_config(setup, tmp_path / "cut", steps=3)).train()
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut] == [1, 2, 3]
    for a, b in zip(full, cut, strict=True):
        assert a["reward/mean"] == b["reward/mean"] and a["pg/loss"] == pytest.approx(b["pg/loss"], abs=1e-7)
    wa = from_pretrained(tmp_path / "full" / "model").state_dict()
    wb = from_pretrained(tmp_path / "cut" / "model").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-7) for k in wa)


def test_bad_rows_name_file_and_line(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    shutil.copy(setup / "train.jsonl", bad)
    with open(bad, "a") as f:
        f.write(json.dumps({"problem": "2+2?"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl line 41: field 'answer' is missing"):
        RLTrainer(tiny_config(setup, tmp_path / "run", **{"data.train": bad}))


def test_tis_weights_and_the_rollout_gap_follow_their_formulas(setup, tmp_path):
    """ρ_t = min(exp(log π_old − log π_rollout), C), 1 on tokens the rollout did not draw (NaN: a forced
    thinking-budget suffix); the gap metric is |log π_old − log π_rollout| over the drawn tokens."""
    trainer = RLTrainer(tiny_config(setup, tmp_path / "run", **{"algo.tis_cap": 2.0}))
    batch = random_batch(size=2)
    batch[0].sampler_logprobs = torch.tensor([-1.0, -3.0, float("nan")] + [-1.0] * (len(batch[0].token_ids) - 3))
    batch[1].sampler_logprobs = torch.full((len(batch[1].token_ids),), -0.5)
    old = [torch.full((len(r.token_ids),), -1.5) for r in batch]
    rho = trainer.tis_weights(batch, old)
    assert rho[0][:3].tolist() == pytest.approx([math.exp(-0.5), 2.0, 1.0])  # exp(1.5) capped at C = 2
    assert rho[1].tolist() == pytest.approx([math.exp(-1.0)] * len(batch[1].token_ids))
    gaps = [0.5, 1.5] + [0.5] * (len(batch[0].token_ids) - 3) + [1.0] * len(batch[1].token_ids)
    metrics = trainer.off_policy_metrics(batch, old)
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx(sum(gaps) / len(gaps))
    assert metrics["rollout/logprob_diff_max"] == 1.5


def test_bf16_rollouts_sample_from_a_cast_copy_and_log_the_gap(setup, tmp_path, monkeypatch, capsys):
    """rollout.dtype=bf16: the torch backend holds its own bf16 weights, loaded from the fp32 trainer each step;
    the trainer recomputes π_old in fp32, and the rollout-vs-trainer gap is bf16 rounding: above 0, small.
    On a CPU without bf16 matmuls (made so here) the run warns that fp32 samples faster, and still trains."""
    monkeypatch.setattr(weights, "cpu_bf16_matmuls", lambda: False)
    trainer = RLTrainer(tiny_config(setup, tmp_path / "run", steps=1, **{"rollout.dtype": "bf16"}))
    err = capsys.readouterr().err
    assert "without bf16 matmuls" in err and "rollout.dtype=fp32 is faster" in err, err
    assert trainer.syncs_weights and not trainer.reuses_rollout_statistics
    trainer.train()
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < record["rollout/logprob_diff_mean"] < 0.05 and record["rollout/logprob_diff_max"] < 0.5, record
    assert next(trainer.backend.model.parameters()).is_meta  # released after the rollout


def test_a_bounded_rollout_batch_trains_the_same(setup, tmp_path):
    """rollout.max_batch_tokens: the round's 8 requests decode 2 or 3 at a time (continuous batching) and the
    step gives the unbounded step's responses, rewards and weights."""
    runs = {}
    for name, bound in (("all", 0), ("bounded", 152)):  # 2 x (data.max_prompt_tokens + rollout.max_new_tokens)
        trainer = RLTrainer(tiny_config(setup, tmp_path / name, steps=1, **{"data.max_prompt_tokens": 64,
                                                                            "rollout.max_batch_tokens": bound}))
        assert trainer.backend.max_batch_tokens == (bound or None)
        trainer.train()
        runs[name] = (json.loads((tmp_path / name / "metrics.jsonl").read_text()),
                      from_pretrained(tmp_path / name / "model").state_dict())
    (a, wa), (b, wb) = runs["all"], runs["bounded"]
    assert a["reward/mean"] == b["reward/mean"] and a["response_len/mean"] == b["response_len/mean"]
    assert a["pg/loss"] == pytest.approx(b["pg/loss"], abs=1e-6)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_the_vllm_backend_without_vllm_is_one_line_naming_the_fix(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as where the extra is not installed
    argv = ["train", "configs/rl_tiny.yaml", *tiny_overrides(setup, tmp_path / "run", **{"rollout.backend": "vllm"}),
            "eval.files=[]"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "rollout.backend" in err and "make setup-vllm" in err and "Traceback" not in err
