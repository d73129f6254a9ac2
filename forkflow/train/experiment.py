"""`forkflow experiment eighty-twenty CONFIG [key=value ...]`: the paper's 80/20 experiment in miniature.

The RL run of CONFIG is repeated from the same starting checkpoint with four token selections, for each seed:
all tokens (ρ = 1), the top 20 % by entropy (the forking tokens), the bottom 80 %, and a random 20 %
(arXiv:2506.01939, Fig. 5/6 and Table 2). Every arm evaluates on the config's eval files (`eval.files`,
`eval.every`); the starting checkpoint is evaluated once the same way (step 0). Writes, under --out:

    <arm>/seed<s>/        each run's directory (metrics.jsonl, checkpoints); a rerun resumes or skips it
    eighty_twenty.png     held-out accuracy, entropy and response length over steps, one line per arm
    eighty_twenty.md      the summary table (final held-out avg@k and pass@k, mean ± std over seeds)
    summary.json          the same numbers
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from forkflow.chat import load_tokenizer
from forkflow.config import ConfigError, load_config
from forkflow.models.checkpoint import from_pretrained
from forkflow.rewards import VerifierPool
from forkflow.rollout import TorchBackend
from forkflow.train.rl import RLConfig, RLTrainer, evaluate_run
from forkflow.train.state import METRICS, STOPS, exit_code

# arm -> (label, selection overrides)
ARMS = {
    "all": ("all tokens", ["select.mode=all", "select.ratio=1.0"]),
    "top20": ("top-20 % (forking)", ["select.mode=top", "select.ratio=0.2"]),
    "bottom80": ("bottom-80 %", ["select.mode=bottom", "select.ratio=0.2"]),  # bottom: the complement of top-ρ
    "random20": ("random-20 %", ["select.mode=random", "select.ratio=0.2"]),
}


def accuracy_keys(cfg: RLConfig) -> tuple[str, str]:
    """The metrics keys of held-out avg@k and pass@k (the first eval file)."""
    stem, k = Path(cfg.eval.files[0]).stem, 1 if cfg.eval.temperature == 0 else cfg.eval.k
    return f"eval/{stem}/avg@{k}", f"eval/{stem}/pass@{k}"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def evaluate_start(cfg: RLConfig, path: Path) -> dict:
    """Held-out metrics of the starting checkpoint (step 0), computed once and cached in `path`."""
    if path.exists():
        return json.loads(path.read_text())
    model = from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    with VerifierPool(cfg.reward.workers, cfg.reward.timeout_s) as pool:
        metrics = evaluate_run(cfg, TorchBackend(model), load_tokenizer(cfg.model.tokenizer or cfg.model.path), pool)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics) + "\n")
    return metrics


def run_eighty_twenty(config: str, overrides: list[str], out: Path, seeds: list[int], arms: list[str]) -> dict:
    """Train every (arm, seed) that has not finished, then plot and tabulate. Returns the summary."""
    base = load_config(RLConfig, config, overrides)
    if not base.eval.files or not base.eval.every:
        raise ConfigError("the experiment compares held-out accuracy over training: set eval.files (one or more "
                          "files) and eval.every (steps between evaluations) in the config or as key=value")
    runs: dict[str, list[list[dict]]] = {}
    minutes: dict[str, list[float]] = {}
    for arm in arms:
        for seed in seeds:
            cfg = load_config(RLConfig, config, [*overrides, *ARMS[arm][1], f"seed={seed}",
                                                 f"out={out / arm / f'seed{seed}'}"])
            metrics = read_metrics(Path(cfg.out))
            if not metrics or metrics[-1]["step"] < cfg.steps:
                print(f"eighty-twenty: {ARMS[arm][0]}, seed {seed} -> {cfg.out}", file=sys.stderr, flush=True)
                RLTrainer(cfg).train()
                metrics = read_metrics(Path(cfg.out))
            runs.setdefault(arm, []).append(metrics)
            minutes.setdefault(arm, []).append(sum(m["time/step_s"] for m in metrics) / 60)
    start = [evaluate_start(load_config(RLConfig, config, [*overrides, f"seed={seed}"]), out / f"start_seed{seed}.json")
             for seed in seeds]
    avg_key, pass_key = accuracy_keys(base)
    summary = {"config": str(config), "overrides": overrides, "seeds": seeds, "metric": avg_key, "arms": {},
               "start": {"avg": _mean_std([s[avg_key] for s in start]),
                         "pass": _mean_std([s[pass_key] for s in start])}}
    for arm, per_seed in runs.items():
        finals = [next(m for m in reversed(metrics) if avg_key in m) for metrics in per_seed]
        tail = [metrics[-10:] for metrics in per_seed]
        summary["arms"][arm] = {
            "label": ARMS[arm][0],
            "avg": _mean_std([f[avg_key] for f in finals]),
            "pass": _mean_std([f[pass_key] for f in finals]),
            "entropy": _mean_std([statistics.fmean(m["entropy/mean"] for m in t) for t in tail]),
            "response_len": _mean_std([statistics.fmean(m["response_len/mean"] for m in t) for t in tail]),
            "minutes": statistics.fmean(minutes[arm]),
        }
    out.mkdir(parents=True, exist_ok=True)
    plot_curves({ARMS[arm][0]: per_seed for arm, per_seed in runs.items()}, avg_key,
                [s[avg_key] for s in start], out / "eighty_twenty.png")
    (out / "eighty_twenty.md").write_text(summary_table(summary) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summary_table(summary: dict) -> str:
    n, metric = len(summary["seeds"]), summary["metric"].rsplit("/", 1)[-1]
    k = metric.split("@")[1]

    def cell(pair: list[float], digits: int = 3) -> str:
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}" if n > 1 else f"{pair[0]:.{digits}f}"

    lines = [f"| tokens in the policy gradient | held-out avg@{k} | pass@{k} | entropy (last 10 steps) | "
             "response length | minutes per run |", "|---|---:|---:|---:|---:|---:|",
             f"| (start: the base model) | {cell(summary['start']['avg'])} | {cell(summary['start']['pass'])} "
             "| | | |"]
    for arm in summary["arms"].values():
        lines.append(f"| {arm['label']} | {cell(arm['avg'])} | {cell(arm['pass'])} | {cell(arm['entropy'])} | "
                     f"{cell(arm['response_len'], 1)} | {arm['minutes']:.1f} |")
    seeds = ", ".join(map(str, summary["seeds"]))
    lines.append(f"\nFinal held-out accuracy after training; mean ± std over seeds {seeds}." if n > 1 else
                 f"\nFinal held-out accuracy after training; seed {seeds}.")
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[list[dict]]], avg_key: str, start: list[float], path: Path) -> None:
    """Three panels over steps: held-out avg@k (from `start` at step 0), mean token entropy and mean
    response length of the rollouts (moving average over 5 steps). One line per run label, the mean over
    seeds, with the seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [(avg_key, f"held-out {avg_key.rsplit('/', 1)[-1]}"), ("entropy/mean", "entropy of response tokens"),
              ("response_len/mean", "response length (tokens)")]
    for (key, title), ax in zip(panels, axes, strict=True):
        for label, per_seed in runs.items():
            if key == avg_key:
                steps = [0] + [m["step"] for m in per_seed[0] if key in m]
                curves = np.array([[s] + [m[key] for m in metrics if key in m]
                                   for s, metrics in zip(start, per_seed, strict=True)])
            else:
                steps = [m["step"] for m in per_seed[0]]
                window = np.ones(5) / 5
                curves = np.array([np.convolve(np.pad([m[key] for m in metrics], (2, 2), mode="edge"), window, "valid")
                                   for metrics in per_seed])
            line, = ax.plot(steps, curves.mean(axis=0), label=label, marker="o" if key == avg_key else None, ms=3)
            if len(curves) > 1:
                ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forkflow experiment", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=["eighty-twenty"], help="the experiment")
    parser.add_argument("config", help="RL config YAML, e.g. configs/rl_tiny.yaml (after `make demo`)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run, e.g. steps=50")
    parser.add_argument("--out", default="runs/eighty-twenty", help="output directory (reruns resume)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args(argv)
    began = time.perf_counter()
    try:
        summary = run_eighty_twenty(args.config, args.overrides, Path(args.out), args.seeds, args.arms)
    except STOPS as e:
        print(f"forkflow experiment: {e}", file=sys.stderr)
        return exit_code(e)
    print(summary_table(summary))
    print(f"\n{(time.perf_counter() - began) / 60:.1f} min; plot {Path(args.out) / 'eighty_twenty.png'}",
          file=sys.stderr)
    return 0
