"""Read rows from files and report bad rows by file, line and field.

Readers: JSONL (``.jsonl``/``.ndjson``), JSON (a list of objects, or ``{"data": [...]}``),
Parquet, CSV, and directories written by ``datasets.Dataset.save_to_disk``. Each row comes
with its origin, ``file:line`` for line-based files (JSONL, CSV with its header on line 1)
and ``file:row N`` (1-based) for the others, so every error can point at it.

Bad rows are handled in one place, :class:`BadRows`: by default the first one raises
:class:`BadRowError` naming origin, field and reason; with ``skip_bad_rows`` every bad row
is counted by reason and reported at the end of loading.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BadRowError(ValueError):
    """A row that cannot be used; the message names file, line and field."""

    def __init__(self, origin: str, field: str | None, reason: str):
        self.origin, self.field, self.reason = origin, field, reason
        where = f"{origin}: field '{field}'" if field else origin
        super().__init__(f"{where}: {reason}")


@dataclass
class Row:
    """One raw row and where it came from."""

    data: dict[str, Any]
    origin: str  # "path:line" or "path:row N"


@dataclass
class BadRows:
    """Policy and tally for bad rows: raise on the first, or skip and count them all."""

    skip: bool = False
    counts: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def handle(self, err: BadRowError) -> None:
        if not self.skip:
            raise err
        self.counts[err.reason.split(":")[0]] += 1
        if len(self.errors) < 100_000:
            self.errors.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad rows"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"skipped {self.total} bad rows ({parts})"


SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def file_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (
            path / "dataset_dict.json"
        ).is_file():
            return "arrow"
        raise BadRowError(str(path), None, "directory is not a datasets.save_to_disk directory")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise BadRowError(
            str(path), None, f"unknown file type '{path.suffix}' (expected .jsonl, .json, .parquet, .csv or a "
            "save_to_disk directory)"
        )
    return kind


def iter_rows(path: str | Path, bad: BadRows) -> Iterator[Row]:
    """Yield the rows of ``path`` as dicts; malformed rows go to ``bad``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    kind = file_kind(path)
    if kind == "jsonl":
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                origin = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.handle(BadRowError(origin, None, f"invalid JSON: {e.msg} at column {e.colno}"))
                    continue
                if not isinstance(obj, dict):
                    bad.handle(BadRowError(origin, None, f"not a JSON object: got {type(obj).__name__}"))
                    continue
                yield Row(obj, origin)
        return
    if kind == "json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BadRowError(f"{path}:{e.lineno}", None, f"invalid JSON: {e.msg}") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise BadRowError(str(path), None, "a .json data file must hold a list of objects (or {'data': [...]})")
        for i, item in enumerate(obj, start=1):
            origin = f"{path}:row {i}"
            if not isinstance(item, dict):
                bad.handle(BadRowError(origin, None, f"not a JSON object: got {type(item).__name__}"))
                continue
            yield Row(item, origin)
        return
    if kind == "csv":
        import pandas as pd

        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
        for i, rec in enumerate(frame.to_dict(orient="records")):
            yield Row(_decode_json_cells(rec), f"{path}:{i + 2}")  # line 1 is the header
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield Row(rec, f"{path}:row {i}")
        return
    if kind == "arrow":
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise BadRowError(str(path), None, f"DatasetDict without a 'train' split (has {list(ds)})")
            ds = ds["train"]
        for i, rec in enumerate(ds, start=1):
            yield Row(dict(rec), f"{path}:row {i}")
        return


def _decode_json_cells(rec: dict[str, Any]) -> dict[str, Any]:
    """CSV cells that hold JSON lists/objects (e.g. a ``messages`` column) are decoded."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, str) and v[:1] in "[{":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out
