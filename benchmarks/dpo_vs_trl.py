"""posttrain DPO vs TRL ``DPOTrainer``: same model, pairs, batches, LoRA and hyper-parameters.

Usage::

    .venv/bin/python benchmarks/dpo_vs_trl.py            # full run: 8 steps x 3 runs (~10 min on an idle 2-core CPU)
    .venv/bin/python benchmarks/dpo_vs_trl.py --quick    # smoke run: 3 steps
    .venv/bin/python benchmarks/dpo_vs_trl.py --skip-trl-live-ref   # leave out TRL's default (reference each step)

What is held equal
    Model: the embedded SmolLM2-135M-Instruct (``posttrain.models.embedded_model_dir()``,
    a plain HF directory), fp32 weights, with the LoRA of ``recipes/dpo.yaml``: r 16,
    alpha 32, dropout 0.05 (posttrain's default; TRL is given ``disable_dropout=False`` so
    that its LoRA dropout stays 0.05 too), on posttrain's default targets for llama models
    (``posttrain.models.LORA_TARGETS["llama"]``: q/k/v/o and gate/up/down projections),
    passed to TRL as the same ``peft.LoraConfig``. Data: the first ``steps x batch_size``
    pairs of ``examples/data/arithmetic_preference_train.jsonl`` (prompt/chosen/rejected
    strings). posttrain reads them as such (prompt = a user turn, chosen/rejected = the
    assistant reply); TRL gets the conversational form (``[{"role": "user", ...}]`` /
    ``[{"role": "assistant", ...}]``), so both apply SmolLM2's chat template. Batches: TRL
    is fed the batches posttrain trains on, in the same order (posttrain's length-grouped
    ``EpochBatches``; TRL gets the dataset in that order with
    ``train_sampling_strategy="sequential"``), 4 pairs = 8 right-padded rows per step
    ([chosen; rejected] in both). Loss: sigmoid DPO, beta 0.1, summed completion
    log-probs. Optimiser: AdamW (0.9, 0.999), no weight decay, grad-norm clip 1.0, lr 5e-5,
    linear schedule with ``round(0.1 * steps)`` warmup steps (posttrain's DPO default
    ``warmup_ratio`` 0.1), ``max_length`` 384 (no pair is near it), same number of steps.

Tokenisation check
    The TRL child compares TRL's prepared ``prompt_ids + chosen_ids`` (and rejected) with
    posttrain's tokenisation, pair by pair, and reports sequence and completion token
    counts of both. The sequences are identical token for token; the scored completion is
    not quite: TRL takes the completion to be everything after the rendered prompt, which
    with ChatML includes the ``\\n`` after ``<|im_end|>``, while posttrain scores the reply
    and its ``<|im_end|>`` only. So TRL sums one more (near-certain, ~0 log-prob) token per
    sequence; the compute is the same.

Reference log-probs
    posttrain computes the reference log-probs of all training pairs once, before the first
    step (LoRA: the same weights with adapters disabled; ``ref_cache=false`` so the
    on-disk cache is not used), ``ref_batch_size`` 16 sequences per forward pass.
    ``trl`` (the compared run) sets ``precompute_ref_log_probs=True`` with
    ``precompute_ref_batch_size=8`` pairs (16 sequences): the same up-front pass.
    ``trl_live_ref`` is TRL's default (``precompute_ref_log_probs=False``): an extra
    adapter-disabled forward pass inside every step. The up-front pass is timed
    separately (``ref_pass_s``, outside the step window) for posttrain and ``trl``.

Runs (each in a fresh ``spawn`` subprocess, one after the other)
    ``posttrain``: ``posttrain.stages.dpo.train`` (config from ``load_config(DPOConfig,
    None, overrides)``, ``model.dtype=auto`` (float32 weights, with bf16 autocast where bf16 is
    fast), no eval, no checkpoints, no merge).
    ``trl`` / ``trl_live_ref``: ``DPOTrainer`` with the CPU settings of
    ``sft_vs_trl.py``'s fast run: float32 weights, ``bf16`` autocast exactly where posttrain's
    ``auto`` picks it (``C.TRL_FAST``), ``use_cpu=True``,
    ``gradient_checkpointing=False``, ``dataloader_pin_memory=False``, no eval, no saving,
    ``report_to="none"``.

How s/step is measured
    Step ends are taken right after the optimizer step (a wrapper around
    ``posttrain.engine.Trainable.step``; a ``TrainerCallback.on_step_end`` for TRL).
    s/step = ``(t_end(N) - t_end(1)) / (N - 1)``: model loading, tokenisation, the
    reference pass, step 1 and the final save are outside the window. As in
    ``sft_vs_trl.py``, each step's CPU use by other processes is sampled from /proc/stat
    and the runs are compared over the steps that were quiet (< 0.1 core used by others)
    in both (the same step number is the same batch). Peak RSS: the run's own
    ``ru_maxrss`` at the end of the last step.

Targets printed pass/fail: posttrain >= 1.5x faster per step than ``trl``; posttrain
peak RSS <= ``trl``'s. The summary also goes to benchmarks/results/dpo_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

DATA = C.ROOT / "examples" / "data" / "arithmetic_preference_train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
WARMUP_RATIO = 0.1  # posttrain's DPOConfig default
REF_BATCH_SEQS = 16  # posttrain's DPOConfig.ref_batch_size default (sequences = 8 pairs)

# TRL's fast CPU settings (shared with sft_vs_trl.py; bf16 as posttrain's dtype=auto resolves here)
TRL_FAST = C.TRL_FAST


def lora_targets() -> list[str]:
    from posttrain.models import LORA_TARGETS

    return list(LORA_TARGETS["llama"])


def posttrain_overrides(spec: dict) -> list[str]:
    return [
        f"model.name_or_path={spec['model_dir']}", "model.dtype=auto", "model.lora=true",
        f"model.lora_r={LORA['r']}", f"model.lora_alpha={LORA['alpha']}", f"model.lora_dropout={LORA['dropout']}",
        f"data.train={spec['train_file']}", "data.eval_fraction=0", f"data.max_length={spec['max_length']}",
        f"output_dir={spec['out_dir']}", f"max_steps={spec['steps']}", f"batch_size={spec['batch_size']}",
        f"lr={spec['lr']}", f"beta={spec['beta']}", "loss_type=sigmoid", f"warmup_ratio={WARMUP_RATIO}",
        "schedule=linear", f"ref_batch_size={REF_BATCH_SEQS}", "ref_cache=false", "seed=0", "tensorboard=false",
        "eval_every=0", "save_every=0", "merge_lora=false", *spec.get("extra", []),
    ]


def _row_index(origin: str) -> int:
    """0-based row of a ``path:line`` origin."""
    return int(origin.rsplit(":", 1)[1]) - 1


def posttrain_pairs(spec: dict):
    """posttrain's tokenised pairs of the benchmark file and, for each, its row in the file."""
    from posttrain.config import load_config
    from posttrain.data.dataset import load_preference_data
    from posttrain.models import load_tokenizer
    from posttrain.stages.dpo import DPOConfig

    cfg = load_config(DPOConfig, None, posttrain_overrides({**spec, "out_dir": "/nonexistent"}))
    tok = load_tokenizer(spec["model_dir"])
    data = load_preference_data(tok, cfg.data, cfg.seed)
    return data.train, [_row_index(p.origin) for p in data.train]


def posttrain_batches(spec: dict) -> tuple[list[list[int]], list[dict]]:
    """(file rows of each of posttrain's ``steps`` batches, per-row token counts)."""
    from posttrain.engine import EpochBatches

    pairs, rows = posttrain_pairs(spec)
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]
    batches = EpochBatches(lengths, spec["batch_size"], 0)
    out = [[rows[i] for i in batches[m]] for m in range(spec["steps"])]
    info = [{"row": rows[i], "chosen": len(p.chosen.input_ids), "rejected": len(p.rejected.input_ids),
             "chosen_completion": sum(t != -100 for t in p.chosen.labels),
             "rejected_completion": sum(t != -100 for t in p.rejected.labels),
             "chosen_ids": p.chosen.input_ids, "rejected_ids": p.rejected.input_ids} for i, p in enumerate(pairs)]
    return out, info


def batch_tokens(batch_rows: list[int], seq_len: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(non-padding tokens, padded tokens) of one [chosen; rejected] batch."""
    lens = [seq_len[r][0] for r in batch_rows] + [seq_len[r][1] for r in batch_rows]
    return sum(lens), len(lens) * max(lens)


# --------------------------------------------------------------------------- posttrain run (child)


def run_posttrain(spec: dict) -> dict:
    from posttrain import engine
    from posttrain.config import load_config
    from posttrain.stages import dpo

    recs: list[dict] = []
    real_step = engine.Trainable.step

    def timed_step(self, max_grad_norm):
        t = time.perf_counter()
        out = real_step(self, max_grad_norm)
        t_end = time.perf_counter()
        recs.append({"t_end": t_end, "rss_mb": C.peak_rss_mb(), "cpu": C.cpu_times(), "optimizer": t_end - t,
                     **parts})
        parts.update(forward=0.0, backward=0.0)
        return out

    engine.Trainable.step = timed_step
    ref_times: list[float] = []
    ref_rss: list[float] = []
    real_ref = dpo.reference_logprobs

    def timed_ref(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_ref(*args, **kwargs)
        ref_times.append(time.perf_counter() - t0)
        ref_rss.append(C.peak_rss_mb())
        return out

    dpo.reference_logprobs = timed_ref
    parts = {"forward": 0.0, "backward": 0.0}
    real_loss, real_backward = dpo.batch_loss, engine.Trainable.backward

    def timed_loss(*args, **kwargs):
        t = time.perf_counter()
        out = real_loss(*args, **kwargs)
        parts["forward"] += time.perf_counter() - t
        return out

    def timed_backward(self, loss):
        t = time.perf_counter()
        real_backward(self, loss)
        parts["backward"] += time.perf_counter() - t

    dpo.batch_loss, engine.Trainable.backward = timed_loss, timed_backward
    cfg = load_config(dpo.DPOConfig, None, posttrain_overrides(spec))
    t0 = time.perf_counter()
    res = dpo.train(cfg)
    metrics = [m for m in engine.read_metrics(res.run_dir) if "loss/train" in m]
    out = {
        "name": spec["name"], "steps": len(recs), "losses": [m["loss/train"] for m in metrics],
        "step_tokens": [round(m["perf/tokens_per_s"] * m["perf/step_s"]) for m in metrics],
        "reward_accuracy": [m.get("reward/accuracy") for m in metrics],
        "step_ends": [r["t_end"] for r in recs], "own_step_s": [m["perf/step_s"] for m in metrics],
        "rss_train_mb": recs[-1]["rss_mb"], "rss_exit_mb": C.peak_rss_mb(),
        "ref_pass_s": ref_times[0] if ref_times else None, "first_step_end_s": recs[0]["t_end"] - t0,
        "rss_after_ref_mb": ref_rss[0] if ref_rss else None,
        "load": C.window_load(recs[0]["cpu"], recs[-1]["cpu"]) if len(recs) > 1 else {},
        "total_s": time.perf_counter() - t0,
        "split_s": {k: [round(r[k], 3) for r in recs] for k in ("forward", "backward", "optimizer")},
    }
    out.update(C.window_step_times(out["step_ends"], [r["cpu"] for r in recs]))
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    return out


# --------------------------------------------------------------------------- TRL run (child)


def run_trl(spec: dict) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    order = spec["order"]
    ds = datasets.Dataset.from_list([{
        "prompt": [{"role": "user", "content": rows[i]["prompt"]}],
        "chosen": [{"role": "assistant", "content": rows[i]["chosen"]}],
        "rejected": [{"role": "assistant", "content": rows[i]["rejected"]}],
    } for i in order])
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    steps = spec["steps"]
    args = DPOConfig(
        output_dir=spec["out_dir"], max_steps=steps, per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="linear",
        warmup_steps=round(WARMUP_RATIO * steps), weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9,
        adam_beta2=0.999, max_length=spec["max_length"], beta=spec["beta"], loss_type=["sigmoid"],
        precompute_ref_log_probs=spec["precompute"], precompute_ref_batch_size=REF_BATCH_SEQS // 2,
        disable_dropout=False, model_init_kwargs={"dtype": "float32"}, logging_steps=1, seed=0,
        report_to="none", save_strategy="no", eval_strategy="no", train_sampling_strategy="sequential",
        use_cpu=True, **C.resolve_trl_settings(spec["settings"]),
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=lora_targets(), task_type="CAUSAL_LM", bias="none")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.recs: list[dict] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.recs.append({"t_end": time.perf_counter(), "rss_mb": C.peak_rss_mb(), "cpu": C.cpu_times(), **parts})
            parts.update(forward=0.0)

    ref_times: list[float] = []
    ref_rss: list[float] = []
    real_pre = DPOTrainer._precompute_ref_logps

    def timed_pre(self, *a, **kw):
        t = time.perf_counter()
        out = real_pre(self, *a, **kw)
        ref_times.append(time.perf_counter() - t)
        ref_rss.append(C.peak_rss_mb())
        return out

    parts = {"forward": 0.0}
    real_loss = DPOTrainer.compute_loss

    def timed_loss(self, *a, **kw):  # policy forward + loss (+ the reference forward when not precomputed)
        t = time.perf_counter()
        out = real_loss(self, *a, **kw)
        parts["forward"] += time.perf_counter() - t
        return out

    DPOTrainer._precompute_ref_logps, DPOTrainer.compute_loss = timed_pre, timed_loss
    timer = StepTimer()
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=spec["model_dir"], args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config, callbacks=[timer])
    tokens = _compare_tokens(trainer.train_dataset, order, spec["pt_tokens"])
    trainer.train()
    recs = timer.recs
    hist = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    model = trainer.model
    out = {
        "name": spec["name"], "steps": len(recs), "losses": [h["loss"] for h in hist],
        "reward_accuracy": [h.get("rewards/accuracies") for h in hist],
        "step_ends": [r["t_end"] for r in recs], "rss_train_mb": recs[-1]["rss_mb"], "rss_exit_mb": C.peak_rss_mb(),
        "ref_pass_s": ref_times[0] if ref_times else None, "first_step_end_s": recs[0]["t_end"] - t0,
        "rss_after_ref_mb": ref_rss[0] if ref_rss else None,
        "load": C.window_load(recs[0]["cpu"], recs[-1]["cpu"]) if len(recs) > 1 else {},
        "total_s": time.perf_counter() - t0, "tokens": tokens,
        "split_s": {"forward": [round(r["forward"], 3) for r in recs]},
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "settings": {**C.resolve_trl_settings(spec["settings"]), "precompute_ref_log_probs": spec["precompute"]},
        "resolved": {k: str(getattr(args, k)) for k in ("bf16", "gradient_checkpointing", "optim", "disable_dropout",
                                                         "precompute_ref_log_probs", "lr_scheduler_type",
                                                         "warmup_steps", "dataloader_num_workers")},
    }
    out.update(C.window_step_times(out["step_ends"], [r["cpu"] for r in recs]))
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    return out


def _compare_tokens(prepared, order: list[int], pt_tokens: dict) -> dict:
    """TRL's prepared pairs vs posttrain's tokenisation: sequence and completion lengths, id agreement."""
    trl_seq, pt_seq, trl_comp, pt_comp, equal, prefix, diffs = 0, 0, 0, 0, 0, 0, set()
    for k, r in enumerate(order):
        ex = prepared[k]
        p, c, j = list(ex["prompt_ids"]), list(ex["chosen_ids"]), list(ex["rejected_ids"])
        pt = pt_tokens[str(r)]
        trl_seq += len(p) * 2 + len(c) + len(j)
        pt_seq += pt["chosen"] + pt["rejected"]
        trl_comp += len(c) + len(j)
        pt_comp += pt["chosen_completion"] + pt["rejected_completion"]
        for mine, theirs in ((pt["chosen_ids"], p + c), (pt["rejected_ids"], p + j)):
            equal += mine == theirs
            prefix += mine == theirs[: len(mine)]
        diffs.add((len(p) + len(c) - pt["chosen"], len(p) + len(j) - pt["rejected"]))
    n = len(order)
    return {"pairs": n, "trl_seq_tokens": trl_seq, "posttrain_seq_tokens": pt_seq,
            "trl_completion_tokens": trl_comp, "posttrain_completion_tokens": pt_comp,
            "trl_mean_seq": round(trl_seq / (2 * n), 1), "posttrain_mean_seq": round(pt_seq / (2 * n), 1),
            "trl_mean_completion": round(trl_comp / (2 * n), 1),
            "posttrain_mean_completion": round(pt_comp / (2 * n), 1),
            "length_diffs_trl_minus_posttrain": sorted(diffs),
            "sequences_identical": f"{equal}/{2 * n}", "posttrain_ids_prefix_of_trl": f"{prefix}/{2 * n}"}


# --------------------------------------------------------------------------- parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of every run")
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, no TRL live-reference run")
    p.add_argument("--skip-trl-live-ref", action="store_true",
                   help="leave out TRL's default run (reference forward inside every step)")
    p.add_argument("--wait-quiet", type=float, default=300, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the CPU idle")
    p.add_argument("--trl-default-malloc", action="store_true",
                   help="run TRL with glibc's default malloc settings instead of the ones posttrain applies "
                        "to itself (posttrain.allocator)")
    p.add_argument("--posttrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra posttrain config override (repeatable), e.g. share_prefix=false")
    p.add_argument("--only", choices=["posttrain", "trl", "trl_live_ref"], action="append",
                   help="run only these (repeatable)")
    p.add_argument("--json", default=str(C.RESULTS / "dpo_vs_trl.json"), help="where to write the summary")
    a = p.parse_args(argv)
    if a.quick:
        a.steps = min(a.steps, 3)
        a.skip_trl_live_ref = True
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    from posttrain.models import embedded_model_dir

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-dpo-"))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"== posttrain DPO vs TRL DPOTrainer  ({started}, load average {C.loadavg()})", flush=True)
    mach = C.machine()
    git = C.git_state()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, torch threads {mach['torch_threads']}; "
          + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()), flush=True)
    print(f"posttrain at {git['commit']}" + (f" + uncommitted changes in {git['posttrain_changes']}"
                                             if git["posttrain_dirty"] else ""), flush=True)

    model_dir = str(embedded_model_dir())
    n = a.steps * a.batch_size
    src = DATA.read_text().splitlines()
    if n > len(src):
        raise SystemExit(f"{n} pairs needed, {DATA} has {len(src)}")
    train_file = work / "pairs.jsonl"
    train_file.write_text("".join(line + "\n" for line in src[:n]))
    base = {"model_dir": model_dir, "train_file": str(train_file), "batch_size": a.batch_size,
            "max_length": a.max_length, "lr": a.lr, "beta": a.beta, "steps": a.steps}
    batches, info = posttrain_batches(base)
    order = [r for b in batches for r in b]
    if sorted(order) != list(range(n)):
        raise SystemExit("posttrain's batches do not cover the benchmark pairs once each")
    pt_tokens = {str(d["row"]): d for d in info}
    seq_len = {d["row"]: (d["chosen"], d["rejected"]) for d in info}
    pt_batch_tokens = [batch_tokens(b, seq_len) for b in batches]
    real, padded = sum(t[0] for t in pt_batch_tokens), sum(t[1] for t in pt_batch_tokens)
    print(f"data: {n} pairs of {DATA.name}; posttrain sequences {min(min(v) for v in seq_len.values())}-"
          f"{max(max(v) for v in seq_len.values())} tokens (mean {real / (2 * n):.0f}), completions "
          f"{sum(d['chosen_completion'] + d['rejected_completion'] for d in info) / (2 * n):.1f} tokens on average; "
          f"{a.steps} batches of {a.batch_size} pairs, padding {1 - real / padded:.1%}", flush=True)

    plan = [
        ("posttrain", run_posttrain, {**base, "extra": a.posttrain_set}),
        ("trl", run_trl, {**base, "order": order, "pt_tokens": pt_tokens, "precompute": True,
                          "settings": dict(TRL_FAST), "keep_freed_memory": not a.trl_default_malloc}),
    ]
    if not a.skip_trl_live_ref:
        plan.append(("trl_live_ref", run_trl, {**base, "order": order, "pt_tokens": pt_tokens, "precompute": False,
                                               "settings": dict(TRL_FAST),
                                               "keep_freed_memory": not a.trl_default_malloc}))
    if a.only:
        plan = [p for p in plan if p[0] in a.only]

    results: dict[str, dict] = {}
    for name, fn, spec in plan:
        r = results[name] = C.run_one(name, fn, spec, work, a.wait_quiet)
        if "error" in r:
            continue
        print(f"{name}: {r['s_per_step']:.2f} s/step over steps 2-{r['steps']} ({r['window_s']:.1f} s); "
              f"{C.fmt(r.get('quiet_s_per_step'), '.2f')} s/step over its {r.get('quiet_steps', 0)} quiet steps; "
              f"reference pass {C.fmt(r.get('ref_pass_s'), '.1f', 'none (in each step)')} s (peak RSS after it "
              f"{C.fmt(r.get('rss_after_ref_mb'), ',.0f')} MB); losses "
              f"{', '.join(f'{x:.4f}' for x in r['losses'])}; peak RSS {r['rss_train_mb']:,.0f} MB (train) / "
              f"{r['rss_exit_mb']:,.0f} MB (exit); load in window {r['load']}; wall {r['wall_s']:.0f} s", flush=True)
        if "tokens" in r:
            t = r["tokens"]
            print(f"   tokens per sequence: TRL {t['trl_mean_seq']} (completion {t['trl_mean_completion']}), posttrain "
                  f"{t['posttrain_mean_seq']} (completion {t['posttrain_mean_completion']}); TRL - posttrain length "
                  f"(chosen, rejected) per pair: {t['length_diffs_trl_minus_posttrain']}; identical sequences "
                  f"{t['sequences_identical']}, posttrain's a prefix of TRL's {t['posttrain_ids_prefix_of_trl']}", flush=True)
        split = r.get("split_s", {})
        for k, st in enumerate(r.get("per_step", []), start=1):
            parts = "  ".join(f"{n} {v[k]:5.2f} s" for n, v in split.items() if k < len(v))
            print(f"   step {st['step']:>3}: {st['s']:6.2f} s  ({parts})  other processes {st['other_cores_busy']} cores",
                  flush=True)

    summary = summarize(a, results, mach, git, started, n, real, padded)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_table(summary)
    print(f"\nsummary written to {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all("error" not in r for r in results.values()) else 1


def summarize(a, results, mach, git, started, n, real, padded) -> dict:
    ok = {k: r for k, r in results.items() if "error" not in r}
    paired = C.paired_quiet_step_times(ok["posttrain"], ok["trl"]) if {"posttrain", "trl"} <= ok.keys() else None
    use_paired = paired is not None and len(paired["steps"]) >= 2
    runs: dict[str, dict] = {}
    for name, r in results.items():
        if "error" in r:
            runs[name] = {"error": r["error"]}
            continue
        if use_paired and name in ("posttrain", "trl"):
            s, basis = (paired["a"] if name == "posttrain" else paired["b"]), f"steps {paired['steps']} (quiet in both)"
        else:
            s, basis = C.pick_quiet(r, "s_per_step")
        runs[name] = {
            "steps": r["steps"], "s_per_step": round(s, 3), "steps_per_s": round(1 / s, 4), "basis": basis,
            "s_per_step_all_steps": round(r["s_per_step"], 3),
            "s_per_step_own_quiet_steps": round(r.get("quiet_s_per_step", float("nan")), 3),
            "quiet_steps": r.get("quiet_steps"), "per_step": r.get("per_step"),
            "ref_pass_s": None if r.get("ref_pass_s") is None else round(r["ref_pass_s"], 2),
            "rss_after_ref_pass_mb": None if r.get("rss_after_ref_mb") is None else round(r["rss_after_ref_mb"], 1),
            "split_s": r.get("split_s"),
            "window_split_s_per_step": {k: round(sum(v[1:]) / max(len(v) - 1, 1), 3)
                                        for k, v in (r.get("split_s") or {}).items()},
            "first_step_end_s": round(r["first_step_end_s"], 1),
            "final_loss": r["losses"][-1] if r["losses"] else None, "losses": r["losses"],
            "reward_accuracy": r.get("reward_accuracy"), "step_tokens": r.get("step_tokens"),
            "rss_train_mb": round(r["rss_train_mb"], 1), "rss_exit_mb": round(r["rss_exit_mb"], 1),
            "tokens": r.get("tokens"),
            "settings": r.get("settings"), "resolved": r.get("resolved"), "dtype": r.get("dtype", "float32"),
            "trainable_params": r.get("trainable_params"), "load_in_window": r.get("load"),
            "waited_for_quiet": r.get("waited_for_quiet"), "loadavg_after": r.get("loadavg_after"),
            "wall_s": round(r["wall_s"], 1),
        }
    pt, trl, live = runs.get("posttrain", {}), runs.get("trl", {}), runs.get("trl_live_ref", {})
    targets = {}
    if "s_per_step" in pt and "s_per_step" in trl:
        ratio = trl["s_per_step"] / pt["s_per_step"]
        targets["speedup_vs_trl"] = {"value": round(ratio, 3), "target": ">= 1.5", "pass": ratio >= 1.5,
                                     "basis": pt["basis"]}
        targets["rss_vs_trl"] = {"value": f"{pt['rss_train_mb']:.0f} vs {trl['rss_train_mb']:.0f} MB",
                                 "ratio": round(pt["rss_train_mb"] / trl["rss_train_mb"], 3), "target": "<= 1",
                                 "pass": pt["rss_train_mb"] <= trl["rss_train_mb"]}
    if "s_per_step" in pt and "s_per_step" in live:
        targets["speedup_vs_trl_live_ref"] = {"value": round(live["s_per_step"] / pt["s_per_step"], 3),
                                              "target": "info", "pass": None}
        targets["rss_vs_trl_live_ref"] = {"value": f"{pt['rss_train_mb']:.0f} vs {live['rss_train_mb']:.0f} MB",
                                          "target": "info", "pass": None}
    return {
        "benchmark": "posttrain DPO vs TRL DPOTrainer", "started": started, "machine": mach, "posttrain_git": git,
        "config": {"steps": a.steps, "batch_size_pairs": a.batch_size, "max_length": a.max_length, "lr": a.lr,
                   "beta": a.beta, "loss": "sigmoid", "lora": {**LORA, "target_modules": lora_targets()},
                   "warmup_steps": round(WARMUP_RATIO * a.steps), "schedule": "linear", "pairs": n,
                   "data": str(DATA.relative_to(C.ROOT)), "quick": a.quick,
                   "posttrain_tokens": {"non_padding": real, "padded": padded,
                                        "padding_share": round(1 - real / padded, 4)},
                   "trl_settings": C.resolve_trl_settings(TRL_FAST), "ref_batch_sequences": REF_BATCH_SEQS,
                   "posttrain_set": a.posttrain_set},
        "paired_quiet_steps": paired, "runs": runs, "targets": targets,
    }


def print_table(s: dict) -> None:
    runs = s["runs"]
    print("\n" + "=" * 108)
    print(f"{'run':<13} {'steps':>5} {'s/step':>7} {'steps/s':>8} {'TRL/posttrain':>13} {'ref pass':>9} "
          f"{'RSS train':>10} {'RSS exit':>9} {'final loss':>10}  basis")
    pt = runs.get("posttrain", {}).get("s_per_step")
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:<13} FAILED: {r['error']}")
            continue
        rel = f"{r['s_per_step'] / pt:.2f}x" if pt else "-"
        ref = f"{r['ref_pass_s']:.1f}s" if r["ref_pass_s"] is not None else "per step"
        print(f"{name:<13} {r['steps']:>5} {r['s_per_step']:>7.2f} {r['steps_per_s']:>8.3f} {rel:>13} {ref:>9} "
              f"{r['rss_train_mb']:>8,.0f}MB {r['rss_exit_mb']:>7,.0f}MB {C.fmt(r['final_loss'], '.4f'):>10}  "
              f"{r['basis']}")
    for name, t in s["targets"].items():
        verdict = "info" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print(f"  {verdict:<5} {name}: {t['value']} (target {t['target']})")
    for name, r in runs.items():
        if "load_in_window" in r:
            print(f"  load during {name}: {r['load_in_window']}, loadavg after {r['loadavg_after']}")
    print("=" * 108)


if __name__ == "__main__":
    raise SystemExit(main())
