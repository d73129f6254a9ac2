"""The README's examples run as written: every command of the "A 30-second tour" shell block, read from README.md
at collection time (the tour may change), runs in a scratch directory after a tiny `make demo`. Only sizes are
changed, never a flag: the demo is tiny, training commands get key=value overrides for a step or two, and the
tour's placeholders (a model DIR, the user's in.jsonl, two scored files) stand for files of that demo run."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import time
import traceback
from pathlib import Path

import pytest

from forkflow import cli
from forkflow.config import load_config
from forkflow.demo import run as demo_run
from forkflow.demo.run import DemoSize
from forkflow.train.rl import RLConfig
from forkflow.train.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

TINY_DEMO = DemoSize(heldout=8, traces_per_problem=1, hidden=32, layers=1, sft_epochs=1, sft_batch=64, rl_steps=1,
                     rl_prompts=2, rl_n=2, max_new_tokens=24, eval_every=1, eval_k=2, dynamic_sampling=False)
# the tour's placeholders -> files of the demo run (or of an earlier tour command)
PLACEHOLDERS = {
    "DIR": "runs/demo/base",
    "in.jsonl": "runs/demo/data/heldout.jsonl",  # the demo's own data: {problem, answer, data_source}
    "base.jsonl": "runs/demo/scored_base.jsonl",  # the same responses scored by the base and the RL model
    "rl.jsonl": "runs/demo/scored_rl.jsonl",
    # the tour's RL run ends at step 100; shrunk (TINY_RL) it ends at step 1
    "runs/rl-tiny/checkpoints/step-00000100": "runs/rl-tiny/checkpoints/step-00000001",
}
# key=value overrides that shrink a training command to a step or two (inserted after its config file)
TINY_RL = ["steps=1", "prompts_per_step=2", "mini_batch_prompts=2", "rollout.n=2", "rollout.max_new_tokens=16",
           "algo.dynamic_sampling=false", "eval.k=2", "reward.workers=1", "progress=false"]
SHRINK = {"sft": ["max_steps=2", "progress=false"], "train": TINY_RL, "experiment": TINY_RL}


def tour_commands(readme: str) -> list[str]:
    """The commands of the first shell block after the README's tour heading, comments and blank lines dropped."""
    heading = re.search(r"^#+ .*\btour\b.*$", readme, re.M | re.I)
    assert heading, "README.md has no tour heading (## A 30-second tour)"
    block = re.search(r"```(?:bash|sh|shell)\n(.*?)```", readme[heading.end():], re.S)
    assert block, "README.md's tour has no ```bash block"
    text = block.group(1).replace("\\\n", " ")  # continued lines
    return [shlex.join(words) for line in text.splitlines() if (words := shlex.split(line, comments=True))]


def runnable(command: str) -> list[str]:
    """The argv of a tour command for `forkflow.cli.main`, placeholders replaced and training shrunk."""
    words = shlex.split(command)
    assert words[0] == "forkflow", f"the tour's {command!r} is not a forkflow command: teach {__file__} to run it"
    argv = [PLACEHOLDERS.get(word, word) for word in words[1:]]
    if argv and argv[0] in SHRINK:
        config = next(i for i, word in enumerate(argv) if word.endswith((".yaml", ".yml")))
        argv[config + 1 : config + 1] = SHRINK[argv[0]]
    return argv


def run_command(argv: list[str]) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, seconds) of `forkflow ARGV` run in this process."""
    out = io.StringIO()
    began = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: a flag the command does not know
            code = e.code if isinstance(e.code, int) else 2
        except Exception:
            traceback.print_exc(file=out)
            code = 1
    return code, out.getvalue(), time.perf_counter() - began


COMMANDS = tour_commands(README)


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """Every tour command's (exit code, output, seconds), run in order in one scratch directory; the demo first
    (the tour starts after `make demo`), at a tiny size."""
    work = tmp_path_factory.mktemp("tour")
    (work / "configs").symlink_to(ROOT / "configs")
    demos = [c for c in COMMANDS if shlex.split(c)[1:2] == ["demo"]] or ["forkflow demo --out runs/demo"]
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(demo_run, "DemoSize", lambda: TINY_DEMO)
        for command in demos + [c for c in COMMANDS if c not in demos]:
            results[command] = run_command(runnable(command))
    return work, results


def test_the_tour_has_the_commands_it_promises():
    names = {shlex.split(c)[1] if len(shlex.split(c)) > 1 else "--help" for c in COMMANDS}
    assert {"--help", "generate", "eval", "entropy"} <= names, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_tour_command_runs_as_written(tour, command):
    work, results = tour
    code, output, _ = results[command]
    assert code == 0, f"`{command}` exited with {code}:\n{output[-3000:]}"
    argv = runnable(command)
    for flag, value in zip(argv[:-1], argv[1:], strict=True):
        if flag == "--out":
            assert (work / value).exists(), f"`{command}` wrote no {value}"


def brace_expand(text: str) -> list[str]:
    """The shell's {a,b} expansion: dapo_qwen3_{8b,14b}_{top20,all} -> four names."""
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    head, tail = text[: m.start()], text[m.end() :]
    return [name for option in m.group(1).split(",") for name in brace_expand(head + option + tail)]


def test_configs_the_readme_names_exist_and_load():
    names = {name for m in re.finditer(r"configs/([\w{},.-]+?)\.yaml", README) for name in brace_expand(m.group(1))}
    assert names
    for name in sorted(names):
        path = ROOT / "configs" / f"{name}.yaml"
        assert path.is_file(), f"README.md names configs/{name}.yaml, which does not exist"
        load_config(SFTConfig if name.startswith("sft") else RLConfig, path, [])
