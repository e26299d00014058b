"""Where one posttrain SFT step spends its time on CPU (torch.profiler, by category).

Usage::

    .venv/bin/python benchmarks/profile_step.py              # batch 10 of the benchmark's order
    .venv/bin/python benchmarks/profile_step.py --batch 3 --batching flatten

Same model, data and batches as benchmarks/sft_vs_trl.py; the step is posttrain's own
(``collate`` -> ``batch_logprobs`` -> ``sft_loss`` -> ``Trainable.backward`` ->
``Trainable.step``). Warm-up steps until one page-faults under 1,000 pages in (at most 8),
then, once the CPU is idle, one step timed by phase (no profiler) and one profiled. Operators are grouped into: decoder GEMMs, LM-head
GEMMs (an operand with the vocabulary dimension), LM-head softmax/cross-entropy,
attention, optimizer + clipping, and everything else (element-wise: RMSNorm, RoPE, SiLU,
residual adds, copies). GEMM FLOPs come from the recorded shapes, so each GEMM group's
achieved GFLOP/s can be compared with the 2048x2048 matmul rate in the step's compute dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def category(name: str, shapes: list, vocab: int) -> str:
    has_vocab = any(vocab in s for s in shapes if isinstance(s, (list, tuple)))
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
        return "LM head GEMMs" if has_vocab else "decoder GEMMs"
    if re.search(r"softmax|nll_loss|cross_entropy|log_softmax", name) or (has_vocab and name in (
            "aten::fill_", "aten::zero_", "aten::scatter", "aten::gather", "aten::sub", "aten::exp")):
        return "LM head softmax / CE"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (sdpa)"
    if re.search(r"_foreach|lerp|addcdiv|addcmul|adamw|linalg_vector_norm|clip", name):
        return "optimizer + clipping"
    if has_vocab:
        return "embedding / tied-weight grads"
    return "element-wise and other"


def gemm_flops(name: str, shapes: list) -> float:
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * k * n
    except (ValueError, TypeError, IndexError):
        pass
    return 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=10, help="which batch of the benchmark's 12-step order (0-based)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batching", default="pad", choices=["pad", "flatten"])
    p.add_argument("--wait-quiet", type=float, default=300)
    p.add_argument("--json", default=str(C.RESULTS / "profile_step.json"))
    a = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from posttrain import allocator, engine
    from posttrain.data.tokenize import collate, tokenize_conversation
    from posttrain.logprobs import batch_logprobs, num_targets
    from posttrain.losses import sft_loss
    from posttrain.models import ModelConfig, embedded_model_dir, prepare_model

    allocator.keep_freed_memory()  # as every stage does (engine.setup_run)
    model_dir = str(embedded_model_dir())
    work = Path(tempfile.mkdtemp(prefix="posttrain-profile-"))
    rows = C.sft_rows(a.steps * a.batch_size)
    train_file = C.write_jsonl(rows, work / "train.jsonl")
    batches, _, _ = C.posttrain_batches(model_dir, str(train_file), a.steps, a.batch_size, a.max_length, 1e-4)
    model, tok, dtype = prepare_model(ModelConfig(name_or_path=model_dir))
    examples = [tokenize_conversation(tok, rows[i]["messages"]) for i in batches[a.batch]]
    batch = collate(examples, a.batching, tok.pad_token_id)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    vocab = model.config.vocab_size
    t = engine.Trainable(model, 1e-5, 0.0, (0.9, 0.999), warmup_steps=0, total_steps=100, schedule="constant")
    t.model.train()

    phases: dict[str, float] = {}

    def step(timed: bool = False):
        t0 = time.perf_counter()
        b = {k: v.to(t.device) for k, v in collate(examples, a.batching, tok.pad_token_id).items()}
        lp = batch_logprobs(t.model, b)
        loss = sft_loss(lp, num_targets(b["labels"]))
        t1 = time.perf_counter()
        t.backward(loss)
        t2 = time.perf_counter()
        t.step(1.0)
        t3 = time.perf_counter()
        if timed:
            phases.update({"forward (collate + log-probs + loss)": t1 - t0, "backward": t2 - t1,
                           "clip + AdamW + schedule": t3 - t2})

    # warm-up: until the heap stops growing (a step that page-faults fresh memory in is slower)
    for _ in range(8):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        if resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0 < 1000:
            break
    quiet = C.wait_quiet(a.wait_quiet)
    c0, os0 = C.cpu_times(), os.times()
    t0 = time.perf_counter()
    step(timed=True)
    wall = time.perf_counter() - t0
    os1 = os.times()
    load = C.window_load(c0, C.cpu_times())
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()

    cats: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    ops: dict[tuple, float] = defaultdict(float)
    calls: dict[tuple, int] = defaultdict(int)
    for ev in prof.key_averages(group_by_input_shape=True):
        shapes = ev.input_shapes or []
        c = category(ev.key, shapes, vocab)
        cats[c] += ev.self_cpu_time_total / 1e6
        flops[c] += gemm_flops(ev.key, shapes) * ev.count
        ops[(ev.key, str(shapes)[:70])] += ev.self_cpu_time_total / 1e6
        calls[(ev.key, str(shapes)[:70])] += ev.count
    total = sum(cats.values())
    from posttrain.models import pick_precision

    mm_dtype = pick_precision("auto", "cpu").compute  # the matmuls of a step run in it (bf16 under autocast)
    mm = C.matmul_gflops(reps=8, quiet_trials=3, max_s=60, dtype=mm_dtype)

    print(f"batch {a.batch}: {tuple(batch['input_ids'].shape)} ({a.batching}), {tokens} non-padding tokens, "
          f"{num_targets(batch['labels'])} trained; {dtype}, {torch.get_num_threads()} threads")
    print(f"step wall {wall:.2f} s without profiler ({tokens / wall:.1f} tok/s, "
          f"{6 * sum(p.numel() for p in model.parameters()) * tokens / wall / 1e9:.1f} GFLOP/s by 6N); "
          f"CPU user {os1.user - os0.user:.1f} s, sys {os1.system - os0.system:.1f} s; load {load}; "
          f"quiet start: {quiet['quiet']}")
    for k, v in phases.items():
        print(f"  {k:<40} {v:6.2f} s")
    print(f"profiled step: {total:.2f} s of operator self time (wall share approximated by share of that total); "
          f"{str(mm_dtype).removeprefix('torch.')} 2048x2048 matmul {mm['gflops']:.1f} GFLOP/s")
    rows_out = []
    for c, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        rate = flops[c] / v / 1e9 if flops[c] else None
        rows_out.append({"category": c, "s": round(v, 3), "share": round(v / total, 3),
                         "gflops": round(rate, 1) if rate else None,
                         "of_matmul": round(rate / mm["gflops"], 2) if rate else None})
        extra = f"  {rate:6.1f} GFLOP/s = {rate / mm['gflops']:.0%} of matmul" if rate else ""
        print(f"  {c:<32} {v:6.2f} s  {v / total:6.1%}{extra}")
    print("top operators (self time):")
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:25]
    for (name, shp), v in top:
        print(f"  {v:6.3f} s  {calls[name, shp]:4d}x  {name:<32} {shp}")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "batch": a.batch, "shape": list(batch["input_ids"].shape), "batching": a.batching, "tokens": tokens,
        "wall_s": round(wall, 3), "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "cpu_user_s": round(os1.user - os0.user, 2), "cpu_sys_s": round(os1.system - os0.system, 2),
        "load": load, "matmul_gflops": mm, "categories": rows_out,
        "top_ops": [{"op": n, "shapes": s, "calls": calls[n, s], "s": round(v, 3)} for (n, s), v in top],
    }, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
