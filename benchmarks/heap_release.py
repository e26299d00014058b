"""Peak RSS and time of checkpointed training passes with and without the per-layer heap release.

    .venv/bin/python benchmarks/heap_release.py                  # 8 x 672 tokens, 3 passes a mode (~7 min)
    .venv/bin/python benchmarks/heap_release.py --batch 4 --tokens 256 --passes 2

What it runs: the embedded SmolLM2-135M-Instruct with LoRA (r 16, alpha 32, dropout 0) and
activation checkpointing, as online RL trains it; a fixed random batch (seed 0) of ``--batch``
rows of ``--tokens`` tokens, the first 60 of each masked as a prompt; ``--passes`` forward +
backward passes through :func:`posttrain.logprobs.token_logprobs` (the chunked LM head) with
posttrain's malloc settings (:func:`posttrain.allocator.keep_freed_memory`). Each mode runs in
its own process (so the peak is that mode's own): ``off`` with ``POSTTRAIN_RELEASE_PER_LAYER=0``,
``on`` with the release :func:`posttrain.models.prepare_model` installs
(:func:`posttrain.allocator.release_between_layers`). Per pass: forward and backward seconds,
RSS and peak RSS (``/proc/self/status``), glibc's main heap in use and free (``mallinfo2``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import _common as C


def child(spec: dict) -> dict:
    """One mode's passes (in a fresh spawn process: the peak RSS is its own)."""
    os.environ["POSTTRAIN_RELEASE_PER_LAYER"] = "1" if spec["release"] else "0"  # read by prepare_model
    import torch

    from posttrain import allocator
    from posttrain.logprobs import token_logprobs
    from posttrain.models import ModelConfig, embedded_model_dir, prepare_model

    batch, tokens, passes = spec["batch"], spec["tokens"], spec["passes"]
    cfg = ModelConfig(name_or_path=str(embedded_model_dir()), lora=True, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                      gradient_checkpointing=True, dtype="float32")
    model, _, _ = prepare_model(cfg)
    model.train()
    ids = torch.randint(1000, 20000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :60] = -100
    mask = torch.ones_like(ids)
    out = {"loaded_rss_mb": C.status_rss_mb()[0], "passes": []}
    for _ in range(passes):
        t0 = time.perf_counter()
        lp = token_logprobs(model, ids, labels, mask)
        t1 = time.perf_counter()
        heap_fwd = allocator.heap_info()
        lp.mean().backward()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        rss, peak = C.status_rss_mb()
        heap = allocator.heap_info()
        mb = 2**20
        out["passes"].append({
            "forward_s": t1 - t0, "backward_s": t2 - t1, "rss_mb": rss, "peak_rss_mb": peak,
            "heap_in_use_after_forward_mb": heap_fwd.uordblks / mb if heap_fwd else None,
            "heap_free_mb": heap.fordblks / mb if heap else None,
        })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=672)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--json", default=str(C.RESULTS / "heap_release.json"))
    a = p.parse_args()
    print(f"machine: {C.machine()}; {C.loadavg()} load average", flush=True)
    results = {}
    for mode in ("off", "on"):
        spec = {"release": mode == "on", "batch": a.batch, "tokens": a.tokens, "passes": a.passes,
                "keep_freed_memory": True}
        results[mode] = r = C.run_in_subprocess(child, spec)
        if "error" in r:
            sys.exit(f"{mode} run failed: {r['error']}\n{r.get('traceback', '')}")
        for i, ps in enumerate(r["passes"], 1):
            print(f"{mode:>3} pass {i}: forward {ps['forward_s']:5.1f} s  backward {ps['backward_s']:5.1f} s  "
                  f"RSS {ps['rss_mb']:6.0f} MB  peak {ps['peak_rss_mb']:6.0f} MB  heap free {ps['heap_free_mb'] or 0:6.0f} MB",
                  flush=True)
    summary = {}
    for mode, r in results.items():
        later = r["passes"][1:] or r["passes"]  # the first pass also faults the heap in
        summary[mode] = {"peak_rss_mb": r["passes"][-1]["peak_rss_mb"],
                         "s_per_pass": sum(x["forward_s"] + x["backward_s"] for x in later) / len(later)}
    on, off = summary["on"], summary["off"]
    print(f"\n{a.batch} x {a.tokens} tokens, LoRA + checkpointing: peak RSS {off['peak_rss_mb']:,.0f} -> "
          f"{on['peak_rss_mb']:,.0f} MB ({on['peak_rss_mb'] / off['peak_rss_mb']:.2f}x), "
          f"{off['s_per_pass']:.1f} -> {on['s_per_pass']:.1f} s a pass ({on['s_per_pass'] / off['s_per_pass']:.2f}x; "
          f"passes after the first)")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": C.machine(), "git": C.git_state(), "args": vars(a), "summary": summary,
                               "runs": results}, indent=2) + "\n")
    print(f"summary written to {out}")


if __name__ == "__main__":
    main()
