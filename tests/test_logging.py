"""The metrics log (`forkflow.train.state.MetricsLog`) and its trackers (`forkflow/train/trackers.py`):
metrics.jsonl always, TensorBoard and Weights & Biases (offline, under the run directory) on request, resumed
runs, strict JSON, and a ConfigError naming the extra when a tracker's package is missing. The extras'
packages are required here, never skipped: `make test` installs them."""

from __future__ import annotations

import importlib
import json
import struct
import sys
from dataclasses import dataclass, field

import pytest

from forkflow.config import ConfigError
from forkflow.train.state import MetricsLog


def extra(module: str, name: str):
    """An optional extra's module; missing, the test fails (a skipped test checks nothing in CI)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is missing: pip install -e '.[{name}]' (`make test` installs the extras)")


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_log_resumes_in_json_lines_and_tensorboard(tmp_path):
    accumulator = extra("tensorboard.backend.event_processing.event_accumulator", "tensorboard")

    with MetricsLog(tmp_path, 0, tensorboard=True) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": float(step), "note": "text is not a scalar"})
    with MetricsLog(tmp_path, 1, tensorboard=True) as log:  # resumed after step 1: steps 2, 3 come again
        log.write({"step": 2, "loss": 20.0})
    assert [(r["step"], r["loss"]) for r in read_lines(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 20.0)]
    events = accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["scalars"] == ["loss"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 20.0)]


@pytest.mark.parametrize("option,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_a_config_error_naming_the_extra(tmp_path, monkeypatch, option, module):
    monkeypatch.setitem(sys.modules, module, None)  # the import fails as if the package were not installed
    with pytest.raises(ConfigError, match=rf"{option}=true needs .* pip install -e '\.\[{option}\]'"):
        MetricsLog(tmp_path, 0, **{option: True})
    MetricsLog(tmp_path, 0).write({"step": 1, "loss": 0.5})  # JSON lines alone need nothing


def test_metrics_log_writes_undefined_values_as_null(tmp_path):
    MetricsLog(tmp_path, 0).write({"step": 1, "entropy/unselected_mean": float("nan"), "loss": float("inf")})

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=strict) == {"step": 1, "entropy/unselected_mean": None, "loss": None}


# ------------------------------------------------------------------------------------------ Weights & Biases

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of chunks after a 7-byte ":W&B" header


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file."""
    pb = extra("wandb.proto.wandb_internal_pb2", "wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])  # after a 4-byte checksum
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_run(run_dir):
    """(run record, [(step, {metric: value})]) of one offline run directory."""
    (path,) = run_dir.glob("run-*.wandb")
    run, history = None, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history.append((record.history.step.num, {k: json.loads(v) for k, v in items.items() if k[0] != "_"}))
    return run, history


@dataclass
class RunConfig:
    lr: float = 1e-6
    select: dict = field(default_factory=lambda: {"mode": "top", "ratio": 0.2})


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No mode set (the tracker must choose offline itself), and W&B's own files kept out of the home directory."""
    extra("wandb", "wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var))


def test_wandb_logs_offline_under_the_run_directory_and_a_resume_starts_after_the_checkpoint(tmp_path, wandb_env):
    out = tmp_path / "my-run"
    with MetricsLog(out, 0, wandb=True, wandb_project="forkflow-test", config=RunConfig()) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": step / 2, "acc": float("nan"), "note": "text"})
    with MetricsLog(out, 1, wandb=True, config=RunConfig()) as log:  # resumed after step 1
        log.write({"step": 2, "loss": 20.0, "acc": 0.5})
    assert [(r["step"], r["loss"]) for r in read_lines(out / "metrics.jsonl")] == [(1, 0.5), (2, 20.0)]

    first, resumed = sorted((out / "wandb").glob("offline-run-*"))  # offline: nothing was sent anywhere
    run, history = offline_run(first)
    assert run.display_name == "my-run" and run.project == "forkflow-test"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == 1e-6 and config["select"] == {"mode": "top", "ratio": 0.2}
    assert history == [(1, {"loss": 0.5}), (2, {"loss": 1.0}), (3, {"loss": 1.5})]  # NaN and text left out
    run, history = offline_run(resumed)
    assert run.project == "forkflow" and history == [(2, {"loss": 20.0, "acc": 0.5})]


def test_a_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # killed mid-write
    with MetricsLog(tmp_path, 1) as log:
        log.write({"step": 2, "loss": 2.0})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
