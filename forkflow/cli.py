"""`forkflow <command> ...`: one entry point; each command parses its own arguments in its own module."""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help); function(argv: list[str]) -> int
COMMANDS = {
    "demo": ("forkflow.demo.run:main", "run the main job end to end on a tiny model (what `make demo` runs)"),
    "generate": ("forkflow.rollout.cli:main", "sample responses with per-token log-probs and entropies"),
    "entropy": ("forkflow.entropy.cli:main", "token entropy: score responses, report, compare two models"),
    "sft": ("forkflow.train.sft:main", "supervised fine-tuning with ChunkFlow batching"),
    "train": ("forkflow.train.rl:main", "RLVR (DAPO/GRPO) restricted to the high-entropy forking tokens"),
    "eval": ("forkflow.train.evaluate:main", "avg@k and pass@k of a checkpoint on verifiable problems"),
    "plan": ("forkflow.distributed.plan:main",
             "GPU memory per rank of a training config, and whether it fits (no GPU needed)"),
    "export": ("forkflow.distributed.checkpoint:main",
               "a Hugging Face directory from a training checkpoint saved on any number of ranks"),
    "experiment": ("forkflow.train.experiment:main",
                   "eighty-twenty: the same RL on all / top-20 % / bottom-80 % / random-20 % of tokens"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    head = "usage: forkflow <command> [args]\n\ncommands:\n"
    return head + "\n".join(lines) + "\n\n`forkflow <command> --help` for more."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"forkflow: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), func)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
