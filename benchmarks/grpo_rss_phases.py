"""Resident memory at each phase of a GRPO run (the settings of ``grpo_vs_trl.py``), posttrain only.

    .venv/bin/python benchmarks/grpo_rss_phases.py [--steps 2]

Prints, before and after each rollout, decoding-copy refresh, prefill, decode, reference pass,
backward and optimizer step: the process's current and peak RSS (``/proc/self/status``) and
glibc's main-arena heap in use / free / mmapped (``mallinfo2``). Linux with glibc only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

from posttrain.allocator import heap_info


def memory() -> str:
    cur, peak = C.status_rss_mb()
    m = heap_info()
    mb = 2**20
    return (f"rss {cur:7.0f} MB  peak {peak:7.0f} MB  heap in use {m.uordblks / mb:6.0f}  free {m.fordblks / mb:6.0f}"
            f"  mmapped {m.hblkhd / mb:6.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    print("start  ", memory(), flush=True)
    import grpo_vs_trl as G

    from posttrain import engine, rollout
    from posttrain.config import load_config
    from posttrain.models import embedded_model_dir
    from posttrain.stages import online_rl

    print("imports", memory(), flush=True)

    def wrap(owner, name: str) -> None:
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            print(f"  before {name:18s}", memory(), flush=True)
            out = real(*args, **kwargs)
            print(f"  after  {name:18s}", memory(), flush=True)
            return out

        setattr(owner, name, timed)

    for owner, name in ((online_rl, "sample"), (online_rl, "prepare_model"), (rollout, "decode_copy"),
                        (rollout, "prefill"), (rollout, "decode"), (online_rl.Policy, "reference_logprobs"),
                        (engine.Trainable, "backward"), (engine.Trainable, "step")):
        wrap(owner, name)
    out = Path(tempfile.mkdtemp(prefix="grpo_rss_"))
    try:
        spec = {"model_dir": str(embedded_model_dir()), "train_file": str(G.DATA), "out_dir": str(out),
                "steps": a.steps, "micro_batch": 4}
        online_rl.train(load_config(online_rl.GRPOConfig, None, G.posttrain_overrides(spec)))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print("end    ", memory())


if __name__ == "__main__":
    main()
