"""``posttrain`` command line: a thin layer that maps arguments onto configs and calls stages.

Commands::

    posttrain sft --config recipes/sft.yaml [key=value ...]   supervised fine-tuning
    posttrain rm  --config recipes/rm.yaml  [key=value ...]   outcome reward model
    posttrain prm --config recipes/prm.yaml [key=value ...]   process reward model
    posttrain dpo --config recipes/dpo.yaml [key=value ...]   DPO / IPO / hinge / cDPO
    posttrain grpo|rloo|ppo --config recipes/grpo.yaml [...]   online RL on prompts with reward functions
    posttrain data inspect FILE [--model M] [--kind sft|preference|prompts]
    posttrain chat MODEL                                       interactive, streaming, multi-turn
    posttrain generate MODEL --prompts FILE [--out FILE]
    posttrain run recipes/reasoning.yaml [--quick]             a recipe of stages (resumable)
    posttrain cai generate MODEL --prompts F --out-dir D       Constitutional AI critique -> revision
    posttrain judge --data F --out F [--judge M]               AI feedback (soft-labelled pairs)
    posttrain demo [--quick]                                   the main job
    posttrain synth arithmetic --n N --kind sft|prompts|preference|steps --out FILE
    posttrain eval MODEL --data FILE [--out DIR] [-k K]         held-out accuracy per task
    posttrain report RUN_DIR                                   plots + HTML of a run
    posttrain runs [ROOT]                                      runs with status: finished, running, stopped
    posttrain config sft                                       every config key with its doc
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

from posttrain.config import ConfigError, describe, load_config
from posttrain.log import console, die, log

# command -> (module, config class, help). Each module has ``train(cfg)`` returning a result with ``run_dir``.
STAGES = {
    "sft": ("posttrain.stages.sft", "SFTConfig", "supervised fine-tuning"),
    "rm": ("posttrain.stages.reward", "RewardConfig", "outcome reward model (Bradley-Terry on preference pairs)"),
    "prm": ("posttrain.stages.prm", "PRMConfig", "process reward model (one score per reasoning step)"),
    "dpo": ("posttrain.stages.dpo", "DPOConfig", "direct preference optimisation (DPO, IPO, hinge, cDPO)"),
    "grpo": ("posttrain.stages.online_rl", "GRPOConfig", "online RL with group-normalised advantages (GRPO)"),
    "rloo": ("posttrain.stages.online_rl", "RLOOConfig", "online RL with a leave-one-out baseline (RLOO)"),
    "ppo": ("posttrain.stages.online_rl", "PPOConfig", "online RL with a critic, GAE and a KL-penalised reward (PPO)"),
}


def _stage_config_cls(name: str):
    import importlib

    module, cls, _ = STAGES[name]
    return getattr(importlib.import_module(module), cls)


def _config_help(cls) -> str:
    lines = ["config keys (set in the YAML file or as key=value; sections with dots):"]
    for key, tp, default, help_ in describe(cls):
        lines.append(f"  {key} ({tp}, default {default})\n      {help_}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training stages


def cmd_stage(args) -> int:
    """``posttrain <stage> --config FILE key=value ...``: load the stage's config and train."""
    import importlib

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=true")
    cfg = load_config(_stage_config_cls(args.command), args.config, overrides)
    result = importlib.import_module(STAGES[args.command][0]).train(cfg)
    from posttrain.engine import is_main_process
    from posttrain.report import write_report

    if is_main_process():  # (under torchrun every rank gets here: one writes)
        log(f"report: {write_report(result.run_dir)}")
    return 0


# --------------------------------------------------------------------------- data inspect


def _mark_trained(tok, ids: list[int], labels: list[int]) -> str:
    """Decoded tokens with the trained spans wrapped in ⟦ ⟧."""
    from posttrain.data.tokenize import IGNORE

    out, inside, run = [], False, []

    def flush():
        if run:
            text = tok.decode(run)
            out.append(f"⟦{text}⟧" if inside else text)

    for t, lab in zip(ids, labels):
        trained = lab != IGNORE
        if trained != inside:
            flush()
            run, inside = [], trained
        run.append(t)
    flush()
    return "".join(out)


def _say_format(path: Path, detect) -> None:
    """Print the row format training will read ``path`` as: that of the first row it recognises."""
    from posttrain.data.loading import BadRowError, BadRows, iter_rows

    for row in iter_rows(path, BadRows(skip=True)):
        try:
            fmt = detect(row.data, row.origin)
        except BadRowError:
            continue
        console.print(f"format: [bold]{fmt}[/bold] (recognised from the keys of {row.origin}: {sorted(row.data)})")
        return


def _inspect_preference(args, tok, path: Path, bad) -> list[int]:
    """Print recognised preference pairs with the trained (completion) tokens marked."""
    from posttrain.data.loading import BadRowError
    from posttrain.data.preference import detect_preference_format, read_preference_records, tokenize_pair
    from posttrain.data.tokenize import TokenizeStats

    if args.format == "auto":
        _say_format(path, detect_preference_format)
    records = read_preference_records(str(path), args.format, bad)  # (as training reads it)
    stats, pairs = TokenizeStats(), []
    for rec in records:
        try:
            pair = tokenize_pair(tok, rec, args.max_length, "error", stats)
        except BadRowError as e:
            bad.handle(e)
            continue
        if pair is not None:
            pairs.append(pair)
    console.print(f"{len(pairs)} comparisons; trained (completion) tokens are shown inside ⟦ ⟧")
    for p in pairs[: args.n]:
        console.rule(f"[dim]{p.origin}: weight {p.weight:.3g}, margin {p.margin:g}, label {p.label:g}[/dim]")
        console.print("[bold]chosen[/bold]")
        console.print(_mark_trained(tok, p.chosen.input_ids, p.chosen.labels), markup=False, highlight=False)
        console.print("[bold]rejected[/bold]")
        console.print(_mark_trained(tok, p.rejected.input_ids, p.rejected.labels), markup=False, highlight=False)
    return [len(e.input_ids) for p in pairs for e in (p.chosen, p.rejected)]


def cmd_data_inspect(args) -> int:
    from posttrain.data.dataset import DataSource, read_sft_records
    from posttrain.data.formats import SFT_FORMATS, detect_sft_format, to_prompt_record
    from posttrain.data.loading import BadRowError, BadRows, iter_rows
    from posttrain.data.preference import PREFERENCE_FORMATS
    from posttrain.data.tokenize import TokenizeStats, tokenize_record
    from posttrain.models import load_tokenizer, resolve_model_path

    formats = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS}.get(args.kind, ())
    if args.format != "auto" and args.format not in formats:
        raise ConfigError(f"--format: {args.format!r} is not a {args.kind} format (auto, {', '.join(formats)})")
    path = Path(args.file)
    bad = BadRows(skip=True)
    tok = load_tokenizer(resolve_model_path(args.model))
    console.rule(f"{path}")
    if args.kind == "preference":
        lengths = _inspect_preference(args, tok, path, bad)
    elif args.kind == "prompts":
        records = []
        for row in iter_rows(path, bad):
            try:
                records.append(to_prompt_record(row))
            except BadRowError as e:
                bad.handle(e)
        console.print(f"{len(records)} prompt rows")
        from posttrain.rollout import render_prompts

        texts = render_prompts(tok, [r.messages for r in records])
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        for r, text in list(zip(records, texts))[: args.n]:
            console.print(f"[dim]{r.origin}[/dim]")
            console.print(text, markup=False, highlight=False)
    else:
        if args.format == "auto":
            _say_format(path, detect_sft_format)
        records = read_sft_records(DataSource(path=str(path), format=args.format), bad)  # (as training reads it)
        stats = TokenizeStats()
        examples = []
        for rec in records:
            try:
                examples.extend(tokenize_record(tok, rec, args.max_length, "error", stats))
            except BadRowError as e:
                bad.handle(e)
        console.print(f"{len(records)} rows read, {len(examples)} tokenised examples; trained tokens are "
                      "shown inside ⟦ ⟧")
        for ex in examples[: args.n]:
            console.rule(f"[dim]{ex.origin}: {len(ex.input_ids)} tokens, {ex.num_trained} trained[/dim]")
            console.print(_mark_trained(tok, ex.input_ids, ex.labels), markup=False, highlight=False)
        lengths = [len(e.input_ids) for e in examples]
        trained = [e.num_trained for e in examples]
        if trained:
            console.print(f"trained tokens per example: mean {statistics.mean(trained):.1f}, total {sum(trained)}")
    if lengths:
        q = statistics.quantiles(lengths, n=20, method="inclusive") if len(lengths) > 1 else [lengths[0]] * 19
        console.print(f"token lengths: n={len(lengths)} min={min(lengths)} mean={statistics.mean(lengths):.1f} "
                      f"median={statistics.median(lengths):.0f} p95={q[18]:.0f} max={max(lengths)}")
    if bad.total:
        console.print(f"[bold red]{bad.total} bad rows:[/bold red]")
        for e in bad.errors:
            console.print(f"  {e}", markup=False, highlight=False)
        return 1
    console.print("no bad rows")
    return 0


# --------------------------------------------------------------------------- generation


def cmd_generate(args) -> int:
    from posttrain.data.dataset import no_usable_rows
    from posttrain.data.formats import to_prompt_record
    from posttrain.data.loading import BadRowError, BadRows, iter_rows
    from posttrain.models import load_model
    from posttrain.rollout import SamplingConfig, generate

    bad = BadRows(skip=args.skip_bad_rows)
    records = []
    for row in iter_rows(args.prompts, bad):
        try:
            records.append(to_prompt_record(row))
        except BadRowError as e:
            bad.handle(e)
    if not records:
        raise no_usable_rows(args.prompts, bad)
    if args.out:  # before the model runs: a wrong folder said at once, not after the generation
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, with_tokenizer=True, inference=True)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         batch_size=args.batch_size, seed=args.seed)
    completions = generate(model, tok, [r.messages for r in records], cfg)
    # the row's other columns kept, a reference 'completion' of the prompts file under 'reference'
    lines = []
    for r, c in zip(records, completions):
        fields = dict(r.fields)
        if "completion" in fields:
            fields.setdefault("reference", fields.pop("completion"))
        lines.append(json.dumps({**fields, "prompt": r.messages, "completion": c}) + "\n")
    if args.out:
        Path(args.out).write_text("".join(lines))
        log(f"wrote {len(completions)} completions to {args.out}")
    else:
        sys.stdout.writelines(lines)
    if bad.total:
        log(bad.summary())
    return 0


def cmd_chat(args) -> int:
    from transformers import TextStreamer

    from posttrain.models import load_model
    from posttrain.rollout import SamplingConfig, generate

    model, tok = load_model(args.model, with_tokenizer=True, inference=True)
    history = [{"role": "system", "content": args.system}] if args.system else []
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_size=1)
    console.print("chat with the model; /reset clears the conversation, /exit (or Ctrl-D) quits", style="dim")
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            user = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        print("assistant> ", end="", flush=True)
        reply = generate(model, tok, [history], cfg, streamer=streamer)[0]
        history.append({"role": "assistant", "content": reply})


# --------------------------------------------------------------------------- misc


def cmd_cai(args) -> int:
    from posttrain.models import load_model
    from posttrain.synth.constitutional import (
        CAIConfig,
        critique_and_revise_to,
        load_constitution,
        load_prompt_rows,
    )

    model, tok = load_model(args.model, with_tokenizer=True, inference=True)
    rows = [r for f in args.prompts for r in load_prompt_rows(f)]
    prompts, kinds = [p for p, _ in rows], [k for _, k in rows]
    sft, pairs, n = critique_and_revise_to(args.out_dir, model, tok, prompts, load_constitution(args.constitution),
                                           CAIConfig(revisions=args.revisions, max_new_tokens=args.max_new_tokens,
                                                     temperature=args.temperature, seed=args.seed,
                                                     few_shot=args.few_shot, keep_unfinished=args.keep_unfinished),
                                           kinds=kinds)
    log(f"wrote {sft} ({n['sft']} rows) and {pairs} ({n['pairs']} pairs)")
    return 0


def cmd_judge(args) -> int:
    from posttrain.data.dataset import no_usable_rows
    from posttrain.data.loading import BadRowError, BadRows, iter_rows
    from posttrain.models import load_model
    from posttrain.synth.judge import judge_pairs, judged_preference_rows
    from posttrain.synth.rejection import write_rows

    bad = BadRows(skip=args.skip_bad_rows)
    prompts, first, second = [], [], []
    for row in iter_rows(args.data, bad):
        d = row.data
        many = d.get("responses") if isinstance(d.get("responses"), list) else [d.get("response_a"), d.get("response_b")]
        try:
            if not isinstance(d.get("prompt"), str) or not d["prompt"].strip():
                raise BadRowError(row.origin, "prompt", "missing field or not a string")
            if len(many) < 2 or not all(isinstance(x, str) and x.strip() for x in many):
                raise BadRowError(row.origin, "responses", "expected two or more non-empty responses (responses: "
                                  "[a, b, ...], or response_a and response_b)")
        except BadRowError as e:
            bad.handle(e)
            continue
        for i, j in itertools.combinations(range(len(many)), 2):  # every pair, each judged in both orders
            prompts.append(d["prompt"])
            first.append(many[i])
            second.append(many[j])
    if not prompts:
        raise no_usable_rows(args.data, bad)
    judge, tok = load_model(args.judge, with_tokenizer=True, inference=True)
    js = judge_pairs(judge, tok, prompts, first, second, question=args.question)
    rows = judged_preference_rows(prompts, first, second, js, args.min_confidence, soft_labels=not args.hard_labels)
    write_rows(args.out, rows)
    log(f"judged {len(js)} pairs in both orders; wrote {len(rows)} {'hard' if args.hard_labels else 'soft'}-labelled preference rows to {args.out}"
        + (f"; {bad.summary()}" if bad.total else ""))
    return 0


def cmd_run(args) -> int:
    from posttrain.pipeline import load_recipe, run_recipe

    run_recipe(load_recipe(args.recipe, quick=args.quick, overrides=args.overrides))
    return 0


def cmd_demo(args) -> int:
    from posttrain.demo import run_demo

    run_demo(args.output_dir, quick=args.quick)
    return 0


def cmd_synth(args) -> int:
    import random

    from posttrain.synth.tasks import arithmetic_problems, preference_row, step_row

    lo, _, hi = args.digits.partition("-")
    if not (lo.isdigit() and (hi or lo).isdigit() and 0 < int(lo) <= int(hi or lo)):
        raise ConfigError(f"--digits: {args.digits!r} is not N or MIN-MAX with 0 < MIN <= MAX")
    if not args.ops or set(args.ops) - set("+-"):
        raise ConfigError(f"--ops: {args.ops!r} is not +, - or +-")
    problems = arithmetic_problems(args.n, args.split, seed=args.seed, digits=(int(lo), int(hi or lo)), ops=args.ops)
    rng = random.Random(args.seed)
    make = {"sft": lambda p, i: p.as_sft_row(), "prompts": lambda p, i: p.as_prompt_row(),
            "preference": lambda p, i: preference_row(p, rng), "steps": lambda p, i: step_row(p, rng, i % 2 == 1)}
    rows = [make[args.kind](p, i) for i, p in enumerate(problems)]
    if args.instruction and args.kind == "prompts":
        for r in rows:
            r["prompt"] = f"{r['prompt']} {args.instruction}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    log(f"wrote {len(rows)} {args.split} {args.kind} rows to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from posttrain.evaluate import run_eval

    run_eval(args.model, args.data, args.out, limit=args.limit, max_new_tokens=args.max_new_tokens,
             batch_size=args.batch_size, k=args.k, temperature=args.temperature, seed=args.seed,
             answer_format=args.answer_format, dtype=args.dtype)
    return 0


def cmd_runs(args) -> int:
    from posttrain.runs import find_runs, print_runs

    rows = find_runs(args.roots)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_runs(rows)
    return 0


def cmd_report(args) -> int:
    from posttrain.report import write_report

    print(write_report(args.run_dir))
    return 0


def config_reference() -> str:
    """Markdown reference of every config key: shared keys once, then each stage's own."""
    from posttrain.config import markdown_table
    from posttrain.engine import TrainConfig

    shared = {r[0]: r for r in describe(TrainConfig)}
    parts = ["### Keys every training stage shares", "",
             markdown_table([r for r in describe(TrainConfig)]), ""]
    for name, (_, _, help_) in STAGES.items():
        cls = _stage_config_cls(name)
        own = [r for r in describe(cls) if shared.get(r[0]) != r]
        parts += [f"### `posttrain {name}` ({help_}): its own keys and changed defaults", "",
                  markdown_table(own) if own else "(none)", ""]
    return "\n".join(parts)


def cmd_config(args) -> int:
    if args.stage == "all":
        print(config_reference())
        return 0
    print(_config_help(_stage_config_cls(args.stage)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from posttrain.models import EMBEDDED_NAME

    p = argparse.ArgumentParser(prog="posttrain", description="Post-train a causal LM into an assistant.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, (_, _, help_) in STAGES.items():
        s = sub.add_parser(name, help=help_, epilog=_config_help(_stage_config_cls(name)),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--config", help=f"YAML file of config keys, or a bundled recipe by name (e.g. {name}: "
                       f"recipes/{name}.yaml)")
        s.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4 model.lora=true")
        s.set_defaults(func=cmd_stage)

    d = sub.add_parser("data", help="inspect data files")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    di = dsub.add_parser("inspect", help="how rows are recognised and tokenised; lists every bad row")
    di.add_argument("file")
    di.add_argument("--model", default=EMBEDDED_NAME, help="model whose tokenizer and chat template to use")
    di.add_argument("--kind", default="sft", choices=["sft", "preference", "prompts"])
    di.add_argument("--format", default="auto", help="row format (default: recognised from the first row)")
    di.add_argument("--max-length", type=int, default=1024, help="rows longer than this are reported as bad")
    di.add_argument("-n", type=int, default=3, help="examples to print")
    di.set_defaults(func=cmd_data_inspect)

    c = sub.add_parser("chat", help="interactive multi-turn chat with a model (streaming)")
    c.add_argument("model", nargs="?", default=EMBEDDED_NAME)
    c.add_argument("--system", default="", help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.0)
    c.set_defaults(func=cmd_chat)

    g = sub.add_parser("generate", help="complete every prompt of a file")
    g.add_argument("model", nargs="?", default=EMBEDDED_NAME)
    g.add_argument("--prompts", required=True, help="file of prompt rows (prompt or messages)")
    g.add_argument("--out", help="output JSONL (default: stdout)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--skip-bad-rows", action="store_true")
    g.set_defaults(func=cmd_generate)

    ca = sub.add_parser("cai", help="Constitutional AI data: response -> critique -> revision")
    casub = ca.add_subparsers(dest="cai_command", required=True, metavar="ACTION")
    cg = casub.add_parser("generate", help="critique and revise responses to prompts; SFT rows + preference pairs")
    cg.add_argument("model", nargs="?", default=EMBEDDED_NAME)
    cg.add_argument("--prompts", nargs="+", required=True, help="prompt files, one prompt a row (the recipe constitutional reads "
                    "the red-team and helpfulness prompts bundled in posttrain/assets/)")
    cg.add_argument("--constitution", help="YAML list of {name, critique, revision} (default: the bundled seven)")
    cg.add_argument("--revisions", type=int, default=1)
    cg.add_argument("--max-new-tokens", type=int, default=160)
    cg.add_argument("--temperature", type=float, default=0.7)
    cg.add_argument("--seed", type=int, default=0)
    cg.add_argument("--few-shot", type=int, default=2, help="worked critique/revision examples shown first (0: none)")
    cg.add_argument("--keep-unfinished", action="store_true",
                    help="keep revisions cut off at --max-new-tokens (by default an unfinished answer is not kept)")
    cg.add_argument("--out-dir", required=True)
    cg.set_defaults(func=cmd_cai)

    j = sub.add_parser("judge", help="AI feedback: judge response pairs by option-letter log-probs, both orders")
    j.add_argument("--data", required=True, help="rows with prompt and responses: [a, b, ...] (every pair is judged) or response_a/response_b")
    j.add_argument("--judge", default=EMBEDDED_NAME, help="judge model (any local causal LM)")
    j.add_argument("--question", default="Which of these assistant responses is more helpful, honest, and harmless?")
    j.add_argument("--min-confidence", type=float, default=0.0, help="drop pairs judged with less confidence")
    j.add_argument("--hard-labels", action="store_true", help="label 1.0 for the preferred response instead of "
                   "its probability")
    j.add_argument("--skip-bad-rows", action="store_true")
    j.add_argument("--out", required=True)
    j.set_defaults(func=cmd_judge)

    u = sub.add_parser("run", help="run a recipe: stages feeding each other in one run directory (resumable)")
    u.add_argument("recipe", help="recipe YAML, or a bundled recipe by name (e.g. reasoning: recipes/reasoning.yaml)")
    u.add_argument("--quick", action="store_true", help="apply the recipe's quick: block (a smoke run in minutes)")
    u.add_argument("overrides", nargs="*", help="model=..., output_dir=..., n_train=..., n_test=..., seed=...")
    u.set_defaults(func=cmd_run)

    m = sub.add_parser("demo", help="the main job: the reasoning recipe on the embedded model, before/after")
    m.add_argument("--quick", action="store_true", help="the recipe's quick block: minutes instead of ~30")
    m.add_argument("--output-dir", default=None, help="run directory (default: the recipe's)")
    m.set_defaults(func=cmd_demo)

    y = sub.add_parser("synth", help="generate verifiable task data with worked solutions")
    y.add_argument("task", choices=["arithmetic"])
    y.add_argument("--n", type=int, default=400, help="number of distinct questions")
    y.add_argument("--split", default="train", choices=["train", "test"], help="disjoint question splits")
    y.add_argument("--kind", default="sft", choices=["sft", "prompts", "preference", "steps"],
                   help="worked solutions (sft), prompts only, preference pairs (correct vs corrupted "
                        "solution), or step-labelled solutions for a PRM (every other one corrupted)")
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--digits", default="2-3", help="operand digits: N or MIN-MAX (default 2-3)")
    y.add_argument("--ops", default="+-", help="operations to draw from: +, - or +- (default)")
    y.add_argument("--instruction", default="", help="text appended to every prompt (--kind prompts)")
    y.add_argument("--out", required=True)
    y.set_defaults(func=cmd_synth)

    e = sub.add_parser("eval", help="held-out accuracy (greedy, pass@k), format rate and length per task")
    e.add_argument("model", nargs="?", default=EMBEDDED_NAME)
    e.add_argument("--data", required=True, help="prompt rows with 'answer' and 'task' (posttrain synth --kind prompts)")
    e.add_argument("--out", help="directory for eval.json and samples.jsonl")
    e.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("-k", type=int, default=1, help="samples per question: pass@2, 4, ... k and sample accuracy (1 = greedy only)")
    e.add_argument("--temperature", type=float, default=0.8, help="sampling temperature for pass@k")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights dtype to decode in: auto (bfloat16 where mixed precision is picked, else "
                        "float32, decoded from float16 weights packed for fbgemm on x86 CPUs), float32 "
                        "(decoded in float32 throughout) or bfloat16")
    e.add_argument("--answer-format", default="tagged", choices=["tagged", "last_number"],
                   help="tagged: the task verifier (answer inside <answer> tags); last_number: the tagged "
                        "answer or else the last number in the response (for models not trained on the format)")
    e.set_defaults(func=cmd_eval)

    rs = sub.add_parser("runs", help="list run directories with their status (finished, running, stopped)")
    rs.add_argument("roots", nargs="*", default=["runs"], help="directories holding runs (default: runs)")
    rs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rs.set_defaults(func=cmd_runs)

    r = sub.add_parser("report", help="write report.html and report.png for a run directory")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)

    k = sub.add_parser("config", help="list every config key of a stage with its documentation")
    k.add_argument("stage", choices=sorted(STAGES) + ["all"], help="a stage, or 'all' for the Markdown reference")
    k.set_defaults(func=cmd_config)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides allowed after options too (``posttrain
    run R --quick model=M``: argparse alone leaves those over)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and \
            all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from posttrain.data.loading import BadRowError
    from posttrain.data.tokenize import ChatTemplateError
    from posttrain.engine import TrainingError
    from posttrain.models import ModelLoadError, ModelNotFoundError
    from posttrain.rewards.combine import RewardError

    args = parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, BadRowError, ModelNotFoundError, ModelLoadError, ChatTemplateError, FileNotFoundError,
            RewardError, TrainingError) as e:
        die(str(e))
    except OSError as e:
        die(f"{e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
