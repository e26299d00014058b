"""posttrain SFT tokens/s with ``batching=pad`` (the default) vs ``batching=flatten``.

Usage::

    .venv/bin/python benchmarks/batching.py               # 6 steps per run, pad/flatten/flatten/pad
    .venv/bin/python benchmarks/batching.py --steps 4 --rounds 1

Same setup as benchmarks/sft_vs_trl.py (embedded SmolLM2-135M-Instruct, worked
arithmetic solutions, batch size 8, max length 256, lr 1e-4) and the same measurement:
non-padding tokens per second over the steady-state window (end of step 1 to end of the
last step), each run in a fresh ``spawn`` subprocess, and, because the machine may be
shared, over the steps during which other processes left the CPU idle. Both modes
train on exactly the same batches (posttrain's length-grouped order), so their losses
must agree; the script checks that too. ``--rounds 2`` (default) runs
pad, flatten, flatten, pad so that a slow drift of the machine cancels out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from sft_vs_trl import run_posttrain


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rounds", type=int, default=2, help="1: pad, flatten; 2: pad, flatten, flatten, pad")
    p.add_argument("--wait-quiet", type=float, default=300, metavar="S")
    p.add_argument("--json", default=str(C.RESULTS / "batching.json"))
    a = p.parse_args(argv)

    from posttrain.models import embedded_model_dir

    work = Path(tempfile.mkdtemp(prefix="posttrain-batching-"))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"== posttrain SFT: batching=pad vs batching=flatten  ({started}, load average {C.loadavg()})", flush=True)
    model_dir = str(embedded_model_dir())
    n = a.steps * a.batch_size
    train_file = C.write_jsonl(C.sft_rows(n), work / "train.jsonl")
    modes = ["pad", "flatten"] + (["flatten", "pad"] if a.rounds >= 2 else [])
    runs: dict[str, list[dict]] = {"pad": [], "flatten": []}
    for i, mode in enumerate(modes):
        quiet = C.wait_quiet(a.wait_quiet) if a.wait_quiet > 0 else {}
        spec = {"name": mode, "model_dir": model_dir, "train_file": str(train_file), "batch_size": a.batch_size,
                "max_length": a.max_length, "lr": a.lr, "steps": a.steps, "out_dir": str(work / f"{mode}-{i}"),
                "extra": [f"batching={mode}"]}
        print(f"\n-- batching={mode} (run {i + 1}/{len(modes)}; load average {C.loadavg()}; "
              f"quiet start: {'yes' if quiet.get('quiet') else 'no'})", flush=True)
        r = C.run_in_subprocess(run_posttrain, spec)
        if "error" in r:
            print(f"FAILED: {r['error']}\n{r.get('traceback', '')}")
            return 1
        rate, basis = C.pick_quiet(r, "tokens_per_s")
        r["rate"], r["rate_basis"] = rate, basis
        runs[mode].append(r)
        print(f"batching={mode}: {rate:,.1f} tok/s ({basis}; all steps {r['tokens_per_s']:,.1f}), final loss "
              f"{r['losses'][-1]:.4f}, peak RSS {r['rss_train_mb']:,.0f} MB", flush=True)
        for st in r.get("per_step", []):
            print(f"   step {st['step']:>3}: {st['s']:6.2f} s  {st['tokens']:>5} tokens  "
                  f"{st['tokens'] / st['s']:7.1f} tok/s  other processes {st['other_cores_busy']} cores", flush=True)

    def mean(xs):
        return sum(xs) / len(xs)

    summary = {"benchmark": "posttrain SFT batching pad vs flatten", "started": started,
               "config": {"steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length, "lr": a.lr,
                          "order": modes}, "machine": C.machine(), "modes": {}}
    for mode, rs in runs.items():
        summary["modes"][mode] = {
            "tokens_per_s": round(mean([r["rate"] for r in rs]), 1),
            "runs": [{"tokens_per_s": round(r["rate"], 1), "basis": r["rate_basis"],
                      "tokens_per_s_all_steps": round(r["tokens_per_s"], 1), "final_loss": r["losses"][-1],
                      "losses": r["losses"], "rss_train_mb": round(r["rss_train_mb"], 1),
                      "per_step": r.get("per_step")} for r in rs],
        }
    pad, flat = summary["modes"]["pad"], summary["modes"]["flatten"]
    faster = "pad" if pad["tokens_per_s"] >= flat["tokens_per_s"] else "flatten"
    ratio = flat["tokens_per_s"] / pad["tokens_per_s"]
    loss_pad, loss_flat = runs["pad"][0]["losses"], runs["flatten"][0]["losses"]
    max_gap = max(abs(x - y) / abs(x) for x, y in zip(loss_pad, loss_flat))
    summary.update({"faster": faster, "flatten_over_pad": round(ratio, 3), "max_step_loss_gap": round(max_gap, 5)})
    print("\n" + "=" * 80)
    for mode in ("pad", "flatten"):
        m = summary["modes"][mode]
        print(f"batching={mode:<8} {m['tokens_per_s']:>8,.1f} tok/s  (runs: "
              + ", ".join(f"{r['tokens_per_s']:,.1f} [{r['basis']}]" for r in m["runs"])
              + f")  final loss {m['runs'][0]['final_loss']:.4f}  RSS {m['runs'][0]['rss_train_mb']:,.0f} MB")
    print(f"faster: {faster} (flatten / pad = {ratio:.2f}x); largest per-step loss gap {max_gap:.2e} "
          f"({'OK' if max_gap < 1e-3 else 'MISMATCH: the two layouts do not train the same'}); default is pad")
    print("=" * 80)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"summary written to {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
