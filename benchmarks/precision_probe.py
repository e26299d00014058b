"""Where mixed precision pays on this CPU: a training step, a decoding step, and AdamW.

Usage::

    .venv/bin/python benchmarks/precision_probe.py          # ~3 min on an idle 2-core CPU

On the embedded SmolLM2-135M-Instruct, in this one process:

* a full fine-tuning step (decoder + LM head logits + cross-entropy, backward, AdamW) on
  8 x 200 random tokens, with fp32 weights, pure bf16 weights, and fp32 weights under bf16
  autocast (what ``dtype: auto`` picks where bf16 is fast);
* a greedy decoding step at batch 8 (posttrain's KV-cache loop, 64 new tokens) with fp32
  weights and with a bf16 copy;
* one AdamW step over all 134.5M parameters, per-tensor (torch's CPU default) and fused.

Each figure is the mean of a few repetitions after a warm-up; the machine's speed drifts
between invocations, so compare within one run. The summary goes to
``results/precision_probe.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def timed(reps: int, fn, *args) -> float:
    """Mean seconds of ``fn(*args)`` over ``reps`` calls after one warm-up call."""
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps


def train_step(model, opt, ids, mixed: bool) -> None:
    """Forward (logits of every position), cross-entropy in fp32, backward, AdamW."""
    import torch

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> int:
    import torch

    from posttrain.allocator import keep_freed_memory
    from posttrain.models import load_model
    from posttrain.rollout import decode

    keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49000, (8, 200), generator=g)
    out: dict[str, dict[str, float]] = {"train_step_s": {}, "decode_ms_per_token": {}, "adamw_step_s": {}}

    for name, dtype, mixed in (("float32", torch.float32, False), ("bfloat16 weights", torch.bfloat16, False),
                               ("float32 weights + bf16 autocast", torch.float32, True)):
        model = load_model("smollm2-135m-instruct", dtype).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        out["train_step_s"][name] = round(timed(3, train_step, model, opt, ids, mixed), 3)
        print(f"train step, {name}: {out['train_step_s'][name]:.2f} s", flush=True)
        del model, opt

    model = load_model("smollm2-135m-instruct", "float32").eval()
    prompts = torch.randint(0, 49000, (8, 40), generator=g)
    mask = torch.ones_like(prompts)
    for name, m in (("float32", model), ("bfloat16 copy", copy.deepcopy(model).to(torch.bfloat16))):
        s = timed(2, decode, m, prompts, mask, 64, -1, 0)
        out["decode_ms_per_token"][name] = round(s / 64 * 1000, 1)
        print(f"decode at batch 8, {name}: {out['decode_ms_per_token'][name]:.1f} ms a token", flush=True)

    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    for name, kw in (("per-tensor (default)", {}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-5, **kw)
        out["adamw_step_s"][name] = round(timed(3, opt.step), 3)
        print(f"AdamW step over {sum(p.numel() for p in params):,} params, {name}: "
              f"{out['adamw_step_s'][name]:.3f} s", flush=True)

    summary = {"benchmark": "precision probe", "machine": C.machine(), **out}
    path = Path(__file__).resolve().parent / "results" / "precision_probe.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
