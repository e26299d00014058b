"""The main job (``make demo`` / ``posttrain demo``), first version.

SFT-trains the embedded SmolLM2-135M-Instruct on the built-in reasoning-format dataset
(column-by-column addition and subtraction, worked solutions generated and verified by
:mod:`posttrain.synth.tasks`), and answers the same held-out questions (a disjoint test
split) greedily before and after, printing both and the accuracy and format-compliance
of each. Full run: a few minutes on a 2-core CPU; ``--quick``: about one minute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.config import load_config
from posttrain.log import console, log
from posttrain.models import EMBEDDED_NAME, load_model
from posttrain.rollout import SamplingConfig, generate
from posttrain.synth.tasks import arithmetic_problems, extract_answer, verify_arithmetic


def _answer(model, tok, problems, max_new_tokens: int) -> list[str]:
    convs = [[{"role": "user", "content": p.question}] for p in problems]
    return generate(model, tok, convs, SamplingConfig(max_new_tokens=max_new_tokens, batch_size=16))


def _score(problems, responses) -> tuple[float, float]:
    correct = sum(verify_arithmetic(r, p.answer) for p, r in zip(problems, responses))
    formatted = sum(("<think>" in r and "</think>" in r and extract_answer(r) is not None) for r in responses)
    return correct / len(problems), formatted / len(problems)


def run_demo(output_dir: str = "runs/demo", quick: bool = False, model: str = EMBEDDED_NAME) -> dict:
    from posttrain.stages.sft import SFTConfig, train

    t0 = time.time()
    out = Path(output_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    n_train, n_test, steps = (64, 6, 6) if quick else (320, 16, 36)
    train_rows = [p.as_sft_row() for p in arithmetic_problems(n_train, "train", seed=0)]
    test = arithmetic_problems(n_test, "test", seed=0)
    train_file = out / "data" / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    max_new = 160

    log(f"demo: {len(train_rows)} worked arithmetic solutions for SFT, {len(test)} held-out questions")
    base, tok = load_model(model, with_tokenizer=True)
    log("answering the held-out questions with the starting model ...")
    before = _answer(base, tok, test, max_new)
    del base

    cfg = load_config(SFTConfig, None, [
        f"model.name_or_path={model}", f"data.train={train_file}", "data.eval_fraction=0.05",
        "data.max_length=384", f"output_dir={out / 'sft'}", f"max_steps={steps}", "batch_size=8", "lr=1e-4",
        "warmup_ratio=0.1", "schedule=cosine", "tensorboard=false",
    ])
    result = train(cfg)
    tuned = load_model(result.model_dir)
    log("answering the held-out questions with the fine-tuned model ...")
    after = _answer(tuned, tok, test, max_new)

    acc_b, fmt_b = _score(test, before)
    acc_a, fmt_a = _score(test, after)
    samples = [{"question": p.question, "answer": p.answer, "before": b, "after": a,
                "before_correct": verify_arithmetic(b, p.answer), "after_correct": verify_arithmetic(a, p.answer)}
               for p, b, a in zip(test, before, after)]
    (result.run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    from posttrain.report import write_report

    report = write_report(result.run_dir)
    _print_comparison(samples[:4], acc_b, fmt_b, acc_a, fmt_a)
    summary = {"accuracy_before": acc_b, "accuracy_after": acc_a, "format_before": fmt_b, "format_after": fmt_a,
               "eval_loss": result.eval_loss, "steps": result.steps, "seconds": round(time.time() - t0, 1),
               "report": str(report)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"demo finished in {summary['seconds']:.0f} s; report: {report}")
    return summary


def _print_comparison(samples, acc_b, fmt_b, acc_a, fmt_a) -> None:
    from rich.table import Table

    for s in samples:
        console.rule(f"{s['question']}  (answer {s['answer']})")
        console.print("[bold]before[/bold] " + ("✓" if s["before_correct"] else "✗"), highlight=False)
        console.print(s["before"].strip() or "(empty)", markup=False, highlight=False)
        console.print("[bold]after[/bold] " + ("✓" if s["after_correct"] else "✗"), highlight=False)
        console.print(s["after"].strip() or "(empty)", markup=False, highlight=False)
    table = Table(title="held-out questions (greedy)")
    for col in ("model", "accuracy", "format compliance"):
        table.add_column(col)
    table.add_row("before (embedded SmolLM2-135M-Instruct)", f"{acc_b:.0%}", f"{fmt_b:.0%}")
    table.add_row("after SFT", f"{acc_a:.0%}", f"{fmt_a:.0%}")
    console.print(table)
