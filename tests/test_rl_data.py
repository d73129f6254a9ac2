"""The prompt loader every command shares (forkflow/train/rl_data.py): a parquet file in verl's layout
(data_source, prompt as chat messages, reward_model.ground_truth, extra_info) read by `forkflow train`, `eval`,
`generate` and `entropy score` out of the box (pyarrow is a core dependency), rendered the same as the same
rows in JSON lines and as the demo's {problem, answer} layout."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forkflow import cli
from forkflow.chat import load_tokenizer
from forkflow.demo.task import make_problems
from forkflow.jsonl import InputError, write_jsonl
from forkflow.train.rl_data import load_rl_prompts, row_prompt
from tests.test_train_rl import tiny_overrides, write_rl_setup


def verl_row(index: int, problem: dict) -> dict:
    """One row as verl's data preprocessing scripts write them."""
    return {
        "data_source": "countdown",
        "prompt": [{"role": "user", "content": problem["prompt"]}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": problem["answer"]},
        "extra_info": {"split": "train", "index": index},
    }


@pytest.fixture(scope="module")
def verl(tmp_path_factory):
    """root/init (a tiny Qwen3 with the demo's tokenizer), root/train.parquet in verl's layout (4 rows) and the
    same problems as root/train.jsonl ({problem, answer})."""
    root = write_rl_setup(tmp_path_factory.mktemp("verl"))
    problems = make_problems(0)[:4]
    pq.write_table(pa.Table.from_pylist([verl_row(i, p) for i, p in enumerate(problems)]), root / "train.parquet")
    write_jsonl(root / "train.jsonl", ({"problem": p["prompt"], "answer": p["answer"]} for p in problems))
    return root


def test_verl_parquet_renders_like_problem_answer_rows(verl):
    tokenizer = load_tokenizer(verl / "init")
    options = dict(chat=True, enable_thinking=True, template=None, max_prompt_tokens=64)
    parquet = load_rl_prompts(verl / "train.parquet", tokenizer, **options)
    plain = load_rl_prompts(verl / "train.jsonl", tokenizer, **options)
    assert [p.prompt_ids for p in parquet] == [p.prompt_ids for p in plain]
    assert [(p.ground_truth, p.data_source) for p in parquet] == [(p.ground_truth, "countdown") for p in plain]
    assert parquet[2].where == f"{verl / 'train.parquet'} row 2"


def test_train_reads_verl_parquet(verl, tmp_path):
    argv = ["train", "configs/rl_tiny.yaml", *tiny_overrides(verl, tmp_path / "run"),
            f"data.train={verl / 'train.parquet'}", f"eval.files=[{verl / 'train.parquet'}]", "eval.k=2", "steps=1"]
    assert cli.main(argv) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and 0 <= record["reward/mean"] <= 1 and 0 <= record["eval/train/avg@2"] <= 1


def test_eval_reads_verl_parquet(verl, capsys):
    argv = ["eval", "--model", str(verl / "init"), "--data", str(verl / "train.parquet"), "--verifier", "countdown",
            "--k", "2", "--max-new-tokens", "8"]
    assert cli.main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["eval/train/avg@2"] <= metrics["eval/train/pass@2"] <= 1


def test_generate_and_entropy_score_read_verl_parquet(verl, tmp_path):
    out = tmp_path / "out.jsonl"
    model = ["--model", str(verl / "init")]
    assert cli.main(["generate", *model, "--prompts", str(verl / "train.parquet"), "--out", str(out), "--n", "2",
                     "--max-new-tokens", "8"]) == 0
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    expected = load_rl_prompts(verl / "train.jsonl", load_tokenizer(verl / "init"), chat=True, enable_thinking=True,
                               template=None, max_prompt_tokens=64)
    assert [s["prompt_ids"] for s in samples] == [p.prompt_ids for p in expected for _ in range(2)]
    assert samples[3]["extra_info"] == {"split": "train", "index": 1}  # the row's fields travel with its samples

    # verl's layout plus each sample's response text, as parquet: what `entropy score` reads
    rows = [{**verl_row(i, p), "response": f"<think>\n{p['prompt']}\n</think>\n\n\\boxed{{1+2}}"}
            for i, p in enumerate(make_problems(0)[:4])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "responses.parquet")
    scored = tmp_path / "scored.jsonl"
    assert cli.main(["entropy", "score", *model, "--data", str(tmp_path / "responses.parquet"),
                     "--out", str(scored)]) == 0
    lines = [json.loads(line) for line in scored.read_text().splitlines()]
    tokenizer = load_tokenizer(verl / "init")
    assert [r["prompt_ids"] for r in lines] == [s["prompt_ids"] for s in samples[::2]]
    assert [r["token_ids"] for r in lines] == [tokenizer.encode(r["response"], add_special_tokens=False) for r in rows]
    assert all(len(r["entropies"]) == len(r["token_ids"]) for r in lines)


@pytest.mark.parametrize("row,need_answer,message", [
    ({"prompt": [{"role": "user", "content": "hi"}]}, True, "expected verl's layout"),
    ({"prompt": "hi", "reward_model": {"style": "rule"}}, True, "'reward_model.ground_truth' is missing"),
    ({"prompt": "  ", "reward_model": {"ground_truth": "1"}}, True, "prompt is empty"),
    ({"problem": "2+2?"}, True, "field 'answer' is missing"),
    ({"text": "hi"}, False, "needs 'prompt' (text or chat messages) or 'problem'"),
    ({"prompt": 3}, False, "'prompt' must be a list of chat messages or a string"),
])
def test_bad_rows_are_named(row, need_answer, message):
    with pytest.raises(InputError, match=f"data.jsonl line 7: .*{message.replace('(', '.').replace(')', '.')}"):
        row_prompt(row, "data.jsonl line 7", need_answer=need_answer)


def test_generation_needs_no_answer():
    assert row_prompt({"problem": "2+2?"}, "x", need_answer=False) == ("2+2?", None, "")
    messages = [{"role": "user", "content": "hi"}]
    assert row_prompt({"prompt": messages, "data_source": "s"}, "x", need_answer=False) == (messages, None, "s")
