"""posttrain GRPO vs TRL ``GRPOTrainer``: same model, prompts, group size, LoRA, reward and hyper-parameters.

Usage::

    .venv/bin/python benchmarks/grpo_vs_trl.py             # full run: 6 steps x 2 runs (~10 min on an idle 2-core CPU)
    .venv/bin/python benchmarks/grpo_vs_trl.py --quick     # smoke run: 3 steps
    .venv/bin/python benchmarks/grpo_vs_trl.py --steps 10

What is held equal (the settings of ``recipes/grpo.yaml`` at one prompt per step)
    Model: the embedded SmolLM2-135M-Instruct (``posttrain.models.embedded_model_dir()``,
    a plain HF directory), float32 weights (bf16 autocast in both where posttrain's auto
    picks it), LoRA r 16, alpha 32, dropout 0 on posttrain's default targets for llama
    models (q/k/v/o and gate/up/down projections), given to TRL as the same
    ``peft.LoraConfig``. Prompts: the first ``steps`` rows of
    ``examples/data/add2_train.jsonl`` (``prompt`` + ``answer``), a user turn rendered with
    SmolLM2's chat template and its generation prompt in both (TRL gets the
    conversational form); TRL is fed them in the order posttrain's ``EpochBatches`` visits
    them (``shuffle_dataset=False``), so step k of both runs samples from the same prompt
    (the script checks that the prompt token ids agree). One optimisation step = 1 prompt
    x G = 8 completions: posttrain ``batch_size=1``, ``group_size=8``, all 8 sampled in one
    ``generate`` call (``sampling.batch_size`` 32) and trained in forward/backward passes of
    ``--micro-batch`` completions (``micro_batch_size``, default 8: posttrain's default and
    TRL's, all 8 completions in one pass); TRL ``num_generations=8`` and
    ``per_device_train_batch_size`` = ``--trl-micro-batch`` (default: the same), with
    ``steps_per_generation`` = ``gradient_accumulation_steps`` = 8 / that, so one generation
    batch of 8 and one optimizer step per generation in both. (Until 2026-12-04 the default
    was 4, posttrain's default then; ``--micro-batch 4`` runs that setting.)
    Sampling: temperature 0.7, top-p 1, no top-k, at most 64 new tokens, HF ``generate``
    with its KV cache (no vLLM). Reward: posttrain's ``exact_answer`` (TRL calls the same
    function through a TRL-style wrapper).
    Loss: GRPO with group-normalised advantages (``scale_rewards="group"``), per-sequence
    token mean (TRL ``loss_type="grpo"``, posttrain ``loss_agg=seq_mean``), clip 0.2, k3 KL
    to the reference with beta 0.04 (under LoRA the reference is the same weights with the
    adapters disabled, in both), ``num_iterations=1`` (so neither computes "old"
    log-probs: the ratio is 1). Optimiser: AdamW (0.9, 0.999), no weight decay, grad-norm
    clip 1.0, lr 1e-4, constant schedule, no warmup.

What is not the same (and cannot be made the same)
    The sampled completions: the two trainers draw from different random streams, so
    completion lengths (and the cost of every part of a step) differ step by step. The
    script records every step's completion lengths and rewards for both, and the mean
    completion length of each run, so the per-step times can be read against the tokens
    processed. Implementation choices that are part of what is compared: posttrain samples
    from the LoRA model with its adapters merged in place for the rollout (unmerged after);
    TRL samples through the unmerged peft model.

Runs (each in a fresh ``spawn`` subprocess, one after the other)
    ``posttrain``: ``posttrain.stages.online_rl.train`` with a ``GRPOConfig`` from
    ``load_config`` (no eval, no checkpoints, no samples file, no merge at the end).
    ``trl``: ``GRPOTrainer`` with float32 weights and ``bf16`` autocast exactly where posttrain's
    ``auto`` picks it (``C.TRL_FAST``), ``use_cpu=True``,
    ``gradient_checkpointing=False``, ``dataloader_pin_memory=False``, ``use_vllm=False``,
    no eval, no saving, ``report_to="none"``.

How s/step is measured
    The end of each optimisation step is taken right after the optimizer step (a wrapper
    around ``posttrain.engine.Trainable.step``; a ``TrainerCallback.on_step_end`` for
    TRL); a step's time therefore holds the rollout (generation), reward, reference pass,
    forward/backward and optimizer step. s/step = ``(t_end(N) - t_end(1)) / (N - 1)``
    (model loading and step 1 are outside the window). Time inside each step is also split
    into generation (posttrain ``rollout.sample``; TRL ``_generate_single_turn``) and the
    no-grad reference pass (posttrain ``Policy.reference_logprobs``; TRL's no-grad calls of
    ``_get_per_token_logps_and_entropies``). As in ``sft_vs_trl.py`` every step's CPU use
    by other processes is sampled, and the runs are compared over the steps quiet in both.
    Peak RSS: the run's own ``ru_maxrss`` at the end of the last step.

Targets printed pass/fail: TRL s/step / posttrain s/step >= 2; posttrain peak RSS <= 0.7x
TRL's. The summary also goes to benchmarks/results/grpo_vs_trl.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

DATA = C.ROOT / "examples" / "data" / "add2_train.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SETTINGS = {"group_size": 8, "max_new_tokens": 64, "temperature": 0.7, "beta": 0.04, "lr": 1e-4, "clip_eps": 0.2}

# TRL's fast CPU settings (shared with sft_vs_trl.py; bf16 as posttrain's dtype=auto resolves here)
TRL_FAST = C.TRL_FAST


def lora_targets() -> list[str]:
    from posttrain.models import LORA_TARGETS

    return list(LORA_TARGETS["llama"])


def posttrain_overrides(spec: dict) -> list[str]:
    s = SETTINGS
    return [
        f"model.name_or_path={spec['model_dir']}", "model.dtype=auto", "model.lora=true",
        f"model.lora_r={LORA['r']}", f"model.lora_alpha={LORA['alpha']}", f"model.lora_dropout={LORA['dropout']}",
        f"data.train={spec['train_file']}", "data.max_length=256", f"output_dir={spec['out_dir']}",
        f"max_steps={spec['steps']}", "batch_size=1", f"group_size={s['group_size']}",
        f"sampling.max_new_tokens={s['max_new_tokens']}", f"sampling.temperature={s['temperature']}",
        "sampling.batch_size=32", f"beta={s['beta']}", f"lr={s['lr']}", f"clip_eps={s['clip_eps']}",
        f"micro_batch_size={spec['micro_batch']}", "num_iterations=1", "loss_agg=seq_mean", "scale_rewards=group", "kl_estimator=k3",
        "schedule=constant", "warmup_ratio=0", "eval_every=0", "save_every=0", "sample_every=0", "merge_lora=false",
        "seed=0", "tensorboard=false", *spec.get("extra", []),
    ]


def posttrain_prompt_order(spec: dict) -> tuple[list[int], list[list[int]]]:
    """(file row of the prompt of each of posttrain's steps, posttrain's prompt token ids per row)."""
    from posttrain.config import load_config
    from posttrain.data.loading import BadRows
    from posttrain.engine import EpochBatches
    from posttrain.models import load_tokenizer
    from posttrain.stages.online_rl import GRPOConfig, load_prompts

    cfg = load_config(GRPOConfig, None, posttrain_overrides({**spec, "out_dir": "/nonexistent"}))
    tok = load_tokenizer(spec["model_dir"])
    prompts = load_prompts(tok, cfg.data.train, cfg.data.max_length, cfg.data.too_long, BadRows(skip=False))
    batches = EpochBatches([len(p.ids) for p in prompts], cfg.batch_size, cfg.seed)
    return [batches[m][0] for m in range(spec["steps"])], [p.ids for p in prompts]


def exact_answer_reward(prompts, completions, answer, **kwargs):
    """TRL-style reward: posttrain's ``exact_answer`` on the completion text."""
    from posttrain.rewards.functions import exact_answer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return exact_answer(prompts, texts, answer=list(answer))


# --------------------------------------------------------------------------- posttrain run (child)


def run_posttrain(spec: dict) -> dict:
    from posttrain import engine, rollout
    from posttrain.config import load_config
    from posttrain.stages import online_rl

    recs: list[dict] = []
    parts = {"gen": 0.0, "ref": 0.0, "merge": 0.0}
    real_step = engine.Trainable.step

    def timed_step(self, max_grad_norm):
        out = real_step(self, max_grad_norm)
        recs.append({"t_end": time.perf_counter(), "rss_mb": C.peak_rss_mb(), "cpu": C.cpu_times(), **parts})
        parts.update(gen=0.0, ref=0.0, merge=0.0)
        return out

    real_merge = rollout.generation_model

    @contextlib.contextmanager
    def timed_merge(model, dtype=None):  # refreshing the decoding copy, LoRA adapters merged into it
        t = time.perf_counter()                 # before rollout.sample generates (no unmerge after)
        with real_merge(model, dtype) as merged:
            parts["merge"] += time.perf_counter() - t
            yield merged
            t = time.perf_counter()
        parts["merge"] += time.perf_counter() - t

    rollout.generation_model = timed_merge

    engine.Trainable.step = timed_step
    gens: list[dict] = []
    real_sample = online_rl.sample

    def timed_sample(model, tok, prompt_ids, cfg, seed=0):
        t = time.perf_counter()
        roll = real_sample(model, tok, prompt_ids, cfg, seed=seed)
        parts["gen"] += time.perf_counter() - t
        gens.append({"prompt_ids": prompt_ids[0], "lengths": [len(c) for c in roll.completion_ids]})
        return roll

    online_rl.sample = timed_sample
    real_ref = online_rl.Policy.reference_logprobs

    def timed_ref(self, batch):
        t = time.perf_counter()
        out = real_ref(self, batch)
        parts["ref"] += time.perf_counter() - t
        return out

    online_rl.Policy.reference_logprobs = timed_ref
    cfg = load_config(online_rl.GRPOConfig, None, posttrain_overrides(spec))
    t0 = time.perf_counter()
    res = online_rl.train(cfg)
    metrics = [m for m in engine.read_metrics(res.run_dir) if "perf/step_s" in m]
    out = {
        "name": spec["name"], "steps": len(recs), "losses": [m.get("loss/policy") for m in metrics],
        "rewards": [m.get("reward/mean") for m in metrics], "kl": [m.get("policy/kl") for m in metrics],
        "completion_lengths": [g["lengths"] for g in gens], "prompt_ids": [g["prompt_ids"] for g in gens],
        "gen_s": [r["gen"] for r in recs], "ref_s": [r["ref"] for r in recs],
        "merge_s": [r["merge"] for r in recs],
        "step_ends": [r["t_end"] for r in recs], "rss_train_mb": recs[-1]["rss_mb"], "rss_exit_mb": C.peak_rss_mb(),
        "rss_per_step_mb": [round(r["rss_mb"]) for r in recs], "first_step_end_s": recs[0]["t_end"] - t0,
        "load": C.window_load(recs[0]["cpu"], recs[-1]["cpu"]) if len(recs) > 1 else {},
        "total_s": time.perf_counter() - t0,
    }
    out.update(C.window_step_times(out["step_ends"], [r["cpu"] for r in recs]))
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    return out


# --------------------------------------------------------------------------- TRL run (child)


def run_trl(spec: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s = SETTINGS
    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": rows[i]["prompt"]}],
                                      "answer": rows[i]["answer"]} for i in spec["order"]])
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    G = s["group_size"]
    args = GRPOConfig(
        output_dir=spec["out_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
        num_generations=G, steps_per_generation=G // spec["micro_batch"],
        gradient_accumulation_steps=G // spec["micro_batch"], num_iterations=1,
        max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_p=1.0, top_k=0,
        beta=s["beta"], epsilon=s["clip_eps"], loss_type="grpo", scale_rewards="group",
        mask_truncated_completions=False, learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, shuffle_dataset=False,
        use_vllm=False, model_init_kwargs={"dtype": "float32"}, logging_steps=1, seed=0, report_to="none",
        save_strategy="no", eval_strategy="no", log_completions=False, use_cpu=True,
        **C.resolve_trl_settings(spec["settings"]),
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=lora_targets(), task_type="CAUSAL_LM", bias="none")
    parts = {"gen": 0.0, "ref": 0.0}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.recs: list[dict] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.recs.append({"t_end": time.perf_counter(), "rss_mb": C.peak_rss_mb(), "cpu": C.cpu_times(), **parts})
            parts.update(gen=0.0, ref=0.0)

    gens: list[dict] = []
    real_gen = GRPOTrainer._generate_single_turn

    def timed_gen(self, prompt_ids, *a, **kw):
        t = time.perf_counter()
        out = real_gen(self, prompt_ids, *a, **kw)
        parts["gen"] += time.perf_counter() - t
        gens.append({"prompt_ids": list(prompt_ids[0]), "lengths": [len(c) for c in out[0]]})
        return out

    real_lp = GRPOTrainer._get_per_token_logps_and_entropies

    def timed_lp(self, *a, **kw):
        if torch.is_grad_enabled():
            return real_lp(self, *a, **kw)
        t = time.perf_counter()
        out = real_lp(self, *a, **kw)
        parts["ref"] += time.perf_counter() - t
        return out

    GRPOTrainer._generate_single_turn = timed_gen
    GRPOTrainer._get_per_token_logps_and_entropies = timed_lp
    timer = StepTimer()
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[exact_answer_reward], args=args, train_dataset=ds,
                          processing_class=tok, peft_config=peft_config, callbacks=[timer])
    trainer.train()
    recs = timer.recs
    hist = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    model = trainer.model
    out = {
        "name": spec["name"], "steps": len(recs), "losses": [h.get("loss") for h in hist],
        "rewards": [h.get("reward") for h in hist], "kl": [h.get("kl") for h in hist],
        "completion_lengths": [g["lengths"] for g in gens], "prompt_ids": [g["prompt_ids"] for g in gens],
        "gen_s": [r["gen"] for r in recs], "ref_s": [r["ref"] for r in recs],
        "step_ends": [r["t_end"] for r in recs], "rss_train_mb": recs[-1]["rss_mb"], "rss_exit_mb": C.peak_rss_mb(),
        "rss_per_step_mb": [round(r["rss_mb"]) for r in recs], "first_step_end_s": recs[0]["t_end"] - t0,
        "load": C.window_load(recs[0]["cpu"], recs[-1]["cpu"]) if len(recs) > 1 else {},
        "total_s": time.perf_counter() - t0,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "settings": C.resolve_trl_settings(spec["settings"]),
        "resolved": {k: str(getattr(args, k)) for k in ("bf16", "gradient_checkpointing", "optim", "loss_type",
                                                         "generation_batch_size", "steps_per_generation",
                                                         "num_iterations", "beta", "top_k", "disable_dropout")},
    }
    out.update(C.window_step_times(out["step_ends"], [r["cpu"] for r in recs]))
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    return out


# --------------------------------------------------------------------------- parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimisation steps (= prompts) of each run")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps")
    p.add_argument("--wait-quiet", type=float, default=300, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the CPU idle")
    p.add_argument("--trl-default-malloc", action="store_true",
                   help="run TRL with glibc's default malloc settings instead of the ones posttrain applies "
                        "to itself (posttrain.allocator)")
    p.add_argument("--micro-batch", type=int, default=8, metavar="N",
                   help="completions per forward/backward pass (posttrain micro_batch_size; TRL's too unless "
                        "--trl-micro-batch): a divisor of the group size 8")
    p.add_argument("--trl-micro-batch", type=int, metavar="N",
                   help="TRL's per_device_train_batch_size (8: TRL's default, all completions in one pass)")
    p.add_argument("--posttrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra posttrain config override, e.g. model.gradient_checkpointing=true (repeatable)")
    p.add_argument("--trl-checkpointing", action="store_true",
                   help="run TRL with gradient checkpointing (TRL's own GRPOConfig default; posttrain's too): the "
                        "equal-settings memory comparison. Without it TRL runs without, its faster setting, and "
                        "the peak-RSS ratio compares posttrain with checkpointing against TRL without")
    p.add_argument("--only", choices=["posttrain", "trl"], action="append", help="run only these (repeatable)")
    p.add_argument("--json", default=str(C.RESULTS / "grpo_vs_trl.json"), help="where to write the summary")
    a = p.parse_args(argv)
    if a.quick:
        a.steps = min(a.steps, 3)
    a.trl_micro_batch = a.trl_micro_batch or a.micro_batch
    for n in (a.micro_batch, a.trl_micro_batch):
        if n < 1 or SETTINGS["group_size"] % n:
            p.error(f"a micro-batch must divide the group size {SETTINGS['group_size']}; got {n}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    from posttrain.models import embedded_model_dir

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-grpo-"))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"== posttrain GRPO vs TRL GRPOTrainer  ({started}, load average {C.loadavg()})", flush=True)
    mach = C.machine()
    git = C.git_state()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, torch threads {mach['torch_threads']}; "
          + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()), flush=True)
    print(f"posttrain at {git['commit']}" + (f" + uncommitted changes in {git['posttrain_changes']}"
                                             if git["posttrain_dirty"] else ""), flush=True)
    model_dir = str(embedded_model_dir())
    src = DATA.read_text().splitlines()
    if a.steps > len(src):
        raise SystemExit(f"{a.steps} prompts needed, {DATA} has {len(src)}")
    train_file = work / "prompts.jsonl"
    train_file.write_text("".join(line + "\n" for line in src[: a.steps]))
    base = {"model_dir": model_dir, "train_file": str(train_file), "steps": a.steps, "micro_batch": a.micro_batch}
    order, pt_prompt_ids = posttrain_prompt_order(base)
    print(f"data: {a.steps} prompts of {DATA.name} ({min(map(len, pt_prompt_ids))}-{max(map(len, pt_prompt_ids))} "
          f"prompt tokens), one per step, x {SETTINGS['group_size']} completions of <= {SETTINGS['max_new_tokens']} "
          "tokens", flush=True)

    plan = [("posttrain", run_posttrain, {**base, "extra": a.posttrain_set}),
            ("trl", run_trl, {**base, "order": order, "micro_batch": a.trl_micro_batch,
                              "settings": {**TRL_FAST, "gradient_checkpointing": a.trl_checkpointing},
                              "keep_freed_memory": not a.trl_default_malloc})]
    if a.only:
        plan = [p for p in plan if p[0] in a.only]
    results: dict[str, dict] = {}
    for name, fn, spec in plan:
        r = results[name] = C.run_one(name, fn, spec, work, a.wait_quiet)
        if "error" in r:
            continue
        r["prompts_match"] = sum(p == pt_prompt_ids[order[k]] for k, p in enumerate(r["prompt_ids"]))
        print(f"{name}: {r['s_per_step']:.2f} s/step over steps 2-{r['steps']} ({r['window_s']:.1f} s); "
              f"{C.fmt(r.get('quiet_s_per_step'), '.2f')} s/step over its {r.get('quiet_steps', 0)} quiet steps; "
              f"peak RSS {r['rss_train_mb']:,.0f} MB (train) / {r['rss_exit_mb']:,.0f} MB (exit); prompt ids equal "
              f"to posttrain's in {r['prompts_match']}/{len(r['prompt_ids'])} steps; load in window {r['load']}; "
              f"wall {r['wall_s']:.0f} s", flush=True)
        for k, st in enumerate([{"step": 1, "s": None, "other_cores_busy": None}] + r.get("per_step", [])):
            lens = r["completion_lengths"][k] if k < len(r["completion_lengths"]) else []
            merge = f" (merge {r['merge_s'][k]:.2f})" if "merge_s" in r else ""
            print(f"   step {st['step']:>3}: {C.fmt(st['s'], '6.2f', '  (1st)')} s  generate {r['gen_s'][k]:5.2f} s{merge}  "
                  f"ref {r['ref_s'][k]:4.2f} s  completion tokens {sum(lens):>4} (max {max(lens, default=0):>2})  "
                  f"reward {C.fmt(r['rewards'][k], '.3f')}  loss {C.fmt(r['losses'][k], '.4f')}  RSS "
                  f"{r['rss_per_step_mb'][k]:,} MB  other processes {st['other_cores_busy']} cores", flush=True)

    summary = summarize(a, results, mach, git, started)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print_table(summary)
    print(f"\nsummary written to {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all("error" not in r for r in results.values()) else 1


def _window_mean(xs: list[float]) -> float:
    w = xs[1:]
    return sum(w) / len(w) if w else float("nan")


def summarize(a, results, mach, git, started) -> dict:
    ok = {k: r for k, r in results.items() if "error" not in r}
    paired = C.paired_quiet_step_times(ok["posttrain"], ok["trl"]) if {"posttrain", "trl"} <= ok.keys() else None
    use_paired = paired is not None and len(paired["steps"]) >= 2
    runs: dict[str, dict] = {}
    for name, r in results.items():
        if "error" in r:
            runs[name] = {"error": r["error"]}
            continue
        if use_paired:
            s, basis = (paired["a"] if name == "posttrain" else paired["b"]), f"steps {paired['steps']} (quiet in both)"
        else:
            s, basis = C.pick_quiet(r, "s_per_step")
        comp = [sum(x) for x in r["completion_lengths"]]
        gen_w, ref_w = _window_mean(r["gen_s"]), _window_mean(r["ref_s"])
        runs[name] = {
            "steps": r["steps"], "s_per_step": round(s, 3), "basis": basis,
            "s_per_step_all_steps": round(r["s_per_step"], 3),
            "s_per_step_own_quiet_steps": round(r.get("quiet_s_per_step", float("nan")), 3),
            "quiet_steps": r.get("quiet_steps"), "per_step": r.get("per_step"),
            "window_generate_s_per_step": round(gen_w, 3), "window_ref_pass_s_per_step": round(ref_w, 3),
            "window_rest_s_per_step": round(r["s_per_step"] - gen_w - ref_w, 3),
            "window_lora_merge_s_per_step": round(_window_mean(r["merge_s"]), 3) if "merge_s" in r else None,
            "completion_tokens_per_step": comp, "window_completion_tokens_per_step": round(_window_mean(comp), 1),
            "completion_lengths": r["completion_lengths"], "generate_s": [round(x, 3) for x in r["gen_s"]],
            "ref_pass_s": [round(x, 3) for x in r["ref_s"]], "prompts_match_posttrain": r.get("prompts_match"),
            "rewards": r["rewards"], "losses": r["losses"], "kl": r["kl"],
            "final_loss": r["losses"][-1] if r["losses"] else None,
            "rss_train_mb": round(r["rss_train_mb"], 1), "rss_exit_mb": round(r["rss_exit_mb"], 1),
            "rss_per_step_mb": r["rss_per_step_mb"], "first_step_end_s": round(r["first_step_end_s"], 1),
            "settings": r.get("settings"), "resolved": r.get("resolved"), "dtype": r.get("dtype", "float32"),
            "trainable_params": r.get("trainable_params"), "load_in_window": r.get("load"),
            "waited_for_quiet": r.get("waited_for_quiet"), "loadavg_after": r.get("loadavg_after"),
            "wall_s": round(r["wall_s"], 1),
        }
    pt, trl = runs.get("posttrain", {}), runs.get("trl", {})
    targets = {}
    if "s_per_step" in pt and "s_per_step" in trl:
        ratio = trl["s_per_step"] / pt["s_per_step"]
        rss = pt["rss_train_mb"] / trl["rss_train_mb"]
        targets = {
            "trl_s_per_step_over_posttrain": {"value": round(ratio, 3), "target": ">= 2", "pass": ratio >= 2,
                                              "basis": pt["basis"]},
            "rss_posttrain_over_trl": {"value": round(rss, 3), "target": "<= 0.7", "pass": rss <= 0.7,
                                       "mb": f"{pt['rss_train_mb']:.0f} vs {trl['rss_train_mb']:.0f} MB"},
            "completion_tokens_per_step_trl_over_posttrain": {
                "value": round(trl["window_completion_tokens_per_step"] / pt["window_completion_tokens_per_step"], 3),
                "target": "info (1 = the same work)", "pass": None},
        }
    return {
        "benchmark": "posttrain GRPO vs TRL GRPOTrainer", "started": started, "machine": mach, "posttrain_git": git,
        "config": {"steps": a.steps, "prompts_per_step": 1, **SETTINGS, "lora": {**LORA, "target_modules": lora_targets()},
                   "reward": "exact_answer", "loss": "grpo (seq mean), k3 KL", "num_iterations": 1,
                   "micro_batch": {"posttrain": a.micro_batch, "trl": a.trl_micro_batch},
                   "posttrain_set": a.posttrain_set,
                   "data": str(DATA.relative_to(C.ROOT)), "quick": a.quick, "trl_settings": C.resolve_trl_settings(TRL_FAST)},
        "paired_quiet_steps": paired, "runs": runs, "targets": targets,
    }


def print_table(s: dict) -> None:
    runs = s["runs"]
    print("\n" + "=" * 116)
    print(f"{'run':<10} {'steps':>5} {'s/step':>7} {'vs posttrain':>12} {'generate':>9} {'ref pass':>9} {'rest':>7} "
          f"{'compl tok/step':>14} {'RSS train':>10} {'RSS exit':>9}  basis")
    pt = runs.get("posttrain", {}).get("s_per_step")
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:<10} FAILED: {r['error']}")
            continue
        rel = f"{r['s_per_step'] / pt:.2f}x" if pt else "-"
        print(f"{name:<10} {r['steps']:>5} {r['s_per_step']:>7.2f} {rel:>12} {r['window_generate_s_per_step']:>8.2f}s "
              f"{r['window_ref_pass_s_per_step']:>8.2f}s {r['window_rest_s_per_step']:>6.2f}s "
              f"{r['window_completion_tokens_per_step']:>14.1f} {r['rss_train_mb']:>8,.0f}MB {r['rss_exit_mb']:>7,.0f}MB"
              f"  {r['basis']}")
    print("  (generate / ref pass / rest: means over the window steps 2..N of all steps, rest = s/step(all) - both)")
    if runs.get("posttrain", {}).get("window_lora_merge_s_per_step") is not None:
        print(f"  posttrain's generate includes refreshing the decoding copy (LoRA merged into it): "
              f"{runs['posttrain']['window_lora_merge_s_per_step']:.2f} s/step")
    for name, t in s["targets"].items():
        verdict = "info" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print(f"  {verdict:<5} {name}: {t['value']} (target {t['target']})")
    for name, r in runs.items():
        if "load_in_window" in r:
            print(f"  load during {name}: {r['load_in_window']}, loadavg after {r['loadavg_after']}")
    print("=" * 116)


if __name__ == "__main__":
    raise SystemExit(main())
