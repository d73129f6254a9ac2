"""The demo pipeline end to end at a toy size: data, SFT, RL, eval, entropy report and comparison, summary."""

import json
import random

from forkflow.chat import load_tokenizer
from forkflow.demo.run import DemoSize, run
from forkflow.demo.task import build_char_tokenizer, make_problems, sft_messages, solve_trace
from forkflow.rewards import verify_countdown


def test_traces_solve_their_problems(tmp_path):
    problems = make_problems(0)
    assert len(problems) == len({(tuple(sorted(p["numbers"])), p["target"]) for p in problems})
    rng = random.Random(0)
    tokenizer = load_tokenizer(build_char_tokenizer(tmp_path))
    for p in problems[:200]:
        messages = sft_messages(p, rng)
        assert verify_countdown(messages[1]["content"], p["answer"])
        ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert solve_trace([1, 1, 1], 99, rng) is None


def test_demo_runs_end_to_end(tmp_path):
    size = DemoSize(heldout=16, traces_per_problem=1, hidden=32, layers=1, sft_epochs=1, sft_batch=64, rl_steps=1,
                    rl_prompts=2, rl_n=4, max_new_tokens=24, eval_k=2, dynamic_sampling=False)
    summary = run(tmp_path / "demo", size)
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved == summary
    for key in ("base_acc", "rl_acc", "k", "n_heldout", "minutes", "top20_overlap"):
        assert key in saved
    assert saved["k"] == 2 and saved["n_heldout"] == 16
    for path in ("report/report.html", "report/entropy_histogram.png", "report/wordcloud_high.png",
                 "comparison/entropy_change.png", "rl/metrics.jsonl", "base/config.json"):
        assert (tmp_path / "demo" / path).exists(), path
