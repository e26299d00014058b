"""Variants of the reasoning recipe side by side: which setting buys held-out accuracy?

Each variant is ``recipes/reasoning.yaml`` with some keys changed (top-level keys such as
``n_train``, or a stage's ``config`` keys), written to ``<out>/<variant>/recipe.yaml`` and run
with ``posttrain run`` in its own process; ``--parallel`` of them at a time (on one GPU the
135M model leaves the card mostly idle, so several runs share it well). At the end a table
of held-out accuracy per task and eval stage, and the wall time of each run, is printed and
written to ``<out>/sweep.json``.

    python benchmarks/reasoning_sweep.py --list
    python benchmarks/reasoning_sweep.py --variants ref,lr4e-4 --parallel 2 --n-test 100
    python benchmarks/reasoning_sweep.py --smoke          # the recipe's quick block, to check the plumbing

A stopped sweep continues where it stopped (each run resumes from its last finished stage).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "reasoning.yaml"
SFT_ONLY = ("cold_start", "after_sft")

# the small-cold variants' cold start and samples (one set: a run of either reuses the other's stages)
SMALL_COLD = {"cold_start": {"max_steps": 200}, "rejection_sampling": {"n": 240, "k": 1}}
# their round 2 as a full fine-tune, and the stages up to its eval
FULL_ROUND2 = {"sft_round2": {"model.lora": False, "batch_size": 2, "lr": 1.0e-4, "warmup_ratio": 0.1}}
THROUGH_ROUND2 = ("cold_start", "after_sft", "rejection_sampling", "sft_round2", "after_round2")

# name -> (stages to keep: None = all, names = those, "!name"s = all but those; top-level changes;
#          {stage: config changes})
VARIANTS: dict[str, tuple[tuple[str, ...] | None, dict, dict]] = {
    "ref": (SFT_ONLY, {}, {}),
    "lr1e-4": (SFT_ONLY, {}, {"cold_start": {"lr": 1.0e-4}}),
    "lr4e-4": (SFT_ONLY, {}, {"cold_start": {"lr": 4.0e-4}}),
    "lr8e-4": (SFT_ONLY, {}, {"cold_start": {"lr": 8.0e-4}}),
    "bs4": (SFT_ONLY, {}, {"cold_start": {"batch_size": 4, "max_steps": 240}}),
    "bs4-lr4e-4": (SFT_ONLY, {}, {"cold_start": {"batch_size": 4, "max_steps": 240, "lr": 4.0e-4}}),
    "bs2": (SFT_ONLY, {}, {"cold_start": {"batch_size": 2, "max_steps": 480}}),
    "bs1": (SFT_ONLY, {}, {"cold_start": {"batch_size": 1, "max_steps": 960}}),
    "bs2-lr1e-4": (SFT_ONLY, {}, {"cold_start": {"batch_size": 2, "max_steps": 480, "lr": 1.0e-4}}),
    "2pass": (SFT_ONLY, {}, {"cold_start": {"max_steps": 240}}),
    "data2x": (SFT_ONLY, {"n_train": 480}, {"cold_start": {"max_steps": 240}}),
    "data4x": (SFT_ONLY, {"n_train": 960}, {"cold_start": {"max_steps": 480}}),
    # every stage of the recipe but the baseline eval (on --n-test questions a task, where the demo evaluates 24);
    # a cold start already made by "ref" is reused when its directory is copied to this variant's
    "full": (("!baseline",), {}, {}),
    # the R1 shape with a small cold start: a third of the cold-start pass, then a rejection-sampling
    # round over 240 fresh questions (one sample each, plus a repair of each wrong one) fully
    # fine-tuned on, then GRPO: how many points the later stages add to a weaker SFT-only model
    "small-cold": (("!baseline",), {}, {**SMALL_COLD, **FULL_ROUND2}),
    # small-cold's rounds with the recipe's LoRA round 2 (copy small-cold's run directory, less
    # sft_round2 and the stages after it, to reuse its cold start and samples)
    "small-cold-lora": (THROUGH_ROUND2, {}, SMALL_COLD),
    # small-cold with up to 8 repairs a wrong sample instead of 2 (copy small-cold's cold_start,
    # after_sft and data directories): a GCD chain that errs in several steps can then be
    # repaired to the end, where 2 rounds left mostly the short chains
    "small-cold-repair8": (THROUGH_ROUND2, {}, {
        **SMALL_COLD, "rejection_sampling": {**SMALL_COLD["rejection_sampling"], "repair_rounds": 8}, **FULL_ROUND2}),
    # the whole recipe, then 20 more GRPO steps in two stages of 10 with an eval after each
    "full-grpo30": (None, {}, {"__extra__": [
        {"name": "grpo_b", "kind": "grpo", "base": "grpo"}, {"name": "eval_b", "kind": "eval", "base": "final"},
        {"name": "grpo_c", "kind": "grpo", "base": "grpo"}, {"name": "eval_c", "kind": "eval", "base": "final"}]}),
}


def _kept(stage: str, keep: tuple[str, ...] | None) -> bool:
    """Whether a variant keeps ``stage``: every stage (None), the names listed, or every stage
    but those listed as ``!name``."""
    if keep is None:
        return True
    dropped = {k[1:] for k in keep if k.startswith("!")}
    return stage not in dropped if dropped else stage in keep


def variant_recipe(name: str, base: dict, n_test: int | None, eval_batch: int | None, smoke: bool) -> dict:
    keep, top, per_stage = VARIANTS[name]
    raw = copy.deepcopy(base)
    quick = raw.pop("quick", {}) or {}
    stages = {s["name"]: s for s in raw["stages"]}
    for extra in per_stage.get("__extra__", []):
        st = copy.deepcopy(stages[extra["base"]])
        st["name"] = extra["name"]
        raw["stages"].append(st)
    raw["stages"] = [s for s in raw["stages"] if _kept(s["name"], keep)]
    raw.update(top)
    for st in raw["stages"]:
        st.setdefault("config", {}).update(per_stage.get(st["name"], {}))
        if st["kind"] == "eval" and eval_batch:
            st["config"]["batch_size"] = eval_batch
    if n_test:
        raw["n_test"] = n_test
    if smoke:  # the quick block's sizes, stage by stage (extra stages take their base's)
        qstages = quick.get("stages", {})
        raw.update({k: v for k, v in quick.items() if k in ("n_train", "n_test")})
        for st in raw["stages"]:
            base_name = next((e["base"] for e in per_stage.get("__extra__", []) if e["name"] == st["name"]), st["name"])
            st["config"].update(qstages.get(base_name, {}))
    return raw


def accuracy_table(results: dict[str, dict]) -> str:
    lines = [f"{'variant':<14} {'stage':<12} {'overall':>7}  per task                                   seconds"]
    for name, res in results.items():
        summary = res.get("summary") or {}
        evals = summary.get("evals", {})
        if not evals:
            lines.append(f"{name:<14} {'-':<12} {'-':>7}  {res.get('error', 'no eval')}")
        for stage, metrics in evals.items():
            overall = metrics["all"]["accuracy"]
            tasks = "  ".join(f"{t[:4]} {100 * m['accuracy']:5.1f}" for t, m in sorted(metrics.items()) if t != "all")
            lines.append(f"{name:<14} {stage:<12} {100 * overall:6.1f}%  {tasks:<42} {summary.get('seconds', 0):7.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time")
    ap.add_argument("--n-test", type=int, default=None, help="held-out questions per task (recipe: 24)")
    ap.add_argument("--eval-batch", type=int, default=None, help="eval stages' batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / parallel)")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--smoke", action="store_true", help="the recipe's quick sizes (plumbing check)")
    args = ap.parse_args()
    if args.list:
        for name, (keep, top, per_stage) in VARIANTS.items():
            print(f"{name:<14} stages={','.join(keep) if keep else 'all'} {top or ''} {per_stage or ''}")
        return
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    base = yaml.safe_load(RECIPE.read_text())
    out = Path(args.out)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    pending, running, results = list(names), {}, {}
    t0 = time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            d = out / name
            d.mkdir(parents=True, exist_ok=True)
            recipe = variant_recipe(name, base, args.n_test, args.eval_batch, args.smoke)
            recipe["output_dir"] = str(d / "run")
            (d / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            log = open(d / "log.txt", "a")  # noqa: SIM115 (closed when the run ends)
            cmd = [sys.executable, "-m", "posttrain", "run", str(d / "recipe.yaml")]
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log,
                             time.time())
            print(f"[{time.time() - t0:6.0f} s] started {name}", flush=True)
        time.sleep(2)
        for name, (proc, log, ts) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            summary_file = out / name / "run" / "summary.json"
            res = {"returncode": proc.returncode, "wall_s": round(time.time() - ts, 1)}
            if summary_file.is_file():
                res["summary"] = json.loads(summary_file.read_text())
            else:
                tail = (out / name / "log.txt").read_text().splitlines()[-5:]
                res["error"] = f"exit {proc.returncode}: " + " | ".join(tail)[-300:]
            results[name] = res
            print(f"[{time.time() - t0:6.0f} s] finished {name} (exit {proc.returncode}, {res['wall_s']:.0f} s)\n"
                  + accuracy_table({name: res}), flush=True)
    table = accuracy_table({n: results[n] for n in names if n in results})
    print(table)
    (out / "sweep.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    (out / "sweep.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
