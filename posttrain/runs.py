"""``posttrain runs``: the run directories under a root, with their status and progress.

A stage's run directory holds ``manifest.json`` (what ran) and ``status.json`` (``running``
with the pid and host of its process, or ``finished``); a recipe's holds ``recipe.yaml``
and one ``stage_done.json`` marker per finished stage. A run whose status says running but whose
process is gone (on this host) was killed or crashed: it is shown as ``stopped`` with the
checkpoint it resumes from (``--resume``, or ``resume=true``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import yaml

from posttrain.engine import STATUS_FILE, latest_checkpoint, process_start_time, read_metrics


def _alive(pid: int, started: float | None = None) -> bool:
    """Whether the process that wrote a run's status is still running: ``pid`` exists and, where
    its start time was recorded, started then (a later process may reuse the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now_started = process_start_time(pid)
    if started is not None and now_started is not None:
        return abs(now_started - started) < 2.0
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.is_file() or b"posttrain" in cmdline.read_bytes() or b"python" in cmdline.read_bytes()


def _state(run: Path, complete: bool) -> str:
    f = run / STATUS_FILE
    if not f.is_file():  # (a run killed before it wrote its status: not running, not finished)
        return "finished" if complete else "stopped"
    st = json.loads(f.read_text())
    if st.get("state") == "finished":
        return "finished"
    if st.get("host") == platform.node() and not _alive(int(st.get("pid", -1)), st.get("pid_started")):
        return "stopped"
    return "running" if st.get("host") == platform.node() else f"running on {st.get('host')}"


def _last_metrics(run: Path) -> dict:
    last: dict = {}
    for rec in read_metrics(run):
        last.update(rec)
    return last


HEADLINE = ("eval/reward_accuracy", "eval/accuracy", "eval/reward", "loss/eval", "reward/mean", "loss/train")


def run_info(run: Path) -> dict | None:
    """Status row of one run directory (None when ``run`` is not one)."""
    from posttrain.pipeline import DONE

    if (run / "recipe.yaml").is_file():
        stages = yaml.safe_load((run / "recipe.yaml").read_text()).get("stages", [])
        done = [s["name"] for s in stages if (run / s["name"] / DONE).is_file()]
        complete = len(done) == len(stages)
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        info = {"run": str(run), "kind": "recipe", "state": _state(run, complete),
                "progress": f"{len(done)}/{len(stages)} stages", "updated": (run / "recipe.yaml").stat().st_mtime}
        evals = summary.get("evals") or {}
        if evals:
            name, metrics = list(evals.items())[-1]
            overall = metrics.get("all") if isinstance(metrics, dict) else None
            if isinstance(overall, dict) and "accuracy" in overall:  # (over every question, not a mean of tasks)
                info["headline"] = f"{name}: accuracy {overall['accuracy']:.1%}"
        if not complete and info["state"] == "finished":
            info["state"] = "stopped"
        return info
    if not (run / "manifest.json").is_file():
        return None
    manifest = json.loads((run / "manifest.json").read_text())
    last = _last_metrics(run)
    ckpt = latest_checkpoint(run)
    complete = (run / "model").is_dir()
    info = {"run": str(run), "kind": manifest.get("stage", "?"), "state": _state(run, complete),
            "progress": f"step {last.get('step', 0)}" + (f" (checkpoint {ckpt.name})" if ckpt else ""),
            "updated": max((p.stat().st_mtime for p in (run / "metrics.jsonl", run / STATUS_FILE) if p.is_file()),
                           default=(run / "manifest.json").stat().st_mtime)}
    for key in HEADLINE:
        if key in last:
            info["headline"] = f"{key} {last[key]:.4g}"
            break
    return info


def find_runs(roots: list[str | Path]) -> list[dict]:
    """Every run directory directly under (or equal to) each root, newest first; a recipe's
    stage directories are shown as part of the recipe, not on their own."""
    found = []
    for root in map(Path, roots):
        recipe = (root / "recipe.yaml").is_file()  # its subdirectories are its stages
        candidates = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() and not recipe else [])
        for d in candidates:
            info = run_info(d)
            if info:
                found.append(info)
    found.sort(key=lambda r: -r["updated"])
    return found


def print_runs(rows: list[dict]) -> None:
    from rich.table import Table

    from posttrain.log import console

    table = Table(title=f"{len(rows)} runs")
    for col in ("run", "kind", "status", "progress", "last", "updated"):
        table.add_column(col)
    style = {"finished": "green", "stopped": "red", "running": "yellow"}
    for r in rows:
        table.add_row(r["run"], r["kind"], f"[{style.get(r['state'], 'white')}]{r['state']}[/]", r["progress"],
                      r.get("headline", ""), time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated"])))
    console.print(table)
