"""The demo pipeline end to end at a toy size (data, SFT, RL, eval, entropy report and comparison, summary),
and the eighty-twenty experiment from its base model."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from forkflow.chat import load_tokenizer
from forkflow.config import ConfigError, load_config, to_dict
from forkflow.demo.run import DemoSize, rl_config, run
from forkflow.demo.run import main as demo_main
from forkflow.demo.task import build_char_tokenizer, make_problems, sft_messages, solve_trace
from forkflow.rewards import verify_countdown
from forkflow.run_dir import MARKER
from forkflow.train.experiment import main as experiment_main
from forkflow.train.experiment import run_eighty_twenty
from forkflow.train.rl import RLConfig


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
        numbers = [t for t in tokenizer.convert_ids_to_tokens(ids) if t.isdigit()]
        assert set(numbers) >= {str(n) for n in p["numbers"]}  # whole numbers are single tokens
    assert solve_trace([1, 1, 1], 99, rng) is None


def test_tiny_config_is_the_demo_rl_run():
    shipped = load_config(RLConfig, "configs/rl_tiny.yaml", ["out=runs/demo/rl"])
    assert to_dict(shipped) == to_dict(rl_config(Path("runs/demo"), DemoSize(), seed=0))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    size = DemoSize(heldout=16, traces_per_problem=1, hidden=32, layers=1, sft_epochs=1, sft_batch=64, rl_steps=2,
                    rl_prompts=2, rl_n=4, max_new_tokens=24, eval_every=1, eval_k=2, dynamic_sampling=False)
    return out, run(out, size)


def test_demo_runs_end_to_end(demo, tmp_path):
    out, summary = demo
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    for key in ("base_acc", "rl_acc", "k", "n_heldout", "minutes", "top20_overlap"):
        assert key in saved
    assert saved["k"] == 2 and saved["n_heldout"] == 16
    for path in ("report/report.html", "report/entropy_histogram.png", "report/wordcloud_high.png",
                 "comparison/entropy_change.png", "rl/metrics.jsonl", "base/config.json", "rl_curves.png"):
        assert (out / path).exists(), path
    metrics = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("eval/heldout/avg@4" in m for m in metrics)
    assert json.loads((out / MARKER).read_text()) == {"kind": "demo"}

    link = os.readlink(out / "base")
    assert not os.path.isabs(link) and (out / link / "config.json").is_file()
    assert (out / "base").resolve().is_relative_to(out.resolve())
    moved = tmp_path / "moved"  # a copied run directory is self-contained
    shutil.copytree(out, moved, symlinks=True)
    assert (moved / "base").resolve().is_relative_to(moved.resolve()) and (moved / "base" / "config.json").is_file()


def test_demo_refuses_an_out_directory_of_other_files(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert demo_main(["--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"
    err = capsys.readouterr().err
    assert err.startswith("forkflow demo: ") and str(out) in err and "--out" in err and err.count("\n") == 1


def test_demo_refuses_an_out_path_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("precious")
    assert demo_main(["--out", str(out)]) == 2
    assert out.read_text() == "precious"
    assert str(out) in capsys.readouterr().err


def test_eighty_twenty_experiment(demo, tmp_path, capsys):
    out, _ = demo
    config = out / "rl" / "config.yaml"
    exp = tmp_path / "exp"
    argv = ["eighty-twenty", str(config), "steps=2", "eval.every=2", "eval.k=2", "--out", str(exp), "--seeds", "0", "1"]
    assert experiment_main(argv) == 0
    summary = json.loads((exp / "summary.json").read_text())
    assert set(summary["arms"]) == {"all", "top20", "bottom80", "random20"} and summary["seeds"] == [0, 1]
    kept = {arm: [json.loads(line)["select/kept_frac"] for seed in (0, 1)
                  for line in (exp / arm / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            for arm in summary["arms"]}
    assert all(k == 1.0 for k in kept["all"])
    for arm in ("top20", "random20"):
        assert all(0.2 <= k < 0.3 for k in kept[arm]), (arm, kept[arm])  # ceil(ρN) of N ≥ 10 tokens
    assert all(0.7 < k <= 0.8 + 1e-6 for k in kept["bottom80"]), kept["bottom80"]  # N − ceil(ρN)
    table = (exp / "eighty_twenty.md").read_text()
    assert table.count("\n| ") == 5 and "± " in table and (exp / "eighty_twenty.png").stat().st_size > 10_000
    assert capsys.readouterr().out.startswith("| tokens in the policy gradient")

    before = {p: p.stat().st_mtime_ns for p in exp.glob("*/seed*/metrics.jsonl")}
    assert experiment_main(argv) == 0  # finished runs are not trained again
    assert before == {p: p.stat().st_mtime_ns for p in exp.glob("*/seed*/metrics.jsonl")}

    with pytest.raises(ConfigError, match="eval.files"):
        run_eighty_twenty(str(config), ["eval.every=0"], exp, [0], ["top20"])
