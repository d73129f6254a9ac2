"""The RLVR trainer end to end on a tiny model: the update's gradient against a direct computation of the
forking-token DAPO loss, metrics, exact resume, interrupted checkpoints, and bad data."""

import json
import math
import shutil

import pytest
import torch

from forkflow.config import load_config
from forkflow.demo.task import build_char_tokenizer, make_problems
from forkflow.jsonl import InputError, write_jsonl
from forkflow.models import Qwen3Config, Qwen3ForCausalLM, from_pretrained
from forkflow.rl import select_tokens
from forkflow.train.rl import Response, RLConfig, RLTrainer
from forkflow.train.state import latest_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    tokenizer_dir = build_char_tokenizer(root / "init")
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=1e4,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(0.1)
    model.save_pretrained(tokenizer_dir)
    problems = make_problems(0)[:40]
    write_jsonl(root / "train.jsonl", ({"problem": p["prompt"], "answer": p["answer"]} for p in problems))
    return root


def tiny_config(root, out, **overrides) -> RLConfig:
    items = [f"model.path={root / 'init'}", f"data.train={root / 'train.jsonl'}", f"out={out}",
             "prompts_per_step=2", "mini_batch_prompts=1", "steps=2", "rollout.n=4", "rollout.max_new_tokens=12",
             "reward.verifier=countdown", "algo.dynamic_sampling=false", "chunkflow.chunk_size=24",
             "optim.lr=1e-3", "device=cpu", "progress=false", "reward.workers=1"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(RLConfig, None, items)


def test_update_gradient_equals_direct_formula(setup, tmp_path):
    """ChunkFlow update (sequences split across chunks) vs. a plain full forward of the DAPO loss."""
    trainer = RLTrainer(tiny_config(setup, tmp_path / "run", **{"chunkflow.chunk_size": 7}))
    g = torch.Generator().manual_seed(0)
    batch = [Response(i // 3, torch.randint(5, 40, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g),
                      torch.randint(5, 40, (int(torch.randint(2, 11, (1,), generator=g)),), generator=g),
                      False, 0.0, False, advantage=float(i % 3) - 1.0) for i in range(6)]
    model = trainer.model
    old = [torch.cat([torch.zeros(len(r.prompt_ids) - 1), torch.full((len(r.token_ids),), -3.0), torch.zeros(1)])
           for r in batch]  # position space: a fixed old policy so ratios differ from 1 and clipping bites
    model.zero_grad()
    metrics = trainer.accumulate_gradients(batch, old, 0)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    R = max(len(r.token_ids) for r in batch)
    ent, mask = torch.zeros(len(batch), R), torch.zeros(len(batch), R, dtype=bool)
    rows = []
    for b, r in enumerate(batch):
        ids = torch.cat([r.prompt_ids, r.token_ids])[None]
        logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1]  # predicting each response token
        lp = torch.log_softmax(logits, -1).gather(1, r.token_ids[:, None])[:, 0]
        p = torch.softmax(logits, -1)
        rows.append(lp)
        ent[b, : len(lp)] = -(p * p.log()).sum(-1).detach()
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
        loss = loss + (clipped * selected[b, : len(lp)]).sum()
    (loss / selected.sum()).backward()
    assert metrics["select/kept_frac"] == pytest.approx(int(selected.sum()) / int(mask.sum()))
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_train_writes_metrics_and_a_transformers_checkpoint(setup, tmp_path):
    last = RLTrainer(tiny_config(setup, tmp_path / "run")).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward/mean", "acc/mean", "response_len/mean", "response_len/clip_frac", "entropy/mean",
                "entropy/selected_mean", "select/kept_frac", "pg/clipfrac", "grad_norm", "lr", "time/gen_s",
                "time/reward_s", "time/update_s", "time/step_s", "tokens_per_s", "select/clipfrac_q5"):
        assert key in records[0], key
    assert all(0.19 < r["select/kept_frac"] < 0.3 for r in records)
    assert records[0]["entropy/selected_mean"] > records[0]["entropy/mean"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    import transformers

    transformers.Qwen3ForCausalLM.from_pretrained(last)  # the checkpoint is a Hugging Face directory


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
    wa = from_pretrained(latest_checkpoint(tmp_path / "full")).state_dict()
    wb = from_pretrained(latest_checkpoint(tmp_path / "cut")).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-7) for k in wa)


def test_bad_rows_name_file_and_line(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    shutil.copy(setup / "train.jsonl", bad)
    with open(bad, "a") as f:
        f.write(json.dumps({"problem": "2+2?"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl line 41: field 'answer' is missing"):
        RLTrainer(tiny_config(setup, tmp_path / "run", **{"data.train": bad}))
