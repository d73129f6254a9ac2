"""Training checkpoints in one format for every world size, and their Hugging Face export.

out/checkpoints/step-N/ holds
    state/               model and AdamW state, `torch.distributed.checkpoint` (each rank writes its shards;
                         loading reshards to any world size, a single process included)
    config.json          the model's Hugging Face config (the architecture to rebuild; `forkflow export`)
    tokenizer/           the tokenizer files
    trainer_state.pt     step, LR schedule, RNG and whatever the trainer adds (data position); written last
plus the files the trainer writes (its run config). A checkpoint is written under a temporary name and
renamed into place once every rank's shards are on disk, so a crash mid-save leaves the previous one as the
newest complete checkpoint. Multi-node jobs need `out` on a file system every node sees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from forkflow.distributed.runtime import World, barrier, full_parameters
from forkflow.models.checkpoint import CheckpointError, config_to_dict, read_config, write_pretrained
from forkflow.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

STATE = "state"
TRAINER_STATE = "trainer_state.pt"
TOKENIZER = "tokenizer"
PREFIX = "step-"


def checkpoint_dir(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / "checkpoints" / f"{PREFIX}{step:08d}"


def save_checkpoint(out: str | os.PathLike, step: int, model, optimizer, world: World, trainer_state: dict,
                    tokenizer=None, write_files: Callable[[Path], None] | None = None) -> Path:
    """Write out/checkpoints/step-N (a collective: every rank calls it). `trainer_state` (picklable with
    torch.save's weights_only rules) comes back from `load_checkpoint`; `write_files(dir)` adds files
    (rank 0). Returns the checkpoint's directory."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)  # a temporary directory is always ours: a crashed save
        tmp.mkdir(parents=True)
    barrier(world)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / STATE)
    if world.main:
        (tmp / "config.json").write_text(json.dumps(config_to_dict(model.config, torch.float32), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER)
        if write_files is not None:
            write_files(tmp)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": step, "rng": rng, **trainer_state}, tmp / TRAINER_STATE)
    barrier(world)
    if world.main:
        if final.exists():
            shutil.rmtree(final)  # the same step saved again (a rerun of a finished step)
        os.rename(tmp, final)
    barrier(world)
    return final


def check_complete(path: Path) -> None:
    """Raise CheckpointError naming the first missing or truncated file of checkpoint `path`."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{path}: {TRAINER_STATE} is missing (an incomplete or foreign checkpoint)")
    if not (path / STATE / ".metadata").is_file():
        raise CheckpointError(f"{path / STATE}: .metadata is missing (not a complete checkpoint)")
    try:
        metadata = FileSystemReader(path / STATE).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata means the same to the user
        raise CheckpointError(f"{path / STATE / '.metadata'}: unreadable ({e})") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / STATE / name
        if not file.is_file():
            raise CheckpointError(f"{file}: shard file is missing; the checkpoint is incomplete")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file}: shard file is truncated ({file.stat().st_size} of {size} bytes)")


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under out/checkpoints; an incomplete newer one (a crash mid-save, a
    missing or truncated shard) is skipped with a warning that names it."""
    steps = sorted((Path(out) / "checkpoints").glob(f"{PREFIX}*"), key=lambda p: p.name, reverse=True)
    for path in steps:
        try:
            check_complete(path)
            return path
        except CheckpointError as e:
            print(f"warning: skipping checkpoint {path}: {e}", file=sys.stderr)
    return None


def check_same_model(path: Path, config: Qwen3Config) -> None:
    """CheckpointError when checkpoint `path` holds another architecture than `config`."""
    saved = read_config(path)
    for f in dataclasses.fields(Qwen3Config):
        if f.name != "extra" and getattr(saved, f.name) != getattr(config, f.name):
            raise CheckpointError(
                f"{path}: the checkpoint's model differs from model.path's in {f.name!r} "
                f"({getattr(saved, f.name)!r} vs {getattr(config, f.name)!r}); resume with the model it was "
                "trained from, or start a new run (another out=)"
            )


def load_checkpoint(path: str | os.PathLike, model, optimizer, world: World) -> dict:
    """Load a checkpoint into a (sharded or whole) model and its optimizer, whatever world size wrote it;
    restores the RNG and returns the trainer state (`step`, and what the trainer saved)."""
    path = Path(path)
    check_complete(path)
    check_same_model(path, model.config)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path / STATE)
    except Exception as e:  # noqa: BLE001 - DCP raises its own wrapper types
        raise CheckpointError(f"{path / STATE}: cannot be loaded ({str(e).splitlines()[0]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer = torch.load(path / TRAINER_STATE, weights_only=True)
    torch.set_rng_state(trainer["rng"]["cpu"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    barrier(world)
    return trainer


def export_model(model, out: str | os.PathLike, world: World, tokenizer=None) -> Path:
    """A Hugging Face directory (safetensors + config.json + tokenizer) of a sharded or whole model, written
    by rank 0 (the full weights are gathered into its CPU memory); a collective."""
    state = {name: t.cpu() for name, t in full_parameters(model) if world.main}
    out = Path(out)
    if world.main:
        write_pretrained(state, model.config, out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    barrier(world)
    return out


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """`forkflow export`: a training checkpoint of any world size -> a Hugging Face directory (one process)."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_complete(checkpoint)
    config = read_config(checkpoint)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=checkpoint / STATE)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{checkpoint / STATE}: cannot be loaded ({str(e).splitlines()[0]})") from None
    write_pretrained(state["model"], config, out)
    if (checkpoint / TOKENIZER).is_dir():
        for file in (checkpoint / TOKENIZER).iterdir():
            shutil.copy(file, out / file.name)
    return out


def main(argv: list[str]) -> int:
    """forkflow export CHECKPOINT OUT"""
    import argparse

    parser = argparse.ArgumentParser(prog="forkflow export",
                                     description="Write a Hugging Face directory from a training checkpoint "
                                                 "(saved on any number of ranks).")
    parser.add_argument("checkpoint", help="e.g. runs/rl/checkpoints/step-00000100")
    parser.add_argument("out", help="the Hugging Face directory to write (safetensors, config.json, tokenizer)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except CheckpointError as e:
        print(f"forkflow export: {e}", file=sys.stderr)
        return 2
    print(f"forkflow export: wrote {out}", file=sys.stderr)
    return 0
