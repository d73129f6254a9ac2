"""Output directories that forkflow commands own: a marker file tells a previous forkflow run, which a command may
replace, from a directory of the user's, which it must never delete or write into."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from forkflow.config import ConfigError

MARKER = ".forkflow-run"  # {"kind": "<command>"}, written into every run directory forkflow creates


class RunDirError(ConfigError):
    """The output directory cannot be used without destroying files forkflow did not write."""


def prepare_run_dir(path: str | Path, kind: str, replace: bool = False, option: str = "--out") -> Path:
    """Make `path` a run directory of `kind` and return it; raise RunDirError rather than touch the user's files.

    Usable: a path that does not exist (created), an empty directory, or a directory whose marker says it is a
    previous run of the same kind; with replace=True that run's contents are deleted first, otherwise kept
    (a command may resume from them). Refused, with nothing deleted: a file, a directory with other content and
    no marker, and a run of another kind. `option` names how the user picks the directory, for the error message.
    """
    path = Path(path)
    marker, tmp = path / MARKER, path / f"{MARKER}.tmp"
    fix = f"choose another {option} or empty that directory"
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory; refusing to replace it with a {kind!r} run: "
                          f"choose another {option}")
    if path.is_dir() and any(child != tmp for child in path.iterdir()):  # tmp: a marker being written
        if not marker.is_file():
            raise RunDirError(f"{path} already holds files and no {MARKER} marker of a previous forkflow run; "
                              f"refusing to delete or overwrite them: {fix}")
        found = _marker_kind(marker)
        if found != kind:
            what = "an unreadable marker" if found is None else f"a forkflow {found!r} run"
            raise RunDirError(f"{path} holds {what}, not a {kind!r} run; refusing to delete or overwrite it: {fix}")
        if replace:
            for child in path.iterdir():  # the children, not `path` itself, which may be a symlink the user made
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    if _marker_kind(marker) != kind:  # written once, atomically: a run killed now never leaves half a marker
        tmp.write_text(json.dumps({"kind": kind}) + "\n")
        os.replace(tmp, marker)
    return path


def _marker_kind(marker: Path) -> str | None:
    try:
        content = json.loads(marker.read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON
        return None
    kind = content.get("kind") if isinstance(content, dict) else None
    return kind if isinstance(kind, str) else None
