"""Typed YAML configs with key=value overrides: unknown keys and wrong types fail with a useful message."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from forkflow.config import ConfigError, load_config, save_config


@dataclass
class Optim:
    lr: float = 1e-6
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class Run:
    steps: int = 10
    name: str | None = None
    layers: list[int] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\noptim:\n  lr: 0.001\n")
    cfg = load_config(Run, path, ["optim.schedule=cosine", "layers=[1, 2]", "name=x"])
    assert cfg == Run(steps=3, name="x", layers=[1, 2], optim=Optim(lr=1e-3, schedule="cosine"))
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Run, tmp_path / "saved.yaml") == cfg


def test_int_is_accepted_for_float():
    assert load_config(Run, None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override,message", [
    (["optim.lrr=1"], "unknown key 'lrr'; did you mean 'lr'"),
    (["step=1"], "unknown key 'step'; did you mean 'steps'"),
    (["steps=many"], r"command line 'steps=many': steps: expected int, got 'many'"),
    (["optim.schedule=linear"], "'linear' is not one of"),
    (["steps"], "expected key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, override)


def test_bad_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: optim: unknown key 'learning_rate'"):
        load_config(Run, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "missing.yaml")


def test_shipped_configs_load():
    """Every YAML under configs/ is valid for its trainer (a typo in a shipped config fails here, not on a GPU)."""
    from pathlib import Path

    from forkflow.train.rl import RLConfig
    from forkflow.train.sft import SFTConfig

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        cfg = load_config(SFTConfig if path.name.startswith("sft") else RLConfig, path)
        if path.name.startswith("dapo"):
            assert cfg.optim.lr == 1e-6 and cfg.rollout.n == 16 and cfg.prompts_per_step == 512
            assert cfg.select.ratio == (0.2 if "top20" in path.name else 1.0)
