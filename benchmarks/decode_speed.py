"""Decoding speed of the rollout loop: the fused one-token step against HF's forward, one run.

The embedded model is loaded for inference (bf16 weights where ``dtype: auto`` picks mixed
precision) and decodes the same left-padded batch of reasoning-task prompts each way, in
alternating rounds (the best round of each counts, so a busy moment hits all alike); greedy
tokens are compared with HF's. Ways: HF's forward, our fused step on the model's weights,
and, for float32 weights on a CPU with fbgemm, the fused step on float16 weights packed for
fbgemm (``posttrain.decode_step.pack_fp16``: what ``sampling.dtype: auto`` decodes with
there; the time to pack is printed beside it), and for bf16 weights on a CPU with native bf16
the fused step on weights packed for oneDNN (``posttrain.decode_step.pack_onednn``, what the
rollout uses there; "fused" is then the same step on plain ``F.linear``; the packing is done
again in each timed round, so its time is counted).

    python benchmarks/decode_speed.py                     # batches of 48, 64 new tokens
    python benchmarks/decode_speed.py --batch 8,48,96 --tokens 96
    python benchmarks/decode_speed.py --rollout-lora 16   # the rollout path of a LoRA run

``--rollout-lora R`` times what an online-RL run's rollouts run instead: ``posttrain.rollout.sample``
(greedy, the stage's own loop) on the model as a training stage prepares it (float32 weights,
LoRA r=R on the default targets, the adapters' B set to small random values so they are not
zero), decoded as ``sampling.dtype`` float32 (adapters merged in place, fused step) and float16
(the base packed for fbgemm, adapters unmerged beside it: ``auto`` on an x86 CPU), and the
same without LoRA; tokens/s over the tokens each way generated (rows stop at EOS).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="48", help="comma-separated batch sizes")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per row (no EOS stop)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rollout-lora", type=int, default=0, metavar="R",
                    help="time the rollout path (sample) with and without LoRA rank R instead")
    args = ap.parse_args()
    if args.rollout_lora:
        return rollout_lora(args)

    from posttrain import decode_step
    from posttrain.models import load_model
    from posttrain.rollout import decode, left_pad
    from posttrain.synth.tasks import problems

    model, tok = load_model("smollm2-135m-instruct", with_tokenizer=True, inference=True)
    fused = getattr(model, decode_step.ATTR, None)
    if fused is None:
        raise SystemExit("the model was not fused (architecture not supported)")
    tasks = ("addition", "subtraction", "linear", "gcd")
    t0 = time.perf_counter()
    can_pack = decode_step.pack_fp16(model)
    pack_s = time.perf_counter() - t0
    decode_step.unpack_fp16(model)
    onednn = decode_step.onednn_packing_available(next(model.parameters()).dtype)
    ways = ["hf", "fused"] + (["fp16 packed"] if can_pack else []) + (["oneDNN packed"] if onednn else [])
    print(f"weights {next(model.parameters()).dtype}, {torch.get_num_threads()} threads, {args.tokens} new tokens"
          + (f", packing float16 weights takes {pack_s:.2f} s" if can_pack else ""))
    print(f"{'batch':>6} " + " ".join(f"{w:>15}" for w in ways) + "   speed-up vs HF   same greedy tokens as HF")
    for batch in [int(b) for b in args.batch.split(",")]:
        per_task = {t: problems(t, -(-batch // len(tasks)), "test") for t in tasks}
        qs = [per_task[tasks[i % len(tasks)]][i // len(tasks)].question for i in range(batch)]
        ids, mask = left_pad([tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True)["input_ids"] for q in qs],
                             tok.pad_token_id)
        best = dict.fromkeys(ways, float("inf"))
        out = {}
        for _ in range(args.rounds):
            for name in ways:
                setattr(model, decode_step.ATTR, None if name == "hf" else fused)
                if name == "fp16 packed":
                    decode_step.pack_fp16(model)
                os.environ["POSTTRAIN_ONEDNN_PACK"] = "1" if name == "oneDNN packed" else "0"
                decode_step.unpack_onednn(model)  # each round packs again (its time counted)
                t0 = time.perf_counter()
                out[name] = decode(model, ids, mask, args.tokens, -1, tok.pad_token_id)
                best[name] = min(best[name], time.perf_counter() - t0)
                decode_step.unpack_fp16(model)
        os.environ.pop("POSTTRAIN_ONEDNN_PACK", None)
        setattr(model, decode_step.ATTR, fused)
        rate = {k: batch * args.tokens / v for k, v in best.items()}
        same = [f"{(out[w] == out['hf']).float().mean().item():.1%}" for w in ways[1:]]
        print(f"{batch:>6} " + " ".join(f"{rate[w]:>9.0f} tok/s" for w in ways) + "   "
              + " ".join(f"{rate[w] / rate['hf']:.2f}x" for w in ways[1:]) + "   " + " ".join(same))

def rollout_lora(args) -> None:
    from posttrain.models import ModelConfig, lora_layers, prepare_model, unwrap_peft
    from posttrain.rollout import SamplingConfig, sample
    from posttrain.synth.tasks import problems

    tasks = ("addition", "subtraction", "linear", "gcd")
    models = {}
    for name, lora in (("no LoRA", False), (f"LoRA r{args.rollout_lora}", True)):
        model, tok, _ = prepare_model(ModelConfig(lora=lora, lora_r=args.rollout_lora, lora_alpha=2 * args.rollout_lora,
                                                  lora_dropout=0.0))
        gen = torch.Generator().manual_seed(0)
        for layer in lora_layers(unwrap_peft(model)):
            for b in layer.lora_B.values():
                b.weight.data.normal_(0.0, 1e-3, generator=gen)
        models[name] = model
    print(f"rollout path (posttrain.rollout.sample, greedy), {torch.get_num_threads()} threads, up to {args.tokens} "
          f"new tokens; tokens/s, best of {args.rounds} alternating rounds")
    ways = [(m, d) for m in models for d in ("float32", "float16")]
    print(f"{'batch':>6} " + " ".join(f"{m + ' ' + d:>22}" for m, d in ways))
    for batch in [int(b) for b in args.batch.split(",")]:
        per_task = {t: problems(t, -(-batch // len(tasks)), "test") for t in tasks}
        qs = [per_task[tasks[i % len(tasks)]][i // len(tasks)].question for i in range(batch)]
        ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for q in qs]
        best = dict.fromkeys(ways, 0.0)
        for _ in range(args.rounds):
            for m, d in ways:
                cfg = SamplingConfig(max_new_tokens=args.tokens, temperature=0.0, batch_size=batch, dtype=d)
                t0 = time.perf_counter()
                roll = sample(models[m], tok, ids, cfg, seed=0)
                best[(m, d)] = max(best[(m, d)], roll.num_tokens / (time.perf_counter() - t0))
        print(f"{batch:>6} " + " ".join(f"{best[w]:>16.0f} tok/s" for w in ways))
        for m in models:
            print(f"       {m}: float16 packed / float32 {best[(m, 'float16')] / best[(m, 'float32')]:.2f}x")


if __name__ == "__main__":
    main()
