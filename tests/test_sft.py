"""SFT: assistant-only loss masks, data errors that name file and line, training that lowers the loss,
exact resume from a checkpoint, padded batching, and the `forkflow sft` command on configs/sft_tiny.yaml (the
metrics log: tests/test_logging.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from forkflow import cli
from forkflow.chat import load_tokenizer
from forkflow.config import load_config
from forkflow.jsonl import InputError, write_jsonl
from forkflow.models.checkpoint import read_state_dict
from forkflow.run_dir import MARKER
from forkflow.train.sft import SFTConfig, train
from forkflow.train.sft_data import load_sft_examples, sft_example
from forkflow.train.state import OptimConfig, lr_factor

ROOT = Path(__file__).resolve().parents[1]
def masked_text(tok, example):
    return tok.decode([t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m])


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_loss_mask_covers_assistant_turns_only(char_tokenizer_dir):
    tok = load_tokenizer(char_tokenizer_dir)
    example = sft_example(tok, CONVERSATION)
    assert masked_text(tok, example) == "Hello!<|im_end|>4<|im_end|>"
    assert tok.decode(example.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)


def test_loss_mask_with_the_qwen3_tokenizer(qwen3_tokenizer_dir):
    tok = load_tokenizer(qwen3_tokenizer_dir)
    example = sft_example(tok, CONVERSATION)
    assert example.input_ids == tok.encode(tok.apply_chat_template(CONVERSATION, tokenize=False))
    assert masked_text(tok, example).replace("<think>\n\n</think>\n\n", "") == "Hello!<|im_end|>4<|im_end|>"


BAD_ROWS = {
    "not json": ("{oops", "not valid JSON"),
    "no fields": ({"text": "hi"}, "expected 'messages', or 'prompt' and 'response'"),
    "bad role": ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] must be an object with"),
    "no assistant": ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    "prompt not text": ({"prompt": 3, "response": "x"}, "field 'prompt' must be a string"),
    "empty messages": ({"messages": []}, "non-empty list"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_are_reported_with_file_and_line(case, tmp_path, char_tokenizer_dir):
    row, message = BAD_ROWS[case]
    path = tmp_path / "data.jsonl"
    bad_line = row if isinstance(row, str) else json.dumps(row)
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + bad_line + "\n")
    with pytest.raises(InputError, match=f"data.jsonl line 2: .*{re.escape(message)}"):
        load_sft_examples(path, load_tokenizer(char_tokenizer_dir))


def test_parquet_rows(tmp_path, char_tokenizer_dir):
    pq.write_table(pa.Table.from_pylist([{"prompt": "Hi", "response": "Yo"}, {"prompt": None, "response": "x"}]),
                   tmp_path / "data.parquet")
    with pytest.raises(InputError, match="data.parquet row 1: field 'prompt'"):
        load_sft_examples(tmp_path / "data.parquet", load_tokenizer(char_tokenizer_dir))
    pq.write_table(pa.Table.from_pylist([{"messages": CONVERSATION}]), tmp_path / "data.parquet")
    tok = load_tokenizer(char_tokenizer_dir)
    assert load_sft_examples(tmp_path / "data.parquet", tok)[0].input_ids == sft_example(tok, CONVERSATION).input_ids


def test_lr_schedule():
    optim = OptimConfig(warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, optim, 12) for s in range(12)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(factors[2:-1], factors[3:], strict=True))
    assert factors[-1] > 0.1
    assert lr_factor(7, OptimConfig(schedule="constant"), 12) == 1.0


def write_synthetic_set(path: Path, n: int = 16) -> None:
    """Additions, some as chat messages and some as prompt/response pairs, a few long enough to be split."""
    rows = []
    for i in range(n):
        a, b = (7 * i) % 23, (5 * i + 3) % 19
        answer = f"{a} + {b} = {a + b}." + (" Checking: it is indeed so." * (i % 4 == 0))
        if i % 2:
            rows.append({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                                      {"role": "assistant", "content": answer}]})
        else:
            rows.append({"prompt": f"add {a} and {b}", "response": answer})
    write_jsonl(path, rows)


@pytest.fixture
def sft_setup(tmp_path, tiny_checkpoint, char_tokenizer_dir):
    model_dir, _ = tiny_checkpoint()
    data = tmp_path / "sft.jsonl"
    write_synthetic_set(data)
    return [f"model.path={model_dir}", f"model.tokenizer={char_tokenizer_dir}", f"data.train={data}",
            "progress=false"]


def run_sft(overrides: list[str]) -> list[dict]:
    cfg = load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml", overrides)
    train(cfg)
    return [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]


def test_sft_lowers_the_loss_and_resumes_exactly(sft_setup, tmp_path):
    common = [*sft_setup, "batch_size=4", "max_steps=12", "save_every=6", "chunkflow.chunk_size=24",
              "chunkflow.keep=2", "optim.lr=0.01"]
    full = run_sft([*common, f"out={tmp_path / 'full'}"])
    assert [r["step"] for r in full] == list(range(1, 13))
    assert any(r["chunks"] > 4 for r in full)  # some conversations were split into dependent chunks
    first, last = full[:4], full[-4:]
    assert sum(r["loss"] for r in last) < 0.7 * sum(r["loss"] for r in first)

    # a run interrupted after step 6: its step-6 checkpoint and (more) metrics lines survive
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000006",
                    resumed_dir / "checkpoints" / "step-00000006")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", resumed_dir / "metrics.jsonl")
    shutil.copy(tmp_path / "full" / MARKER, resumed_dir / MARKER)  # a forkflow run: it may be resumed
    resumed = run_sft([*common, f"out={resumed_dir}"])
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full]
    final_full = read_state_dict(tmp_path / "full" / "model")
    final_resumed = read_state_dict(resumed_dir / "model")
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


def test_padded_batching_gives_the_chunkflow_steps(sft_setup, tmp_path):
    common = [*sft_setup, "batch_size=4", "max_steps=2", "chunkflow.chunk_size=24", "chunkflow.keep=2"]
    chunkflow = run_sft([*common, f"out={tmp_path / 'chunkflow'}"])
    padded = run_sft([*common, f"out={tmp_path / 'padded'}", "chunkflow.batching=padded",
                      "chunkflow.micro_batch_size=3"])
    assert any(r["chunks"] > 4 for r in chunkflow) and all(r["chunks"] == 2 for r in padded)  # 4 = 3 + 1
    for a, b in zip(chunkflow, padded, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_sft_command_writes_checkpoints_and_a_hf_model_and_export_matches(sft_setup, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["sft", str(ROOT / "configs" / "sft_tiny.yaml"), *sft_setup, f"out={out}", "max_steps=2",
                     "precision=bf16"]) == 0
    checkpoint = out / "checkpoints" / "step-00000002"
    assert {"config.json", "state", "tokenizer", "trainer_state.pt", "sft.yaml"} <= {
        p.name for p in checkpoint.iterdir()}
    assert not list((out / "checkpoints").glob(".tmp-*"))
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(out / "model")  # the final model: a Hugging Face directory
    assert (out / "model" / "tokenizer.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    # `forkflow export` of the last checkpoint gives the same weights and a loadable tokenizer
    assert cli.main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0
    exported, final = read_state_dict(tmp_path / "exported"), read_state_dict(out / "model")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")


def test_export_names_a_missing_shard(sft_setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["sft", str(ROOT / "configs" / "sft_tiny.yaml"), *sft_setup, f"out={out}", "max_steps=1"]) == 0
    checkpoint = out / "checkpoints" / "step-00000001"
    shard = next((checkpoint / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a crash mid-write
    assert cli.main(["export", str(checkpoint), str(tmp_path / "exported")]) == 2
    assert f"{shard}: shard file is truncated" in capsys.readouterr().err
    shard.unlink()
    assert cli.main(["export", str(checkpoint), str(tmp_path / "exported")]) == 2
    assert f"{shard}: shard file is missing" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("chunkflow.chunk_sise=8", "did you mean 'chunk_size'"),
    ("chunkflow.keep=0", "chunkflow.keep must be >= 1"),
    ('model.path=""', "model.path is required"),
])
def test_sft_command_reports_config_errors(override, message, sft_setup, tmp_path, capsys):
    argv = ["sft", str(ROOT / "configs" / "sft_tiny.yaml"), *sft_setup, f"out={tmp_path}", override]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
