"""posttrain SFT vs TRL ``SFTTrainer``: same model, data, batches and hyper-parameters.

Usage::

    .venv/bin/python benchmarks/sft_vs_trl.py                  # full run (~15 min on an idle 2-core CPU)
    .venv/bin/python benchmarks/sft_vs_trl.py --skip-trl-default   # ~8 min
    .venv/bin/python benchmarks/sft_vs_trl.py --quick --skip-trl-default   # smoke run, 4 steps
    .venv/bin/python benchmarks/sft_vs_trl.py --only trl_fast --trl-fast-set padding_free=true

What is held equal
    Model: the embedded SmolLM2-135M-Instruct (``posttrain.models.embedded_model_dir()``,
    a plain HF directory), fp32 weights. Data: ``steps x batch_size`` worked arithmetic
    solutions (``arithmetic_problems(n, "train", seed=0)``, ``messages`` rows). Batches:
    TRL is fed exactly the batches posttrain trains on, in the same order (computed with
    posttrain's own loader and ``EpochBatches``; TRL gets the dataset in that order with
    ``train_sampling_strategy="sequential"``), so both runs see the same tokens, the same
    padding and the same final batch, and their losses are comparable step by step.
    Optimiser: AdamW (0.9, 0.999), no weight decay, grad-norm clip 1.0, the same peak lr,
    cosine schedule with ``ceil(0.03 * steps)`` warmup steps (posttrain's rule since cf7c6ff), batch size, steps and
    ``max_length``.

Loss mask (the fairest comparable setting)
    posttrain trains on each assistant turn's content and its ``<|im_end|>``, not on the
    prompt, the system turn, ``<|im_start|>assistant\\n`` or the newline after
    ``<|im_end|>``. TRL 1.16 offers ``completion_only_loss`` (prompt/completion rows;
    it would also train the newline after ``<|im_end|>``, one extra near-free token per
    example, which lowers the mean loss) and ``assistant_only_loss`` (``messages`` rows;
    needs ``{% generation %}`` markers, and TRL cannot patch SmolLM2's ChatML template
    itself). We use ``assistant_only_loss=True`` with ``chat_template_path`` pointing to
    SmolLM2's own template plus generation markers around ``content + '<|im_end|>'``:
    it renders byte-identical text, and the script checks that TRL's prepared
    ``input_ids``/``labels`` equal posttrain's for every example (``labels_match``).

Runs (each in a fresh ``spawn`` subprocess, one after the other)
    ``posttrain``: ``posttrain.stages.sft.train`` with its defaults (``batching=pad``,
    ``model.dtype=auto``: fp32 on a CPU without fast bf16; fp32 weights with bf16 autocast
    on one with it, AVX512-BF16 or AMX).
    ``trl_fast``: the fastest TRL settings found for CPU: its precision as posttrain's
    ``auto`` resolves on this machine (``bf16=True``, TRL's autocast over fp32 weights, where
    bf16 is fast; ``bf16=False``, fp32, elsewhere; ``--trl-fast-set bf16=...`` overrides),
    ``gradient_checkpointing=False``, ``dataloader_pin_memory=False``, the default
    fused AdamW, no eval, no saving, ``report_to="none"`` (see ``TRL_FAST`` and the notes
    in benchmarks/README.md on what was tried: ``padding_free=True`` measured slower),
    and the same process-level malloc settings that posttrain applies to itself
    (``posttrain.allocator.keep_freed_memory``: freed memory stays mapped, so a step does
    not page-fault its large tensors in again; ``--trl-fast-default-malloc`` leaves them out).
    ``trl_default``: TRL's defaults apart from the controls above (bf16 autocast and
    gradient checkpointing on), for ``--trl-default-steps`` steps only: bf16 is several
    times slower than fp32 on CPUs without native bf16 matmul. Every TRL run sets
    ``use_cpu=True`` (transformers refuses bf16 on a machine without a GPU otherwise).

How tokens/s is measured (the same way for every run)
    Non-padding tokens (``attention_mask.sum()`` of each batch) over wall-clock time,
    in the steady-state window from the end of step 1 to the end of the last step:
    ``tokens of steps 2..N / (t_end(N) - t_end(1))``. Model loading, tokenisation, the
    first step (allocation warm-up) and the final save are outside the window; data
    collation, logging and the progress bar between steps are inside it, for both.
    Step ends are taken right after the optimizer step: a wrapper around
    ``posttrain.engine.Trainable.step`` for posttrain, a ``TrainerCallback.on_step_end``
    for TRL. Token counts: posttrain's ``metrics.jsonl`` (``perf/tokens_per_s *
    perf/step_s``), TRL's own non-padding token counter (``num_tokens``); with identical
    batches the two agree, which the script checks.

Shared machines
    On a 2-core machine another busy process does not just take its share: torch's two
    OpenMP threads wait on each other at every barrier, and a step takes 3-5x as long.
    So before each run the script waits (``--wait-quiet``) for the CPU to be idle, and it
    samples /proc/stat at every step end: a step during which other processes kept less
    than 0.1 core busy is "quiet". posttrain and trl_fast are compared over the steps
    that were quiet in *both* runs (the same step number is the same batch); a run's
    own figure is its quiet steps' rate, or all steps flagged LOADED when fewer than 2
    were quiet. All three figures (paired, own quiet steps, all steps) and every step's
    time and load are in the JSON. The matmul reference likewise keeps quiet trials only.

Other figures
    Peak RSS: ``ru_maxrss`` of the run's own process at the end of the last training step
    (``rss_train_mb``, the compared figure) and at exit (``rss_exit_mb``, after
    posttrain's final save). Final loss: the train loss of the last step (the same batch
    for posttrain and trl_fast). FLOP/s: ``6 x parameters x tokens/s`` (the usual
    training estimate, embeddings included; attention ignored), as a share of the best
    2048x2048 matmul rate measured in this invocation (before and after the runs) in the
    dtype posttrain computes in (fp32, or bf16 under mixed precision).
    Load: ``/proc/loadavg`` and, over each timing window, the cores this run kept busy
    and the cores everything else on the machine kept busy.

Targets printed pass/fail: posttrain >= 1.5x trl_fast tokens/s; posttrain peak RSS <=
trl_fast's; final loss within 2% of trl_fast's; posttrain >= 75% of the matmul FLOP/s.
The summary also goes to benchmarks/results/sft_vs_trl.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

# TRL settings of the "fast" run, on top of the controls every TRL run shares.
TRL_FAST = C.TRL_FAST
# The "default" run changes nothing on top of the controls.
TRL_DEFAULT: dict = {}

CHATML_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
CHATML_TURN_MARKED = (
    "{% if message['role'] == 'assistant' %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}" + CHATML_TURN + "{% endif %}"
)


def marked_template(template: str) -> str:
    """SmolLM2's ChatML template with ``{% generation %}`` around assistant content + <|im_end|>."""
    if CHATML_TURN not in template:
        raise SystemExit("the model's chat template is not the SmolLM2 ChatML one this benchmark knows how to mark")
    return template.replace(CHATML_TURN, CHATML_TURN_MARKED)


# --------------------------------------------------------------------------- posttrain run (child)


def run_posttrain(spec: dict) -> dict:
    from posttrain import engine
    from posttrain.config import load_config
    from posttrain.models import count_parameters, pick_precision
    from posttrain.stages import sft

    recs: list[dict] = []
    real_step = engine.Trainable.step

    def timed_step(self, max_grad_norm):
        out = real_step(self, max_grad_norm)
        recs.append({"t_end": time.perf_counter(), "rss_mb": C.peak_rss_mb(), "cpu": C.cpu_times()})
        return out

    engine.Trainable.step = timed_step
    params = {}
    real_count = sft.count_parameters

    def counting(model):
        params["trainable"], params["total"] = count_parameters(model)
        return params["trainable"], params["total"]

    sft.count_parameters = counting
    cfg = load_config(sft.SFTConfig, None, C.posttrain_overrides(
        spec["model_dir"], spec["train_file"], spec["out_dir"], spec["steps"], spec["batch_size"],
        spec["max_length"], spec["lr"], *spec.get("extra", [])))
    t0 = time.perf_counter()
    res = sft.train(cfg)
    sft.count_parameters = real_count
    metrics = [m for m in engine.read_metrics(res.run_dir) if "loss/train" in m]
    tokens = [round(m["perf/tokens_per_s"] * m["perf/step_s"]) for m in metrics]
    losses = [m["loss/train"] for m in metrics]
    out = {
        "name": spec["name"], "steps": len(recs), "step_tokens": tokens, "losses": losses,
        "step_ends": [r["t_end"] for r in recs], "step_s": [m["perf/step_s"] for m in metrics],
        "rss_train_mb": recs[-1]["rss_mb"], "rss_exit_mb": C.peak_rss_mb(), "params": params.get("total"),
        "load": C.window_load(recs[0]["cpu"], recs[-1]["cpu"]) if len(recs) > 1 else {},
        "total_s": time.perf_counter() - t0, "dtype": str(pick_precision(cfg.model.dtype)),
        "settings": {o.split("=", 1)[0]: o.split("=", 1)[1] for o in spec.get("extra", [])},
    }
    out.update(C.window_throughput(out["step_ends"], tokens, [r["cpu"] for r in recs]))
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    return out


# --------------------------------------------------------------------------- TRL run (child)


def run_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    order = spec["order"]
    ds = datasets.Dataset.from_list([{"messages": rows[i]["messages"]} for i in order])
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    settings = C.resolve_trl_settings(spec["settings"])
    max_length = None if settings.get("padding_free") else spec["max_length"]
    args = SFTConfig(
        output_dir=spec["out_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.03 * spec["steps"]), weight_decay=0.0, max_grad_norm=1.0, max_length=max_length,
        assistant_only_loss=True, chat_template_path=spec["template_file"], logging_steps=1, seed=0,
        report_to="none", save_strategy="no", eval_strategy="no", train_sampling_strategy="sequential",
        use_cpu=True,
        **settings,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.recs: list[dict] = []
            self.trainer = None

        def on_step_end(self, args, state, control, **kwargs):
            self.recs.append({"t_end": time.perf_counter(), "tokens_total": self.trainer._total_train_tokens,
                              "rss_mb": C.peak_rss_mb(), "cpu": C.cpu_times()})

    timer = StepTimer()
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=spec["model_dir"], args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[timer])
    timer.trainer = trainer
    labels_match = _labels_match(trainer.train_dataset, rows, order, spec["model_dir"])
    trainer.train()
    recs = timer.recs
    totals = [0] + [r["tokens_total"] for r in recs]
    tokens = [b - a for a, b in itertools.pairwise(totals)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    model = trainer.model
    out = {
        "name": spec["name"], "steps": len(recs), "step_tokens": tokens, "losses": losses,
        "step_ends": [r["t_end"] for r in recs], "rss_train_mb": recs[-1]["rss_mb"],
        "rss_exit_mb": C.peak_rss_mb(), "params": sum(p.numel() for p in model.parameters()),
        "load": C.window_load(recs[0]["cpu"], recs[-1]["cpu"]) if len(recs) > 1 else {},
        "total_s": time.perf_counter() - t0, "labels_match": labels_match,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", "") + (" + bf16 autocast" if args.bf16 else ""),
        "settings": {k: v for k, v in settings.items()},
        "keep_freed_memory": bool(spec.get("keep_freed_memory")),
        "resolved": {k: str(getattr(args, k)) for k in ("bf16", "gradient_checkpointing", "optim", "padding_free",
                                                         "dataloader_num_workers", "torch_compile")},
    }
    out.update(C.window_throughput(out["step_ends"], tokens, [r["cpu"] for r in recs]))
    shutil.rmtree(spec["out_dir"], ignore_errors=True)
    return out


def _labels_match(prepared, rows, order, model_dir) -> str:
    """Do TRL's prepared input_ids/labels equal posttrain's tokenisation, example by example?"""
    from posttrain.data.tokenize import tokenize_conversation
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    bad = 0
    for k, i in enumerate(order):
        ex = tokenize_conversation(tok, rows[i]["messages"])
        got = prepared[k]
        if list(got["input_ids"]) != ex.input_ids or list(got["labels"]) != ex.labels:
            bad += 1
    return "all" if bad == 0 else f"{len(order) - bad}/{len(order)}"


# --------------------------------------------------------------------------- parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of the posttrain and trl_fast runs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--trl-default-steps", type=int, default=2, help="steps of the (slow) TRL-defaults run")
    p.add_argument("--skip-trl-default", action="store_true", help="leave out the TRL-defaults run")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, short matmul probe")
    p.add_argument("--wait-quiet", type=float, default=300, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the CPU idle")
    p.add_argument("--trl-fast-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra SFTConfig setting for the trl_fast run (JSON value), e.g. padding_free=true")
    p.add_argument("--trl-fast-default-malloc", action="store_true",
                   help="run trl_fast with glibc's default malloc settings instead of the ones posttrain "
                        "applies to itself (posttrain.allocator)")
    p.add_argument("--posttrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra posttrain config override for the posttrain run, e.g. batching=flatten")
    p.add_argument("--only", choices=["posttrain", "trl_fast", "trl_default"], action="append",
                   help="run only these (repeatable)")
    p.add_argument("--json", default=str(C.RESULTS / "sft_vs_trl.json"), help="where to write the summary")
    a = p.parse_args(argv)
    if a.quick:
        a.steps = min(a.steps, 4)
    return a


def _kv(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def compute_dtype(a):
    """The dtype posttrain's matmuls run in here (bf16 under mixed precision): the reference
    matmul is timed in it, so that the FLOP share compares like with like."""
    from posttrain.models import pick_precision

    return pick_precision(_kv(a.posttrain_set).get("model.dtype", "auto"), "cpu").compute


def measure_matmul(a) -> dict:
    return C.matmul_gflops(reps=8, quiet_trials=2 if a.quick else 4, max_s=60 if a.quick else 180,
                           dtype=compute_dtype(a))


def main(argv=None) -> int:
    a = parse_args(argv)
    from posttrain.models import embedded_model_dir, load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-"))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"== posttrain SFT vs TRL SFTTrainer  ({started}, load average {C.loadavg()})", flush=True)
    mach = C.machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, torch threads {mach['torch_threads']}; "
          + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()), flush=True)
    mm_before = measure_matmul(a)
    mm_name = str(compute_dtype(a)).replace("torch.", "")
    print(f"{mm_name} 2048x2048 matmul: {mm_before['gflops']:.1f} GFLOP/s (best of {mm_before['trials']} trials; "
          f"{'quiet' if mm_before['quiet'] else 'LOADED: no trial ran on an idle CPU'})", flush=True)

    model_dir = str(embedded_model_dir())
    n = a.steps * a.batch_size
    train_file = C.write_jsonl(C.sft_rows(n), work / "train.jsonl")
    batches, lengths, targets = C.posttrain_batches(model_dir, str(train_file), a.steps, a.batch_size, a.max_length,
                                                    a.lr)
    if max(lengths) > a.max_length:
        raise SystemExit(f"an example has {max(lengths)} tokens > --max-length {a.max_length}")
    order = [i for b in batches for i in b]
    template_file = work / "chatml_generation.jinja"
    template_file.write_text(marked_template(load_tokenizer(model_dir).chat_template))
    pad_grouped = C.padding_share(batches, lengths)
    import random

    rnd = list(range(n))
    random.Random(0).shuffle(rnd)
    pad_random = C.padding_share([rnd[i: i + a.batch_size] for i in range(0, n, a.batch_size)], lengths)
    print(f"data: {n} examples, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / n:.0f}); batches of "
          f"{a.batch_size}, padding {pad_grouped:.1%} of processed tokens in posttrain's length-grouped batches "
          f"(a random sampler would pad {pad_random:.1%})", flush=True)

    base = {"model_dir": model_dir, "train_file": str(train_file), "batch_size": a.batch_size,
            "max_length": a.max_length, "lr": a.lr}
    trl_default_steps = min(a.trl_default_steps, a.steps)
    plan = [
        ("posttrain", run_posttrain, {**base, "steps": a.steps, "extra": a.posttrain_set}),
        ("trl_fast", run_trl, {**base, "steps": a.steps, "order": order, "template_file": str(template_file),
                               "settings": {**TRL_FAST, **_kv(a.trl_fast_set)},
                               "keep_freed_memory": not a.trl_fast_default_malloc}),
    ]
    if not a.skip_trl_default:
        plan.append(("trl_default", run_trl, {**base, "steps": trl_default_steps,
                                              "order": order[: trl_default_steps * a.batch_size],
                                              "template_file": str(template_file), "settings": dict(TRL_DEFAULT)}))
    if a.only:
        plan = [p for p in plan if p[0] in a.only]

    results: dict[str, dict] = {}
    for name, fn, spec in plan:
        r = results[name] = C.run_one(name, fn, spec, work, a.wait_quiet)
        if "error" in r:
            continue
        print(f"{name}: {r['tokens_per_s']:,.0f} tok/s over steps 2-{r['steps']} ({r['window_tokens']:,} tokens in "
              f"{r['window_s']:.1f} s); {C.fmt(r.get('quiet_tokens_per_s'))} tok/s over its {r.get('quiet_steps', 0)} "
              f"quiet steps; final loss {r['losses'][-1]:.4f}; peak RSS {r['rss_train_mb']:,.0f} MB (train) / "
              f"{r['rss_exit_mb']:,.0f} MB (exit); load in window {r['load']}; wall {r['wall_s']:.0f} s", flush=True)
        for st in r.get("per_step", []):
            print(f"   step {st['step']:>3}: {st['s']:6.2f} s  {st['tokens']:>5} tokens  "
                  f"{st['tokens'] / st['s']:7.1f} tok/s  other processes {st['other_cores_busy']} cores", flush=True)

    mm_after = measure_matmul(a)
    quiet_mm = [m["gflops"] for m in (mm_before, mm_after) if m["quiet"]]
    peak = max(quiet_mm or [mm_before["gflops"], mm_after["gflops"]])
    print(f"\n{mm_name} 2048x2048 matmul after the runs: {mm_after['gflops']:.1f} GFLOP/s "
          f"({'quiet' if mm_after['quiet'] else 'LOADED'}; reference: {peak:.1f})", flush=True)
    work_done = {"batches": batches, "lengths": lengths, "targets": targets, "head": C.head_parameters(model_dir)}
    summary = summarize(a, results, peak, mm_before, mm_after, pad_grouped, pad_random, mach, started, n, lengths,
                        work_done)
    print_table(summary)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nsummary written to {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all("error" not in r for r in results.values()) else 1


def executed_share(name: str, r: dict, a, work_done: dict | None, steps: list[int]) -> float | None:
    """Executed matmul FLOPs over the rate's steps as a share of 6 x params x their real tokens.

    posttrain takes the LM head only at trained positions and its body over the batch as
    collated (right-padded unless ``batching=flatten``); TRL's SFTTrainer (1.16, on a CPU) takes
    the head at every position it runs, padding included unless ``padding_free``.
    """
    if not work_done or not r.get("params") or name not in ("posttrain", "trl_fast", "trl_default"):
        return None
    if name == "posttrain":
        padded, at_targets = _kv(a.posttrain_set).get("batching", "pad") != "flatten", True
    else:
        padded, at_targets = not (r.get("settings") or {}).get("padding_free"), False
    b, lengths, targets = work_done["batches"], work_done["lengths"], work_done["targets"]
    done = sum(C.executed_flops(b[k - 1], lengths, targets, r["params"], work_done["head"], padded, at_targets)
               for k in steps)
    model = sum(6.0 * r["params"] * sum(lengths[i] for i in b[k - 1]) for k in steps)
    return done / model


def summarize(a, results, peak, mm_before, mm_after, pad_grouped, pad_random, mach, started, n, lengths,
              work_done: dict | None = None) -> dict:
    runs = {}
    ok = {k: r for k, r in results.items() if "error" not in r}
    # posttrain and trl_fast train on the same batches: compare them over the steps quiet in both
    paired = C.paired_quiet_rates(ok["posttrain"], ok["trl_fast"]) if {"posttrain", "trl_fast"} <= ok.keys() else None
    use_paired = paired is not None and len(paired["steps"]) >= 2
    for name, r in results.items():
        if "error" in r:
            runs[name] = {"error": r["error"]}
            continue
        params = r.get("params") or results.get("posttrain", {}).get("params")
        if use_paired and name in ("posttrain", "trl_fast"):
            rate = paired["a"] if name == "posttrain" else paired["b"]
            basis = f"steps {paired['steps']} (quiet in both runs)"
            rate_steps = paired["steps"]
        else:
            rate, basis = C.pick_quiet(r, "tokens_per_s")
            per_step = r.get("per_step") or []
            rate_steps = C.quiet_steps(per_step) if basis.startswith("quiet") else [p["step"] for p in per_step]
        flops = 6 * params * rate if params else float("nan")
        factor = executed_share(name, {**r, "params": params}, a, work_done, rate_steps) if rate_steps else None
        runs[name] = {
            "steps": r["steps"], "tokens_per_s": round(rate, 1), "rate_basis": basis,
            "tokens_per_s_all_steps": round(r["tokens_per_s"], 1),
            "tokens_per_s_own_quiet_steps": round(r.get("quiet_tokens_per_s", float("nan")), 1),
            "quiet_steps": r.get("quiet_steps"),
            "window_s": round(r["window_s"], 2), "window_tokens": r["window_tokens"],
            "step_tokens": r["step_tokens"], "per_step": r.get("per_step"),
            "final_loss": r["losses"][-1] if r["losses"] else None, "losses": r["losses"],
            "rss_train_mb": round(r["rss_train_mb"], 1), "rss_exit_mb": round(r["rss_exit_mb"], 1),
            "params": params, "achieved_gflops": round(flops / 1e9, 1), "flop_share": round(flops / 1e9 / peak, 3),
            "executed_flops_per_model_flop": round(factor, 4) if factor else None,
            "executed_flop_share": round(factor * flops / 1e9 / peak, 3) if factor else None,
            "dtype": r.get("dtype"), "settings": r.get("settings"), "resolved": r.get("resolved"),
            "labels_match": r.get("labels_match"), "load_in_window": r.get("load"),
            "waited_for_quiet": r.get("waited_for_quiet"), "loadavg_after": r.get("loadavg_after"),
            "wall_s": round(r["wall_s"], 1),
        }
    pt, fast = runs.get("posttrain", {}), runs.get("trl_fast", {})
    targets = {}
    if "tokens_per_s" in pt and "tokens_per_s" in fast:
        ratio = pt["tokens_per_s"] / fast["tokens_per_s"]
        loss_gap = abs(pt["final_loss"] - fast["final_loss"]) / fast["final_loss"]
        targets = {
            "speedup_vs_trl_fast": {"value": round(ratio, 3), "target": ">= 1.5", "pass": ratio >= 1.5,
                                    "basis": pt["rate_basis"]},
            "rss_vs_trl_fast": {"value": f"{pt['rss_train_mb']:.0f} vs {fast['rss_train_mb']:.0f} MB",
                                "target": "<=", "pass": pt["rss_train_mb"] <= fast["rss_train_mb"]},
            "final_loss_gap": {"value": round(loss_gap, 4), "target": "<= 0.02", "pass": loss_gap <= 0.02},
            "same_tokens": {"value": pt["step_tokens"] == fast["step_tokens"], "target": "True",
                            "pass": pt["step_tokens"] == fast["step_tokens"]},
        }
    if "flop_share" in pt:
        targets["posttrain_flop_share"] = {"value": pt["flop_share"], "target": ">= 0.75",
                                           "pass": pt["flop_share"] >= 0.75}
    if pt.get("executed_flop_share") is not None:
        targets["posttrain_executed_flop_share"] = {"value": pt["executed_flop_share"], "target": ">= 0.75",
                                                    "pass": pt["executed_flop_share"] >= 0.75}
    if "tokens_per_s" in pt and "tokens_per_s" in runs.get("trl_default", {}):
        targets["speedup_vs_trl_default"] = {
            "value": round(pt["tokens_per_s"] / runs["trl_default"]["tokens_per_s"], 2), "target": "info",
            "pass": None}
    return {
        "benchmark": "posttrain SFT vs TRL SFTTrainer", "started": started, "machine": mach,
        "config": {"steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length, "lr": a.lr,
                   "trl_default_steps": a.trl_default_steps, "examples": n, "quick": a.quick,
                   "example_tokens": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / n, 1)},
                   "padding_share_grouped": round(pad_grouped, 4), "padding_share_random": round(pad_random, 4),
                   "trl_fast_settings": C.resolve_trl_settings({**TRL_FAST, **_kv(a.trl_fast_set)}),
                   "posttrain_overrides": a.posttrain_set},
        "matmul_gflops": {"before": mm_before, "after": mm_after, "reference": round(peak, 1),
                          "dtype": str(compute_dtype(a)).replace("torch.", "")},
        "paired_quiet_steps": paired, "runs": runs, "targets": targets,
    }


def print_table(s: dict) -> None:
    runs = s["runs"]
    print("\n" + "=" * 110)
    print(f"{'run':<12} {'steps':>5} {'tok/s':>8} {'vs posttrain':>12} {'GFLOP/s':>8} {'of matmul':>9} "
          f"{'RSS train':>10} {'RSS exit':>9} {'final loss':>10}  dtype; tok/s basis")
    pt = runs.get("posttrain", {}).get("tokens_per_s")
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:<12} FAILED: {r['error']}")
            continue
        rel = f"{r['tokens_per_s'] / pt:.2f}x" if pt else "-"
        print(f"{name:<12} {r['steps']:>5} {r['tokens_per_s']:>8,.1f} {rel:>12} {r['achieved_gflops']:>8.1f} "
              f"{r['flop_share']:>9.0%} {r['rss_train_mb']:>8,.0f}MB {r['rss_exit_mb']:>7,.0f}MB "
              f"{C.fmt(r['final_loss'], '.4f'):>10}  {r['dtype']}; {r['rate_basis']}")
    mm = s["matmul_gflops"]
    params = next((r["params"] for r in runs.values() if r.get("params")), "?")
    print(f"{mm.get('dtype', 'float32')} matmul reference: {mm['reference']} GFLOP/s (before {mm['before']['gflops']:.1f}, "
          f"after {mm['after']['gflops']:.1f}); GFLOP/s = 6 x {params} "
          "params x tok/s")
    for name, r in runs.items():
        if r.get("executed_flop_share") is not None:
            print(f"{name}: executes {r['executed_flops_per_model_flop']:.3f} x the 6PT FLOPs (padding, and the LM "
                  f"head where it runs), so {r['executed_flop_share']:.1%} of the matmul by executed FLOPs")
    for name, t in s["targets"].items():
        verdict = "info" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print(f"  {verdict:<5} {name}: {t['value']} (target {t['target']})")
    for name, r in runs.items():
        if "load_in_window" in r:
            print(f"  load during {name}: {r['load_in_window']}, loadavg after {r['loadavg_after']}")
    if any(r.get("labels_match") not in (None, "all") for r in runs.values()):
        print("  WARNING: TRL's labels differ from posttrain's for some examples (see labels_match)")
    print("=" * 110)


if __name__ == "__main__":
    raise SystemExit(main())
