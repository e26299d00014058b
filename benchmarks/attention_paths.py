"""Whole-sequence attention on CPU: posttrain's float32 matmul path against torch's SDPA, one layer.

Forward + backward of one attention layer with SmolLM2-135M's heads (9 query, 3 key/value, 64
wide), a causal mask given as a boolean tensor (as HF passes it), queries and keys in float32
and values in bf16 (what the rotary embedding and the value projection hand attention under
bf16 autocast), in the precision each way computes under bf16 autocast: posttrain's path
(``posttrain.attention.attention``: float32 scores and softmax, autocast off inside), SDPA
under autocast (bf16 inputs, what HF's ``sdpa`` runs in mixed precision), and with
``--pure-float32`` both without autocast (float32 training, where ``FLOAT32_MAX_KEYS``
decides). Best of ``--rounds`` rounds of ``--repeat`` calls each, in ms per call.

    python benchmarks/attention_paths.py
    python benchmarks/attention_paths.py --shapes 8x134,8x182,1x400 --pure-float32
"""

from __future__ import annotations

import argparse
import contextlib
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x134,8x182,2x240,2x384,1x400,1x600", help="comma-separated BxL")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pure-float32", action="store_true", help="no autocast: float32 values, no bf16 anywhere")
    args = ap.parse_args()

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from posttrain import allocator, attention

    allocator.keep_freed_memory()  # as every stage does
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3
    hq, hk, d = 9, 3, 64

    def autocast():
        if args.pure_float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def layer(fn, q, k, v, mask):
        with autocast():
            out, _ = fn(module, q, k, v, mask, scaling=d**-0.5)
        out.float().sum().backward()

    budget = attention.SCORES_BUDGET_BYTES
    attention.SCORES_BUDGET_BYTES = 2**40  # every shape on the matmul path (the budget is a memory rule)
    limit = attention.FLOAT32_MAX_KEYS
    attention.FLOAT32_MAX_KEYS = 2**20
    print(f"{torch.get_num_threads()} threads; {'pure float32' if args.pure_float32 else 'under bf16 autocast'}; "
          f"ms per forward + backward of one layer (9/3 heads x 64)")
    print(f"{'B x L':>9} {'posttrain':>10} {'SDPA':>8}   posttrain/SDPA   (scores budget {budget >> 20} MiB"
          f"{f', float32 key limit {limit}' if args.pure_float32 else ''})")
    try:
        for shape in args.shapes.split(","):
            B, L = (int(x) for x in shape.split("x"))
            torch.manual_seed(0)
            q = torch.randn(B, hq, L, d, requires_grad=True)
            k = torch.randn(B, hk, L, d, requires_grad=True)
            v = torch.randn(B, hk, L, d, dtype=torch.float32 if args.pure_float32 else torch.bfloat16,
                            requires_grad=True)
            mask = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, 1, L, L)

            best = {}
            for _ in range(args.rounds):
                for name, fn in (("posttrain", attention.attention), ("SDPA", sdpa_attention_forward)):
                    layer(fn, q, k, v, mask)
                    t0 = time.perf_counter()
                    for _ in range(args.repeat):
                        layer(fn, q, k, v, mask)
                    best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / args.repeat * 1e3)
            fits = B * hq * L * L * 4 <= budget
            print(f"{shape:>9} {best['posttrain']:>10.2f} {best['SDPA']:>8.2f}   {best['posttrain'] / best['SDPA']:.2f}"
                  + ("" if fits else "   (over the scores budget: posttrain would call SDPA)"))
    finally:
        attention.SCORES_BUDGET_BYTES, attention.FLOAT32_MAX_KEYS = budget, limit


if __name__ == "__main__":
    main()
