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

import csv
import io
import json
import re
import sys
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
        self.counts[re.split(r":| \(", err.reason, maxsplit=1)[0]] += 1  # the kind of problem, before its details
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
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    kind = file_kind(path)
    for row in _raw_rows(path, kind, bad):
        text = _unencodable_text(row.data)
        if text is not None:  # a lone surrogate ("\\ud800" in JSON): no tokenizer takes it
            bad.handle(BadRowError(row.origin, text, "text that is not valid Unicode (a lone surrogate code point)"))
            continue
        yield row


def _raw_rows(path: Path, kind: str, bad: BadRows) -> Iterator[Row]:
    if kind == "jsonl":
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                origin = f"{path}:{lineno}"
                try:  # (a byte-order mark at the start of the file is not part of the row)
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    if lineno == 1:
                        _refuse_utf16(path, raw)
                    bad.handle(BadRowError(origin, None, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column "
                                           f"{e.start + 1}"))
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.handle(BadRowError(origin, None, f"invalid JSON: {e.msg} at column {e.colno}"))
                    continue
                except RecursionError:
                    bad.handle(BadRowError(origin, None, "invalid JSON: nested too deeply to read"))
                    continue
                if not isinstance(obj, dict):
                    hint = (" (the file holds one JSON array: name it .json, or write one object per line)"
                            if lineno == 1 and isinstance(obj, list) else "")
                    bad.handle(BadRowError(origin, None, f"not a JSON object: got {type(obj).__name__}{hint}"))
                    continue
                yield Row(obj, origin)
        return
    if kind == "json":
        try:
            obj = json.loads(_utf8_text(path))
        except json.JSONDecodeError as e:
            hint = (" (one JSON object per line? name the file .jsonl)"
                    if e.msg == "Extra data" and e.colno == 1 else "")
            raise BadRowError(f"{path}:{e.lineno}", None, f"invalid JSON: {e.msg}{hint}") from None
        except RecursionError:
            raise BadRowError(str(path), None, "invalid JSON: nested too deeply to read") from None
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
        yield from _csv_rows(path, bad)
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError, ...)
            raise BadRowError(str(path), None, f"not a readable Parquet file: {e}") from None
        for i, rec in enumerate(table.to_pylist(), start=1):
            yield Row(rec, f"{path}:row {i}")
        return
    if kind == "arrow":
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 (missing or corrupt arrow files)
            raise BadRowError(str(path), None, f"not a readable datasets.save_to_disk directory: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise BadRowError(str(path), None, f"DatasetDict without a 'train' split (has {list(ds)})")
            ds = ds["train"]
        for i, rec in enumerate(ds, start=1):
            yield Row(dict(rec), f"{path}:row {i}")
        return


def _refuse_utf16(path: Path, head: bytes) -> None:
    """A file whose first bytes are a UTF-16 byte-order mark is an error that says so."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise BadRowError(str(path), None, "UTF-16 text (a byte-order mark says so): save it as UTF-8")


def _utf8_text(path: Path) -> str:
    """The file as text (a byte-order mark dropped); a clear error where it is not UTF-8."""
    data = path.read_bytes()
    _refuse_utf16(path, data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BadRowError(f"{path}:{line}", None, f"not UTF-8 text: byte 0x{data[e.start]:02x}") from None


def _csv_rows(path: Path, bad: BadRows) -> Iterator[Row]:
    """CSV rows as strings by header name, each at the line it starts on (a quoted cell may
    span lines); a row with more or fewer cells than the header is a bad row."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # (the default, 131,072 characters, cuts long documents)
    reader = csv.reader(io.StringIO(_utf8_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise BadRowError(str(path), None, "empty CSV file (no header line)") from None
    except csv.Error as e:
        raise BadRowError(f"{path}:1", None, f"unreadable CSV header: {e}") from None
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise BadRowError(f"{path}:1", repeated[0], f"column {repeated[0]!r} appears {header.count(repeated[0])} "
                          "times in the header (each row would keep only the last)")
    end = reader.line_num
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            bad.handle(BadRowError(f"{path}:{start}", None, f"unreadable CSV row: {e}"))
            end = reader.line_num
            continue
        end = reader.line_num
        if not cells:  # a blank line
            continue
        if len(cells) != len(header):
            bad.handle(BadRowError(f"{path}:{start}", None, f"wrong number of cells: {len(cells)} where the header "
                                   f"has {len(header)} ({', '.join(header)})"))
            continue
        yield Row(_decode_json_cells(dict(zip(header, cells))), f"{path}:{start}")


def _unencodable_text(obj: Any, where: str = "") -> str | None:
    """The field (``messages[1].content``) of the first string in ``obj`` that cannot be
    encoded as UTF-8, or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where or "(row)"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _unencodable_text(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


#: CSV columns whose cells hold structure (JSON lists/objects) in every format that has them
STRUCTURED_COLUMNS = {"messages", "conversations", "responses", "completions", "ranking", "scores", "steps",
                      "labels", "history"}


def _decode_json_cells(rec: dict[str, Any]) -> dict[str, Any]:
    """CSV cells that hold JSON structure are decoded: the columns that always do (a
    ``messages`` column), and elsewhere a cell that decodes to a message list (a ``prompt``
    given as turns). Any other cell stays the text it is, JSON-looking or not (a completion
    that is a JSON object, a ``text`` cell holding ``[1, 2]``)."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, str) and v.lstrip()[:1] in ("[", "{"):
            try:
                parsed = json.loads(v)
            except (json.JSONDecodeError, RecursionError):
                parsed = None
            message_list = isinstance(parsed, list) and bool(parsed) and all(
                isinstance(m, dict) and "role" in m for m in parsed)
            if parsed is not None and (k in STRUCTURED_COLUMNS or message_list):
                v = parsed
        out[k] = v
    return out
