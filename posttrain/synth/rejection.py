"""Synthesis of reasoning data from a model's own outputs: one-shot prompting and rejection sampling.

* **One-shot prompting** (:func:`one_shot_messages`): the question is shown after one worked
  example of the same task in the reasoning format, so that a model that has never seen the
  format imitates it. The kept responses are stored with the *plain* question as the prompt,
  so the SFT data teaches the format without the exemplar.
* **Rejection sampling** (:func:`rejection_sample`): ``k`` samples per question; a response is
  kept when it parses strictly (``<think>`` then ``<answer>``), its answer passes the task's
  exact verifier, it is at most ``max_tokens`` long, and (optionally) mostly ASCII text (a
  crude language filter); kept responses are de-duplicated per question (whitespace
  normalised) and at most ``keep_per_question`` are kept. With ``max_pass_rate`` < 1 the
  questions the model answers right in more than that share of its ``k`` samples keep none
  (difficulty filtering: the kept set then holds the questions the model is unsure of). Yield,
  sampled accuracy and questions solved are reported per task, with the reasons responses were
  rejected. With ``pairs_per_question`` it also writes preference pairs (a verified response
  against a wrong one to the same question) for DPO on the model's own mistakes.
* **Verifier-guided repair** (``repair_rounds``, :func:`repair_responses`): a wrong response is
  cut at its first false arithmetic claim (:mod:`posttrain.synth.claims`), the true statement
  written in its place, and the model continues; kept when it then verifies. This yields right
  solutions to exactly the questions the model fails, which plain rejection sampling cannot
  (its kept set leans to short, easy questions). Repaired rows carry ``"repaired": true``.

Both write SFT rows (``messages`` + ``task`` + ``answer``) that ``posttrain sft`` reads.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.fileio import atomic_write
from posttrain.reasoning import parse_reasoning
from posttrain.rollout import SamplingConfig, generate
from posttrain.synth.claims import arithmetic_errors, first_false_claim
from posttrain.synth.tasks import VERIFIERS, Problem, problems

INSTRUCTION = ("Solve the problem. First reason step by step inside <think> </think>, then give only the final "
               "answer inside <answer> </answer>.")


def one_shot_messages(question: str, exemplar: Problem) -> list[dict[str, str]]:
    """A user turn holding the instruction, one worked example, and the question."""
    return [{"role": "user", "content": f"{INSTRUCTION}\n\nExample:\nQuestion: {exemplar.question}\n"
                                        f"Response:\n{exemplar.solution}\n\nQuestion: {question}\nResponse:"}]


@dataclass
class RejectionConfig:
    k: int = 4
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 192
    max_tokens: int = 256
    keep_per_question: int = 2
    # questions whose share of verified samples is above this keep none of them: a question the
    # model already solves every time teaches it little (difficulty filtering); 1.0 keeps all
    max_pass_rate: float = 1.0
    # also write up to this many preference pairs per question: a verified response (chosen)
    # against a wrong or unparsable one to the same question (rejected), for DPO on the model's
    # own mistakes; only questions with both kinds give pairs. With ``repair_rounds``, a repaired
    # response against the wrong one it was repaired from comes first (step-level pairs, as in
    # Step-DPO: the same text up to the first false step, then the right and the wrong way on)
    pairs_per_question: int = 0
    ascii_ratio: float = 0.95
    # reject a response whose answer verifies but whose reasoning states false arithmetic
    # (posttrain.synth.claims: right by luck, e.g. a GCD of 9 reached through 3 * 288 = 764);
    # it is neither kept nor used as a chosen response
    check_steps: bool = True
    # verifier-guided repair (:func:`repair_responses`): a wrong response is cut at its first false
    # arithmetic claim, the true statement written in its place, and the model continues from
    # there, up to this many times; a repaired response that then verifies (with no false step)
    # is kept as well: a right solution, in the model's own words, to a question it got wrong.
    # 0 = off
    repair_rounds: int = 0
    # repaired responses kept per question, besides the ``keep_per_question`` sampled ones
    repair_per_question: int = 1
    one_shot: bool = False
    batch_size: int = 16
    seed: int = 0


@dataclass
class RejectionResult:
    rows: list[dict]
    pairs: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _sampling(cfg: RejectionConfig, seed: int) -> SamplingConfig:
    """The sampling settings of rejection sampling (the first draw and every repair continuation)."""
    return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          batch_size=cfg.batch_size, seed=seed)


def repair_responses(model, tok, convs: list[list[dict[str, str]]], responses: list[str], accept,
                     cfg: RejectionConfig) -> list[tuple[str | None, int]]:
    """Verifier-guided repair of wrong ``responses`` (one per conversation in ``convs``).

    Each round cuts a response at its first false arithmetic claim
    (:func:`posttrain.synth.claims.first_false_claim`), writes the true statement in its place
    (``12 - 8 = 5`` -> ``12 - 8 = 4``) and lets the model continue from there with the
    rejection-sampling settings; ``accept(i, text)`` decides whether the result is right. Up to
    ``cfg.repair_rounds`` rounds. A response wrong for a reason the checker cannot see (a digit
    misread, no answer), or whose false claim has nothing true to write in its place (a division
    by zero), is left alone. Returns (repaired text or None, cuts made) per response.

    What comes out is the model's own solution up to its mistake, the one corrected step, and the
    model's own continuation: a right solution to a question the model got wrong, in its own
    words, which plain rejection sampling would never keep. With ``cfg.check_steps`` a
    continuation ends at the line of its first false claim (:func:`generate`'s ``stop_when``):
    the tokens after it would be cut in the next round anyway.
    """
    texts, cuts = list(responses), [0] * len(responses)
    result: list[str | None] = [None] * len(responses)
    active = list(range(len(responses)))
    for r in range(cfg.repair_rounds):
        idx, prefixes = [], []
        for i in active:
            claim = first_false_claim(texts[i])
            if claim is not None and claim.corrected:
                idx.append(i)
                prefixes.append(texts[i][: claim.start] + claim.corrected)
        if not idx:
            break
        # with check_steps a continuation that states a false claim is never kept as it is (the next
        # round cuts it there; after the last, a right answer through it is right by luck), so it
        # ends at the line holding its first one instead of decoding on to the answer
        stop = None if not cfg.check_steps else \
            (lambda j, text, prefixes=prefixes: first_false_claim(prefixes[j] + text) is not None)
        continuations = generate(model, tok, [convs[i] for i in idx], _sampling(cfg, cfg.seed + 7_919 * (r + 1)),
                                 prefixes=prefixes, stop_when=stop)
        active = []
        for i, prefix, cont in zip(idx, prefixes, continuations):
            texts[i], cuts[i] = prefix + cont, cuts[i] + 1
            if accept(i, texts[i]):
                result[i] = texts[i]
            else:
                active.append(i)
    return list(zip(result, cuts))


def rejection_sample(model, tok, questions: list[Problem], cfg: RejectionConfig) -> RejectionResult:
    """Kept (verified, well-formatted, deduplicated) responses as SFT rows, plus yield statistics."""
    exemplars = {}
    if cfg.one_shot:
        for task in {q.task for q in questions}:
            exemplars[task] = problems(task, 1, "train", seed=10_007)[0]
    convs, owner = [], []
    for qi, q in enumerate(questions):
        msgs = one_shot_messages(q.question, exemplars[q.task]) if cfg.one_shot else \
            [{"role": "user", "content": q.question}]
        convs += [msgs] * cfg.k
        owner += [qi] * cfg.k
    responses = generate(model, tok, convs, _sampling(cfg, cfg.seed))
    extras = [{k: v for k, v in q.as_prompt_row().items() if k not in ("prompt", "answer", "task")}
              for q in questions]

    def verdict(i: int, text: str):
        """(parsed, answer verifies, verifies but states false arithmetic) of response ``i``'s ``text``."""
        q = questions[owner[i]]
        p = parse_reasoning(text)
        ok = p.ok and VERIFIERS[q.task](text, q.answer, **extras[owner[i]])
        return p, ok, ok and cfg.check_steps and bool(arithmetic_errors(p.think))

    verdicts = [verdict(i, r) for i, r in enumerate(responses)]
    repaired: dict[int, tuple[str | None, int]] = {}
    if cfg.repair_rounds:
        wrong = [i for i, (_, ok, lucky) in enumerate(verdicts) if not ok or lucky]

        def repaired_right(j: int, text: str) -> bool:
            _, ok, lucky = verdict(wrong[j], text)
            return ok and not lucky

        fixed = repair_responses(model, tok, [convs[i] for i in wrong], [responses[i] for i in wrong],
                                 repaired_right, cfg)
        repaired = dict(zip(wrong, fixed))
    reasons: Counter = Counter()
    per_task: dict[str, Counter] = defaultdict(Counter)
    rows, pairs = [], []
    for qi, q in enumerate(questions):
        seen, kept, kept_repaired, good, bad = set(), 0, 0, [], {}
        span = range(qi * cfg.k, (qi + 1) * cfg.k)
        right = [verdicts[i][1] for i in span]
        per_task[q.task]["correct"] += sum(right)
        false_steps = [verdicts[i][2] for i in span]
        per_task[q.task]["right_by_luck"] += sum(false_steps)
        right = [ok and not lucky for ok, lucky in zip(right, false_steps)]
        too_easy = sum(right) > cfg.max_pass_rate * len(right)
        per_task[q.task]["questions_too_easy"] += too_easy
        candidates = []  # (response, is a repair) passing the verifier, in the order they are considered
        step_pairs = []  # (repaired, the wrong response it was repaired from): they part at the first false step
        for i, ok, lucky in zip(span, right, false_steps):
            resp, p = responses[i], verdicts[i][0]
            per_task[q.task]["sampled"] += 1
            if ok:
                candidates.append((resp, False))
                continue
            reasons[f"format: {p.error}" if not p.ok else "false step" if lucky else "wrong answer"] += 1
            bad.setdefault(_normalise(resp), resp.strip())
            if cfg.repair_rounds:
                fixed, cuts = repaired[i]
                per_task[q.task]["repair_attempted"] += cuts > 0
                per_task[q.task]["repaired"] += fixed is not None
                per_task[q.task]["repair_cuts"] += cuts if fixed is not None else 0
                per_task[q.task]["kept_repaired"] += 0  # counted below; present even when none is kept
                if fixed is not None:
                    candidates.append((fixed, True))
                    step_pairs.append((fixed.strip(), resp.strip()))
        filtered = set()  # responses the length or language filter turned away: no chosen side of a pair either
        for resp, is_repair in candidates:
            if len(tok(resp, add_special_tokens=False)["input_ids"]) > cfg.max_tokens:
                reasons["too long"] += 1
                filtered.add(resp.strip())
            elif sum(c.isascii() for c in resp) < cfg.ascii_ratio * len(resp):
                reasons["language filter"] += 1
                filtered.add(resp.strip())
            elif _normalise(resp) in seen:
                reasons["duplicate"] += 1
            else:
                seen.add(_normalise(resp))
                good.append(resp.strip())  # a chosen response for the pairs, kept as an SFT row or not
                if too_easy and not is_repair:
                    reasons["question too easy"] += 1
                elif (kept_repaired >= cfg.repair_per_question) if is_repair else (kept >= cfg.keep_per_question):
                    reasons["enough for this question"] += 1
                else:
                    kept_repaired += is_repair
                    kept += not is_repair
                    per_task[q.task]["kept"] += 1
                    per_task[q.task]["kept_repaired"] += is_repair
                    rows.append({"messages": [{"role": "user", "content": q.question},
                                              {"role": "assistant", "content": resp.strip()}],
                                 "task": q.task, "answer": q.answer, **({"repaired": True} if is_repair else {})})
        # a repair against its own wrong original first (a step-level pair: the two share the text
        # up to the mistake, so DPO's signal sits on the wrong step), then right against wrong samples
        step_pairs = [(c, r) for c, r in step_pairs if c not in filtered]
        for chosen, rejected in (step_pairs + list(zip(good * len(bad), bad.values())))[: cfg.pairs_per_question]:
            pairs.append({"prompt": q.question, "chosen": chosen, "rejected": rejected, "task": q.task,
                          "answer": q.answer})
            per_task[q.task]["pairs"] += 1
        per_task[q.task]["questions"] += 1
        per_task[q.task]["questions_solved"] += any(right)
    stats = {"sampled": len(responses), "kept": len(rows), "yield": len(rows) / max(len(responses), 1),
             "pairs": len(pairs), "rejected": dict(reasons),
             "per_task": {t: {**c, "yield": c["kept"] / max(c["sampled"], 1),
                              "sample_accuracy": c["correct"] / max(c["sampled"], 1)} for t, c in per_task.items()}}
    return RejectionResult(rows, pairs, stats)


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Write JSONL atomically (a killed write never leaves a half file under the final name)."""
    return atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def rejection_sample_to(path: str | Path, model, tok, questions: list[Problem], cfg: RejectionConfig,
                        chunk: int = 32, pairs_path: str | Path | None = None) -> tuple[dict[str, int], dict]:
    """:func:`rejection_sample` in chunks of ``chunk`` questions appended to ``path`` (and the
    preference pairs to ``pairs_path``) with a progress marker (:mod:`posttrain.synth.journal`):
    a killed run resumes where it stopped. Returns (rows written per output: ``rows``,
    ``pairs``; merged statistics)."""
    from dataclasses import asdict, replace

    from posttrain.synth.journal import fingerprint, run_chunks, sum_stats

    def produce(c, lo, hi):
        res = rejection_sample(model, tok, questions[lo:hi], replace(cfg, seed=cfg.seed + 1_000 * c))
        return {"rows": res.rows, "pairs": res.pairs}, res.stats

    key = fingerprint("rejection", asdict(cfg), [q.question for q in questions], chunk, model.name_or_path)
    outputs = {"rows": path, **({"pairs": pairs_path} if pairs_path else {})}
    counts, parts = run_chunks(outputs, len(questions), chunk, key, produce, "rejection sampling")
    stats = sum_stats(parts)
    stats["yield"] = stats.get("kept", 0) / max(stats.get("sampled", 0), 1)
    for t in stats.get("per_task", {}).values():
        t["yield"] = t.get("kept", 0) / max(t.get("sampled", 0), 1)
        t["sample_accuracy"] = t.get("correct", 0) / max(t.get("sampled", 0), 1)
    stats.setdefault("rejected", {})
    return counts, stats
