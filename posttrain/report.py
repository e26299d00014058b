"""Plots and an HTML page for a run directory (``posttrain report RUN_DIR``).

Reads ``metrics.jsonl`` and draws one panel per metric namespace prefix group
(``loss/*`` together, then each other key), writes ``report.png`` and ``report.html``
(the plot, the resolved config, the last metric values, and ``samples.jsonl`` as a
table when present).
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

from posttrain.engine import read_jsonl, read_metrics


def _series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for r in records:
        for k, v in r.items():
            if k in ("step", "time") or not isinstance(v, (int, float)):
                continue
            out[k][0].append(r["step"])
            out[k][1].append(float(v))
    return dict(out)


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """``report.png``: loss curves together, then one panel per other metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    series = _series(read_metrics(run_dir))
    if not series:
        return None
    losses = sorted(k for k in series if k.startswith("loss/"))
    others = [k for k in sorted(series) if not k.startswith("loss/") and len(series[k][0]) > 1]
    panels = ([losses] if losses else []) + [[k] for k in others]
    if not panels:  # nothing with a curve to draw (one point of each metric)
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, keys in zip(axes.flat, panels):
        for k in keys:
            xs, ys = series[k]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=k)
        ax.set_title(", ".join(keys) if len(keys) < 3 else "losses")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = Path(out) if out else run_dir / "report.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_recipe_report(run_dir: Path) -> Path:
    """A recipe run: accuracy per stage (``accuracy.png``), then each stage with its own report."""
    import yaml

    from posttrain.pipeline import DONE

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    title = html.escape(recipe.get("name", run_dir.name))
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>",
             f"<h1>posttrain recipe: {title} ({html.escape(str(run_dir))})</h1>"]
    if (run_dir / "accuracy.png").is_file():
        parts.append("<h2>Held-out accuracy per stage</h2><img src='accuracy.png'>")
    parts.append("<h2>Stages</h2><table border=1 cellpadding=3><tr><th>stage</th><th>kind</th><th>status</th>"
                 "<th>seconds</th><th>outputs</th></tr>")
    for st in recipe.get("stages", []):
        d = run_dir / st["name"]
        done = json.loads((d / DONE).read_text()) if (d / DONE).is_file() else None
        if (d / "metrics.jsonl").is_file():
            write_report(d)
        link = f"<a href='{html.escape(st['name'])}/report.html'>report</a>" if (d / "report.html").is_file() else ""
        outs = (done or {}).get("outputs", {})
        parts.append(f"<tr><td>{html.escape(st['name'])}</td><td>{html.escape(st['kind'])}</td>"
                     f"<td>{'finished' if done else 'not finished'}</td><td>{(done or {}).get('seconds', '')}</td>"
                     f"<td>{html.escape(json.dumps(outs))} {link}</td></tr>")
    parts.append("</table>")
    for st in recipe.get("stages", []):
        if (run_dir / st["name"] / "report.png").is_file():
            parts.append(f"<h3>{html.escape(st['name'])}</h3><img src='{html.escape(st['name'])}/report.png' "
                         "style='max-width:100%'>")
        if not (run_dir / st["name"] / "metrics.jsonl").is_file():  # e.g. win rates: before/after examples
            parts += _samples_table(run_dir / st["name"] / "samples.jsonl", f"{st['name']}: samples")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    return out


def _samples_table(path: Path, title: str, limit: int = 50) -> list[str]:
    """HTML of the first ``limit`` rows of a ``samples.jsonl`` (nothing when there is none)."""
    rows = read_jsonl(path)
    if not rows:
        return []
    keys = list(rows[0])
    out = [f"<h2>{html.escape(title)}</h2><table border=1 cellpadding=3><tr>"
           + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"]
    out += ["<tr>" + "".join(f"<td><pre>{html.escape(str(r.get(k, '')))}</pre></td>" for k in keys) + "</tr>"
            for r in rows[:limit]]
    return out + ["</table>"]


def write_report(run_dir: str | Path) -> Path:
    """``report.html`` (and ``report.png``) for ``run_dir``; returns the HTML path. A recipe
    run gets a page of its stages with the accuracy-per-stage plot."""
    run_dir = Path(run_dir)
    if (run_dir / "recipe.yaml").is_file():
        return write_recipe_report(run_dir)
    png = plot_metrics(run_dir)
    records = read_metrics(run_dir)
    last: dict[str, float] = {}
    for r in records:
        last.update({k: v for k, v in r.items() if k not in ("time",)})
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(run_dir.name)}</title></head><body>",
             f"<h1>posttrain run: {html.escape(str(run_dir))}</h1>"]
    if png:
        parts.append(f"<img src='{png.name}' style='max-width:100%'>")
    if last:
        parts.append("<h2>Last values</h2><table border=1 cellpadding=3>")
        parts += [f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in sorted(last.items())]
        parts.append("</table>")
    parts += _samples_table(run_dir / "samples.jsonl", "Samples")
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        parts.append(f"<h2>Config</h2><pre>{html.escape(cfg.read_text())}</pre>")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    return out
