"""Decoding speed of the rollout loop: the fused one-token step against HF's forward, one run.

The embedded model is loaded for inference (bf16 weights where ``dtype: auto`` picks mixed
precision) and decodes the same left-padded batch of reasoning-task prompts both ways, in
alternating rounds (the best round of each counts, so a busy moment hits both alike); greedy
tokens of the two are compared too.

    python benchmarks/decode_speed.py                     # batches of 48, 64 new tokens
    python benchmarks/decode_speed.py --batch 8,48,96 --tokens 96
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="48", help="comma-separated batch sizes")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per row (no EOS stop)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from posttrain import decode_step
    from posttrain.models import load_model
    from posttrain.rollout import decode, left_pad
    from posttrain.synth.tasks import problems

    model, tok = load_model("smollm2-135m-instruct", with_tokenizer=True, inference=True)
    fused = getattr(model, decode_step.ATTR, None)
    if fused is None:
        raise SystemExit("the model was not fused (architecture not supported)")
    tasks = ("addition", "subtraction", "linear", "gcd")
    print(f"weights {next(model.parameters()).dtype}, {torch.get_num_threads()} threads, {args.tokens} new tokens")
    print(f"{'batch':>6} {'HF forward':>14} {'fused step':>14} {'speed-up':>9}  same greedy tokens")
    for batch in [int(b) for b in args.batch.split(",")]:
        per_task = {t: problems(t, -(-batch // len(tasks)), "test") for t in tasks}
        qs = [per_task[tasks[i % len(tasks)]][i // len(tasks)].question for i in range(batch)]
        ids, mask = left_pad([tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"] for q in qs],
                             tok.pad_token_id)
        best = {"hf": float("inf"), "fused": float("inf")}
        out = {}
        for _ in range(args.rounds):
            for name in ("hf", "fused"):
                setattr(model, decode_step.ATTR, fused if name == "fused" else None)
                t0 = time.perf_counter()
                out[name] = decode(model, ids, mask, args.tokens, -1, tok.pad_token_id)
                best[name] = min(best[name], time.perf_counter() - t0)
        setattr(model, decode_step.ATTR, fused)
        rate = {k: batch * args.tokens / v for k, v in best.items()}
        print(f"{batch:>6} {rate['hf']:>9.0f} tok/s {rate['fused']:>9.0f} tok/s {rate['fused'] / rate['hf']:>8.2f}x  "
              f"{'yes' if torch.equal(out['hf'], out['fused']) else 'no (bf16 rounding of fused matmuls)'}")


if __name__ == "__main__":
    main()
