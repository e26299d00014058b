"""Speed of verifier-guided repair: continuations that end at the line of their first false
claim (``stop_when``, posttrain.synth.rejection.repair_responses) against continuations
decoded to the end and cut afterwards, from the same model, questions and seeds.

A reasoning model (default: the demo's cold-start model) answers ``--questions`` fresh
questions of ``--task`` once each at temperature 0.4 and repairs the wrong answers in up to
``--rounds`` rounds, once each way, each in its own spawned process (the same sampling
either way; the draws of the rows left in a batch differ once one row ends early, so the
kept counts are two samples of the same process, not the same rows). Printed: seconds of
each way (the first draw, which is the same, included), new tokens decoded in the repair
rounds, and responses repaired and kept.

    python benchmarks/repair_speed.py --model runs/reasoning/cold_start/model --task gcd
"""

from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS, machine, run_in_subprocess, wait_quiet


def _run(spec: dict) -> dict:
    import torch

    import posttrain.synth.rejection as rej
    from posttrain.models import load_model
    from posttrain.synth.tasks import problems

    torch.manual_seed(0)
    model, tok = load_model(spec["model"], with_tokenizer=True, inference=True)
    questions = problems(spec["task"], spec["questions"], "train", seed=spec["seed"])
    real, counted = rej.generate, {"calls": 0, "repair_tokens": 0}

    def generate(model, tok, convs, cfg, prefixes=None, stop_when=None):
        out = real(model, tok, convs, cfg, prefixes=prefixes, stop_when=stop_when if spec["stop"] else None)
        if prefixes is not None:
            counted["calls"] += 1
            counted["repair_tokens"] += sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in out)
        return out

    rej.generate = generate
    cfg = rej.RejectionConfig(k=1, temperature=0.4, max_new_tokens=640, max_tokens=640, keep_per_question=1,
                              batch_size=64, repair_rounds=spec["rounds"], repair_per_question=1)
    t0 = time.perf_counter()
    res = rej.rejection_sample(model, tok, questions, cfg)
    t = res.stats["per_task"][spec["task"]]
    return {"seconds": time.perf_counter() - t0, **counted, "kept": t["kept"], "kept_repaired": t["kept_repaired"],
            "repair_attempted": t.get("repair_attempted", 0), "sample_accuracy": t["sample_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/reasoning/cold_start/model")
    ap.add_argument("--task", default="gcd")
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--wait-quiet", type=float, default=120.0, help="seconds to wait for an idle CPU before each run")
    args = ap.parse_args()
    results = {}
    for name, stop in (("decoded to the end", False), ("stop at first false claim", True)):
        wait_quiet(args.wait_quiet)
        results[name] = run_in_subprocess(_run, {"model": args.model, "task": args.task, "questions": args.questions,
                                                 "rounds": args.rounds, "seed": args.seed, "stop": stop})
        print(f"{name:>26}: {results[name]}", flush=True)
    a, b = results["decoded to the end"], results["stop at first false claim"]
    print(f"repair with stop_when: {a['seconds'] / b['seconds']:.2f}x faster overall, repair tokens "
          f"{a['repair_tokens']:,} -> {b['repair_tokens']:,}; kept {a['kept']} -> {b['kept']}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "repair_speed.json"
    out.write_text(json.dumps({"args": vars(args), "machine": machine(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
