"""``posttrain eval``: held-out accuracy of a model on verifiable questions.

Input: prompt rows with an ``answer`` and a ``task`` field (what ``posttrain synth ...
--kind prompts --split test`` writes); each task's verifier (:data:`posttrain.synth.tasks.VERIFIERS`)
checks the response. Reported per task and overall:

* ``accuracy``: greedy decoding, share of responses whose answer verifies (``tagged``: the
  task's verifier, which needs the ``<answer>`` block; ``last_number``: the tagged answer or
  else the last number, the rule of the ``exact_answer`` reward);
* ``pass@j`` (with ``k > 1``): n = k samples per question at ``temperature``, and for j = 2, 4,
  8, ... up to k (and k itself) the unbiased estimator of Chen et al. 2021
  ``1 - C(n-c, j) / C(n, j)``: how the chance that one of j samples is right grows with j (the
  room that sampling-based training such as rejection sampling or GRPO has over greedy);
  ``sample_accuracy`` is pass@1 from the same samples;
* ``format``: share of responses in the reasoning format (``<think>…</think>`` then
  ``<answer>…</answer>``);
* ``mean_tokens``: mean response length in tokens.

Writes ``eval.json`` and ``samples.jsonl`` to ``--out`` when given.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.formats import to_prompt_record
from posttrain.data.loading import BadRowError, BadRows, iter_rows
from posttrain.rollout import SamplingConfig, generate


@dataclass
class EvalItem:
    messages: list[dict[str, str]]
    answer: str
    task: str
    origin: str
    fields: dict


def load_eval_items(path: str | Path, bad: BadRows, answer_format: str = "tagged") -> list[EvalItem]:
    from posttrain.synth.tasks import VERIFIERS

    items = []
    for row in iter_rows(path, bad):
        try:
            rec = to_prompt_record(row)
            answer, task = rec.fields.get("answer"), rec.fields.get("task", "arithmetic")
            if answer is None:
                raise BadRowError(row.origin, "answer", "missing field (eval rows need the reference answer)")
            if task not in VERIFIERS:
                raise BadRowError(row.origin, "task", f"unknown task {task!r} (known: {sorted(VERIFIERS)})")
            extra = {k: v for k, v in rec.fields.items() if k not in ("answer", "task")}
            if answer_format == "tagged":  # the reference, as a tagged answer, must pass its task's verifier
                try:
                    reads = VERIFIERS[task](f"<think>.</think><answer>{answer}</answer>", str(answer), **extra)
                except ValueError as e:
                    raise BadRowError(row.origin, "answer", str(e)) from None
                if not reads:
                    raise BadRowError(row.origin, "answer", f"{answer!r} is not an answer the {task} task's "
                                      "verifier accepts")
            items.append(EvalItem(rec.messages, str(answer), task, row.origin, extra))
        except BadRowError as e:
            bad.handle(e)
    return items


def _verdict(verify, response: str, answer: str, **fields) -> bool:
    """The task verifier's verdict, False where it cannot read the reference (a decimal answer)."""
    try:
        return bool(verify(response, answer, **fields))
    except ValueError:
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021); needs n >= k."""
    if not 0 <= c <= n or k < 1 or n < k:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(k: int) -> list[int]:
    """The j of the pass@j reported from k samples a question: powers of two from 2, and k."""
    return sorted({2 ** i for i in range(1, k.bit_length())} | ({k} if k > 1 else set()))


def evaluate_items(model, tok, items: list[EvalItem], max_new_tokens: int = 256, batch_size: int = 16,
                   k: int = 1, temperature: float = 0.8, seed: int = 0, answer_format: str = "tagged",
                   decode_dtype: str = "auto") -> tuple[dict, list[dict]]:
    """(metrics per task and ``all``, per-question samples). ``decode_dtype``: ``sampling.dtype``
    of the generation (auto: float16 weights packed for fbgemm for a float32 model on an x86
    CPU, :func:`posttrain.rollout.decode_dtype`; float32 decodes exactly in float32).

    ``answer_format='last_number'`` accepts the tagged answer or else the last number of the
    response (the ``exact_answer`` reward's rule), for models not trained on the format.
    """
    from posttrain.rewards.functions import exact_answer
    from posttrain.synth.tasks import VERIFIERS, is_well_formatted

    def lenient(resp, answer, **_):
        return exact_answer(None, [resp], answer=[answer])[0] == 1.0

    convs = [it.messages for it in items]
    greedy = generate(model, tok, convs, SamplingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                        dtype=decode_dtype), progress="eval")
    sampled = []
    if k > 1:
        reps = [c for c in convs for _ in range(k)]
        flat = generate(model, tok, reps, SamplingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                         temperature=temperature, seed=seed, dtype=decode_dtype),
                        progress=f"pass@{k}")
        sampled = [flat[i * k : (i + 1) * k] for i in range(len(items))]
    groups: dict[str, list[dict]] = defaultdict(list)
    samples = []
    for i, (it, resp) in enumerate(zip(items, greedy)):
        task_verify = VERIFIERS[it.task]
        verify = task_verify if answer_format != "last_number" else \
            (lambda r, a, task_verify=task_verify, **kw: _verdict(task_verify, r, a, **kw) or lenient(r, a))
        s = {"origin": it.origin, "task": it.task, "prompt": it.messages[-1]["content"], "answer": it.answer,
             "response": resp, "correct": bool(verify(resp, it.answer, **it.fields)), "format": is_well_formatted(resp),
             "tokens": len(tok(resp, add_special_tokens=False)["input_ids"])}
        s["correct_lenient"] = s["correct"] or lenient(resp, it.answer)
        if sampled:
            s["samples_correct"] = sum(bool(verify(r, it.answer, **it.fields)) for r in sampled[i])
        samples.append(s)
        groups[it.task].append(s)
        groups["all"].append(s)
    metrics = {}
    for task in sorted(t for t in groups if t != "all") + ["all"]:
        ss = groups[task]
        m = {"n": len(ss), "accuracy": sum(s["correct"] for s in ss) / len(ss),
             # the right number as the tagged answer or else the response's last number, format or not
             "lenient": sum(s["correct_lenient"] for s in ss) / len(ss),
             "format": sum(s["format"] for s in ss) / len(ss),
             "mean_tokens": sum(s["tokens"] for s in ss) / len(ss)}
        if sampled:
            for j in pass_ks(k):
                m[f"pass@{j}"] = sum(pass_at_k(k, s["samples_correct"], j) for s in ss) / len(ss)
            m["sample_accuracy"] = sum(s["samples_correct"] for s in ss) / (k * len(ss))
        metrics[task] = m
    return metrics, samples


def print_table(metrics: dict, title: str = "held-out evaluation") -> None:
    from rich.table import Table

    from posttrain.log import console

    cols = ["task", "n", "accuracy", "lenient", "format", "mean_tokens"] + [c for c in next(iter(metrics.values()))
                                                                  if c.startswith(("pass@", "sample_"))]
    table = Table(title=title)
    for c in cols:
        table.add_column(c)
    for task, m in metrics.items():
        table.add_row(task, *[f"{m[c]:.1%}" if isinstance(m[c], float) and c != "mean_tokens" else
                              f"{m[c]:.1f}" if isinstance(m[c], float) else str(m[c]) for c in cols[1:]])
    console.print(table)


def run_eval(model_path: str, data: str, out: str | None = None, limit: int = 0, dtype: str = "auto",
             **kw) -> dict:
    from posttrain.log import log
    from posttrain.models import Precision, load_model

    bad = BadRows(skip=False)
    items = load_eval_items(data, bad, kw.get("answer_format", "tagged"))
    if limit:
        items = items[:limit]
    if not items:
        from posttrain.config import ConfigError

        raise ConfigError(f"{data}: no eval rows")
    model, tok = load_model(model_path, dtype, with_tokenizer=True, inference=True)
    log(f"eval: {len(items)} questions from {data} with {model_path} ({Precision(next(model.parameters()).dtype)})")
    # --dtype float32 asked for float32 itself: decode in it too, not from float16 packed weights
    metrics, samples = evaluate_items(model, tok, items, decode_dtype="float32" if dtype == "float32" else "auto", **kw)
    print_table(metrics, f"{model_path} on {Path(data).name}")
    if out:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "eval.json").write_text(json.dumps({"model": model_path, "data": data, "metrics": metrics}, indent=2))
        (o / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        log(f"wrote {o / 'eval.json'} and {o / 'samples.jsonl'}")
    return metrics
