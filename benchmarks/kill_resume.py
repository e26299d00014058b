"""Crash-safety measurement: kill stages with SIGKILL at random points, resume, compare.

For each stage (SFT, DPO, GRPO on a tiny 2-layer Llama with the SmolLM2 tokenizer, and
critique-and-revision synthesis), ``--trials`` runs are each killed one to three times at
points drawn at random from: inside optimizer step k, inside checkpoint write k, inside
synthesis chunk k (synthesis only), or from outside after a random number of seconds; each
run is then resumed to the end. A trial passes when the final weights are bit-identical to
an uninterrupted run with the same seed (synthesis: the output files are identical, no
duplicated or missing row). Prints a table and writes ``results/kill_resume.json``.

    python benchmarks/kill_resume.py            # 6 trials per stage (~15 min on 2 CPU cores)
    python benchmarks/kill_resume.py --trials 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, write_jsonl

STEPS = {"sft": 8, "dpo": 6, "grpo": 5}


def tiny_model(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama

    from posttrain.models import embedded_model_dir, load_tokenizer

    return make_tiny_llama(load_tokenizer(embedded_model_dir()), out)


def stage_args(stage: str, model: Path, work: Path) -> list[str]:
    if stage == "sft":
        data = write_jsonl([{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}
                            for i in range(40)], work / "sft.jsonl")
        extra = ["batch_size=4", "lr=1e-3"]
    elif stage == "dpo":
        data = write_jsonl([{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": f"{2 * i + 1}?"}
                            for i in range(30)], work / "dpo.jsonl")
        extra = ["batch_size=4", "lr=1e-3", "model.lora=true", "model.lora_r=4", "model.lora_dropout=0.1"]
    else:
        data = write_jsonl([{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)],
                           work / "grpo.jsonl")
        extra = ["batch_size=2", "group_size=3", "lr=3e-3", "beta=0.1", "sampling.max_new_tokens=8",
                 "sampling.top_k=20"]
    return [stage, f"model.name_or_path={model}", f"data.train={data}", "save_every=1", "keep_last=2",
            "tensorboard=false", "seed=5", f"max_steps={STEPS[stage]}", *extra]


def synth_args(model: Path, work: Path) -> list[str]:
    prompts = write_jsonl([{"prompt": f"Tell me about topic {i}."} for i in range(40)], work / "prompts.jsonl")
    return ["cai", "generate", str(model), "--prompts", str(prompts), "--max-new-tokens", "6"]


def draw_kills(rng: random.Random, stage: str) -> list:
    n = rng.randint(1, 3)
    if stage == "synth":
        return [f"synth:{rng.randint(1, 2)}" if rng.random() < 0.7 else round(rng.uniform(9, 14), 2) for _ in range(n)]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            out.append(f"step:{rng.randint(1, STEPS[stage] - 1)}")
        elif r < 0.7:
            out.append(f"checkpoint:{rng.randint(1, STEPS[stage] - 1)}")
        else:
            out.append(round(rng.uniform(9, 16), 2))  # from outside: ~10 s of it is start-up
    return out


def same_outputs(stage: str, ref: Path, cut: Path) -> bool:
    if stage == "synth":
        return all((ref / f).read_bytes() == (cut / f).read_bytes() for f in ("sft.jsonl", "pairs.jsonl"))
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if stage == "dpo" else "model.safetensors"
    a, b = load_file(str(ref / "model" / name)), load_file(str(cut / "model" / name))
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--stages", default="sft,dpo,grpo,synth")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from posttrain.faults import run_with_kills

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    env = {"POSTTRAIN_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    model = tiny_model(work / "tiny")
    py = [sys.executable, "-m", "posttrain"]
    results = {}
    for stage in args.stages.split(","):
        base = synth_args(model, work) if stage == "synth" else stage_args(stage, model, work)

        def cmd(out: Path, base=base, stage=stage) -> list[str]:
            return py + base + (["--out-dir", str(out)] if stage == "synth" else [f"output_dir={out}", "resume=true"])

        run_with_kills(cmd(work / f"{stage}-ref"), [], env)
        trials = []
        for t in range(args.trials):
            kills = draw_kills(rng, stage)
            out = work / f"{stage}-trial{t}"
            outcomes = run_with_kills(cmd(out), kills, env)
            ok = same_outputs(stage, work / f"{stage}-ref", out)
            trials.append({"kills": kills, "outcomes": outcomes, "identical": ok})
            print(f"{stage} trial {t}: {outcomes} -> {'identical' if ok else 'DIFFERENT'}", flush=True)
        killed = sum(o.startswith("killed") for tr in trials for o in tr["outcomes"])
        results[stage] = {"trials": len(trials), "kills": killed, "identical": sum(tr["identical"] for tr in trials),
                          "detail": trials}
    print(f"\n{'stage':8} {'trials':>6} {'kills':>6} {'identical':>9}")
    for stage, r in results.items():
        print(f"{stage:8} {r['trials']:6d} {r['kills']:6d} {r['identical']:9d}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kill_resume.json").write_text(json.dumps({"seed": args.seed, "stages": results}, indent=2))
    os.system(f"rm -rf {work}")


if __name__ == "__main__":
    main()
