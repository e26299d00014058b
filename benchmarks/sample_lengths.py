"""Not speed: do posttrain's rollout sampler and HF ``generate`` draw completions of the same
length from the same model and prompts? (GRPO benchmarks compare seconds per step, and a
sampler that ran long would be charged for more work.)

The embedded model (loaded for inference, as rollouts and evals load it) samples ``--group``
completions for each of the first ``--prompts`` two-digit addition prompts of
``examples/data/add2_train.jsonl`` at temperature 0.7, top-p 1, no top-k, at most 64 new
tokens, once with posttrain's sampler (``posttrain.rollout.sample``, ``sampling.dtype`` auto
and float32) and once with HF ``generate``. Printed: mean and spread of the completion
lengths (EOS counted, as both trainers count it), how many hit the limit, and the standard
error of each mean.

    python benchmarks/sample_lengths.py                  # 16 prompts x 16 completions each way
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "add2_train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=16, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    from posttrain.models import load_model
    from posttrain.rollout import SamplingConfig, sample

    model, tok = load_model("smollm2-135m-instruct", with_tokenizer=True, inference=True)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][: args.prompts]
    ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"] for r in rows]
    prompts = [list(p) for p in ids for _ in range(args.group)]
    eos, limit = tok.eos_token_id, args.max_new_tokens

    def posttrain_lengths(dtype: str) -> list[int]:
        cfg = SamplingConfig(max_new_tokens=limit, temperature=0.7, top_p=1.0, top_k=0, batch_size=64, dtype=dtype)
        return [len(c) for c in sample(model, tok, prompts, cfg, seed=0).completion_ids]

    def hf_lengths() -> list[int]:
        torch.manual_seed(0)
        tok.padding_side, out = "left", []
        for s in range(0, len(prompts), 64):
            enc = tok.pad({"input_ids": prompts[s : s + 64]}, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**enc, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=limit,
                                     pad_token_id=tok.pad_token_id, eos_token_id=eos)
            out += [row.index(eos) + 1 if eos in row else len(row) for row in gen[:, enc["input_ids"].shape[1]:].tolist()]
        return out

    print(f"{len(prompts)} completions each ({args.prompts} prompts x {args.group}), weights {model.dtype}")
    for name, fn in [("posttrain (sampling.dtype auto)", lambda: posttrain_lengths("auto")),
                     ("posttrain (sampling.dtype float32)", lambda: posttrain_lengths("float32")),
                     ("HF generate", hf_lengths)]:
        t = time.perf_counter()
        lens = fn()
        mean, sd = statistics.mean(lens), statistics.pstdev(lens)
        print(f"{name:36s} mean {mean:5.1f}  sd {sd:4.1f}  standard error {sd / len(lens) ** 0.5:4.1f}  "
              f"hit {limit}: {sum(n >= limit for n in lens):3d}  ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
