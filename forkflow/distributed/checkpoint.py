"""Training checkpoints in one format for every world size, and their Hugging Face export.

out/checkpoints/step-N/ holds
    state/               model and AdamW state, `torch.distributed.checkpoint` (each rank writes its shards;
                         loading reshards to any world size, a single process included)
    config.json          the model's Hugging Face config (the architecture to rebuild; `forkflow export`)
    tokenizer/           the tokenizer files
    trainer_state.pt     step, LR schedule, RNG and whatever the trainer adds (data position); written last
plus the files the trainer writes (its run config). A checkpoint is written under a temporary name and
renamed into place once every rank's shards are on disk, so a crash mid-save leaves the previous one as the
newest complete checkpoint; a failed write (a full disk) is an error on every rank that leaves the earlier
checkpoints as they were. After a save, checkpoints beyond the newest `keep_last` are deleted (renamed out of
the way first, so a crash mid-delete never leaves a half-deleted `step-*`). A resume takes the newest
checkpoint that loads: newer ones that are incomplete or unreadable are skipped with a warning naming them.
Multi-node jobs need `out` on a file system every node sees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from forkflow.distributed.runtime import World, barrier, full_parameters, gather_objects
from forkflow.models.checkpoint import CheckpointError, config_to_dict, read_config, write_pretrained
from forkflow.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

STATE = "state"
TRAINER_STATE = "trainer_state.pt"
TOKENIZER = "tokenizer"
PREFIX = "step-"
TMP = ".tmp-"  # a checkpoint being written or deleted: never loaded, removed by the next save


class BrokenCheckpoint(CheckpointError):
    """A checkpoint with a missing or truncated file, or one that cannot be read: a resume skips it."""


def checkpoint_dir(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / "checkpoints" / f"{PREFIX}{step:08d}"


def save_checkpoint(out: str | os.PathLike, step: int, model, optimizer, world: World, trainer_state: dict,
                    tokenizer=None, write_files: Callable[[Path], None] | None = None, keep_last: int = 0) -> Path:
    """Write out/checkpoints/step-N (a collective: every rank calls it), then delete all but the newest
    `keep_last` checkpoints (0: keep all). `trainer_state` (picklable with torch.save's weights_only rules)
    comes back from `load_checkpoint`; `write_files(dir)` adds files (rank 0). Returns the checkpoint's
    directory; a write that fails on any rank raises OSError on every rank, the earlier checkpoints untouched."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(f"{TMP}{final.name}")
    failure = None
    if world.main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a temporary directory is always ours: a crashed save
            tmp.mkdir(parents=True)
        except OSError as e:
            failure = e
    if not _failed_anywhere(failure, world):
        model_state, optimizer_state = get_state_dict(model, optimizer)
        try:
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / STATE)
        except (OSError, RuntimeError, CheckpointException) as e:  # DCP raises on every rank when one fails
            failure = e
        if world.main and failure is None:
            try:
                _write_rank0_files(tmp, step, model, tokenizer, write_files, trainer_state)
            except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
                failure = e
    if _failed_anywhere(failure, world):  # also the barrier: every rank's shards are on disk
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        why = _reason(failure) if failure is not None else "on another rank"
        raise OSError(f"writing checkpoint {final} failed ({why}); the checkpoints before it are as they were")
    if world.main:
        if final.exists():
            _discard(final)  # the same step saved again (a rerun of a finished step)
        os.rename(tmp, final)
        _prune(final, keep_last)
    barrier(world)
    return final


def _failed_anywhere(failure: BaseException | None, world: World) -> bool:
    return any(gather_objects(failure is not None, world))


def _write_rank0_files(tmp: Path, step: int, model, tokenizer, write_files, trainer_state: dict) -> None:
    (tmp / "config.json").write_text(json.dumps(config_to_dict(model.config, torch.float32), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / TOKENIZER)
    if write_files is not None:
        write_files(tmp)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "rng": rng, **trainer_state}, tmp / TRAINER_STATE)


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: renamed to a temporary name first, so that a crash mid-delete leaves
    nothing a resume would try."""
    doomed = path.with_name(f"{TMP}deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _prune(newest: Path, keep_last: int) -> None:
    """Delete leftover temporary directories and, with keep_last > 0, the checkpoints older than `newest` beyond
    the newest `keep_last` (newer ones, left by a run that resumed from an older checkpoint, are not ours to
    judge here; `newest` itself is always kept)."""
    for leftover in newest.parent.glob(f"{TMP}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last:
        older = sorted(p for p in newest.parent.glob(f"{PREFIX}*") if p.name < newest.name)
        for path in older[: max(0, len(older) - (keep_last - 1))]:
            _discard(path)


def check_complete(path: Path) -> None:
    """Raise BrokenCheckpoint naming the first missing or truncated file of checkpoint `path`."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / TRAINER_STATE).is_file():
        raise BrokenCheckpoint(f"{path}: {TRAINER_STATE} is missing (an incomplete or foreign checkpoint)")
    if not (path / STATE / ".metadata").is_file():
        raise BrokenCheckpoint(f"{path / STATE}: .metadata is missing (not a complete checkpoint)")
    try:
        metadata = FileSystemReader(path / STATE).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata means the same to the user
        raise BrokenCheckpoint(f"{path / STATE / '.metadata'}: unreadable ({e})") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / STATE / name
        if not file.is_file():
            raise BrokenCheckpoint(f"{file}: shard file is missing; the checkpoint is incomplete")
        if file.stat().st_size < size:
            raise BrokenCheckpoint(f"{file}: shard file is truncated ({file.stat().st_size} of {size} bytes)")


def complete_checkpoints(out: str | os.PathLike, warn: bool = True) -> Iterator[Path]:
    """The complete checkpoints under out/checkpoints, newest first; an incomplete one (a crash mid-save, a
    missing or truncated shard) is skipped with a warning that names it."""
    for path in sorted((Path(out) / "checkpoints").glob(f"{PREFIX}*"), key=lambda p: p.name, reverse=True):
        try:
            check_complete(path)
        except BrokenCheckpoint as e:
            _warn(path, e, warn)
            continue
        yield path


def latest_checkpoint(out: str | os.PathLike, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under out/checkpoints (see complete_checkpoints), or None."""
    return next(complete_checkpoints(out, warn), None)


def resume_latest(out: str | os.PathLike, model, optimizer, world: World) -> dict | None:
    """Load the newest checkpoint of run `out` that loads (see load_checkpoint), say so (rank 0, stderr) and
    return its trainer state; None when there is none (a fresh start). A newer one that is incomplete or that
    DCP cannot read is skipped with a warning naming it (rank 0 prints); one of another model is an error."""
    for path in complete_checkpoints(out, warn=world.main):
        try:
            state = load_checkpoint(path, model, optimizer, world)
        except BrokenCheckpoint as e:
            _warn(path, e, world.main)
            continue
        if world.main:
            print(f"resuming from step {state['step']} of {out}", file=sys.stderr)
        return state
    return None


def _warn(path: Path, error: Exception, show: bool) -> None:
    if show:
        print(f"warning: skipping checkpoint {path}: {error}", file=sys.stderr)


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
    try:
        trainer = torch.load(path / TRAINER_STATE, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise BrokenCheckpoint(f"{path / TRAINER_STATE}: unreadable ({_reason(e)})") from None
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path / STATE)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's wrapper is a BaseException
        raise BrokenCheckpoint(f"{path / STATE}: cannot be loaded ({_reason(e)})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    torch.set_rng_state(trainer["rng"]["cpu"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    barrier(world)
    return trainer


def _reason(error: BaseException) -> str:
    """One line saying why: the first rank's underlying error of a DCP failure, or the error's first line."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


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
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        raise BrokenCheckpoint(f"{checkpoint / STATE}: cannot be loaded ({_reason(e)})") from None
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
