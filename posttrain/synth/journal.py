"""Crash-safe synthesis: work in chunks, append each chunk's rows, then record progress.

A synthesis job (rejection sampling, critique-and-revision, AI judging) turns a list of
inputs into rows of one or more JSONL files. :func:`run_chunks` does it chunk by chunk:

1. ``produce(c, lo, hi)`` makes the rows (and optional statistics) of inputs ``lo:hi``;
   it must depend only on the chunk (seed it with ``c``), so a restarted chunk gives the
   same rows as the first attempt;
2. the rows are appended to each output file and flushed to disk (``fsync``);
3. the progress marker ``<first output>.progress.json`` is replaced atomically with the
   number of chunks done and each file's size in bytes.

A restart with the same ``key`` (a fingerprint of the inputs and settings) cuts each file
back to the size the marker vouches for (rows appended after the last marker are dropped,
and the chunk that wrote them runs again) and continues with the next chunk: no row is
generated twice, duplicated or lost. A different key starts over. A finished job is
recognised and not run again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain import faults
from posttrain.fileio import atomic_write
from posttrain.log import log

Produce = Callable[[int, int, int], tuple[dict[str, list[dict]], dict[str, Any]]]


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def marker_path(outputs: dict[str, Path]) -> Path:
    first = Path(next(iter(outputs.values())))
    return first.with_name(first.name + ".progress.json")


def run_chunks(outputs: dict[str, str | Path], n_items: int, chunk_size: int, key: str, produce: Produce,
               desc: str = "synthesis") -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Run ``produce`` over ``n_items`` inputs in chunks, appending to ``outputs`` (name ->
    JSONL path); returns (rows written per output, every chunk's statistics in order)."""
    from posttrain.engine import progress

    outputs = {k: Path(v) for k, v in outputs.items()}
    marker = marker_path(outputs)
    n_chunks = -(-n_items // chunk_size) if n_items else 0
    state = {"key": key, "chunks_done": 0, "n_chunks": n_chunks, "sizes": dict.fromkeys(outputs, 0),
             "rows": dict.fromkeys(outputs, 0), "stats": []}
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old.get("key") == key and set(old.get("sizes", {})) == set(outputs):
            state = old
            if state["chunks_done"] < n_chunks:
                log(f"{desc}: resuming after chunk {state['chunks_done']} of {n_chunks} ({marker})")
    for name, path in outputs.items():  # cut back to what the marker vouches for
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.truncate(state["sizes"][name])
    with progress() as bar:
        task = bar.add_task(desc, total=n_chunks, completed=state["chunks_done"], status="")
        for c in range(state["chunks_done"], n_chunks):
            lo, hi = c * chunk_size, min(n_items, (c + 1) * chunk_size)
            rows, stats = produce(c, lo, hi)
            for name, path in outputs.items():
                with open(path, "ab") as fh:
                    fh.write("".join(json.dumps(r) + "\n" for r in rows.get(name, [])).encode())
                    fh.flush()
                    os.fsync(fh.fileno())
                    state["sizes"][name] = fh.tell()
                state["rows"][name] += len(rows.get(name, []))
            faults.point("synth")
            state["chunks_done"] = c + 1
            state["stats"].append(stats)
            atomic_write(marker, json.dumps(state))
            bar.update(task, advance=1, status=" ".join(f"{k} {v}" for k, v in state["rows"].items()))
    return dict(state["rows"]), list(state["stats"])


def sum_stats(parts: list[dict]) -> dict:
    """Sum of nested dicts of numbers (per-chunk counters into one)."""
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            if isinstance(v, dict):
                out[k] = sum_stats([out.get(k, {}), v])
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
