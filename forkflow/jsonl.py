"""JSON-lines files, one record per line: reading with errors that name the file and line, and writing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


class InputError(ValueError):
    """Bad input a person must fix; the message names the file and line, e.g. `data.jsonl line 3: ...`."""


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; each line must be a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise InputError(f"{path}: no records (the file is empty)")
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def token_id_list(record: dict, key: str, where: str) -> list[int]:
    """record[key] checked to be a list of ints (token ids)."""
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InputError(f"{where}: field '{key}' must be a list of token ids (integers)")
    return value
