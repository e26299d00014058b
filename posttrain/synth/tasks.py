"""Verifiable task generators with programmatic worked solutions.

Each task draws questions from a seeded generator; train and test questions come from
disjoint parts of the question space (a question's split is a hash of its operands),
so a held-out question is never seen in training whatever the seeds. Each question has
an exact verifier and a worked solution in the reasoning format::

    <think>
    step-by-step reasoning
    </think>
    <answer>final answer</answer>

Implemented so far: multi-digit addition and subtraction, solved column by column
with carries and borrows, exactly as taught in school. The solution text is generated
from the same digit-by-digit procedure and the procedure's result is asserted against
Python's arithmetic, so a worked solution can never carry a wrong answer.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]


@dataclass
class Problem:
    """One verifiable question."""

    task: str
    question: str
    answer: str
    solution: str  # worked solution in the reasoning format
    meta: dict[str, Any] = field(default_factory=dict)

    def as_sft_row(self) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": self.question},
                             {"role": "assistant", "content": self.solution}],
                "task": self.task, "answer": self.answer}

    def as_prompt_row(self) -> dict[str, Any]:
        return {"prompt": self.question, "task": self.task, "answer": self.answer}


def extract_answer(response: str) -> str | None:
    """The text inside the last ``<answer>...</answer>``, or None."""
    found = ANSWER_RE.findall(response)
    return found[-1].strip() if found else None


def _split_of(key: str) -> str:
    """'test' for ~1 in 8 questions, chosen by a hash of the question's operands."""
    return "test" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 8 == 0 else "train"


def _digits(n: int, width: int) -> list[int]:
    return [(n // 10**i) % 10 for i in range(width)]  # ones first


def solve_addition(a: int, b: int) -> tuple[str, int]:
    """Column addition with carries; returns (reasoning lines, result)."""
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    lines, carry, out = [], 0, []
    for i in range(width):
        s = da[i] + db[i] + carry
        expr = f"{da[i]} + {db[i]}" + (f" + {carry} (carry)" if carry else "")
        digit, carry = s % 10, s // 10
        lines.append(f"{PLACES[i].capitalize()}: {expr} = {s}, write {digit}" + (", carry 1." if carry else "."))
        out.append(digit)
    if carry:
        lines.append(f"The final carry {carry} becomes the leading digit.")
        out.append(carry)
    result = int("".join(str(d) for d in reversed(out)))
    return "\n".join(lines), result


def solve_subtraction(a: int, b: int) -> tuple[str, int]:
    """Column subtraction with borrows for a >= b >= 0; returns (reasoning lines, result)."""
    assert a >= b >= 0
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    lines, borrow, out = [], 0, []
    for i in range(width):
        top = da[i] - borrow
        expr_top = f"{da[i]} - {borrow} (borrowed)" if borrow else f"{da[i]}"
        if top < db[i]:
            lines.append(f"{PLACES[i].capitalize()}: {expr_top} is less than {db[i]}, borrow 1: "
                         f"{top + 10} - {db[i]} = {top + 10 - db[i]}.")
            out.append(top + 10 - db[i])
            borrow = 1
        else:
            lines.append(f"{PLACES[i].capitalize()}: {expr_top} - {db[i]} = {top - db[i]}.")
            out.append(top - db[i])
            borrow = 0
    result = int("".join(str(d) for d in reversed(out)))
    return "\n".join(lines), result


def _format(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>"


def arithmetic_problem(rng: random.Random, split: str, digits: tuple[int, int] = (2, 3), ops: str = "+-") -> Problem:
    """An addition or subtraction question of the given split (rejection-sampled by hash)."""
    while True:
        op = rng.choice(ops)
        n = rng.randint(*digits)
        a = rng.randint(10 ** (n - 1), 10**n - 1)
        b = rng.randint(10 ** (n - 1), 10**n - 1)
        if op == "-" and b > a:
            a, b = b, a
        key = f"{a}{op}{b}"
        if _split_of(key) != split:
            continue
        if op == "+":
            steps, result = solve_addition(a, b)
            assert result == a + b
            reasoning = f"Add {a} and {b} column by column, starting from the ones.\n{steps}\nSo {a} + {b} = {result}."
        else:
            steps, result = solve_subtraction(a, b)
            assert result == a - b
            reasoning = (f"Subtract {b} from {a} column by column, starting from the ones.\n{steps}\n"
                         f"So {a} - {b} = {result}.")
        question = f"What is {a} {op} {b}?"
        return Problem("arithmetic", question, str(result), _format(reasoning, str(result)),
                       {"a": a, "b": b, "op": op})


def arithmetic_problems(n: int, split: str, seed: int = 0, digits: tuple[int, int] = (2, 3),
                        ops: str = "+-") -> list[Problem]:
    """``n`` distinct questions of ``split`` ('train' or 'test'), operands of ``digits`` digits."""
    rng = random.Random(f"arithmetic-{split}-{seed}" + ("" if (digits, ops) == ((2, 3), "+-") else f"-{digits}-{ops}"))
    seen, out = set(), []
    while len(out) < n:
        p = arithmetic_problem(rng, split, digits, ops)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def verify_arithmetic(response: str, answer: str) -> bool:
    """True when the response's ``<answer>`` holds the exact integer ``answer``."""
    got = extract_answer(response)
    if got is None:
        return False
    got = got.replace(",", "").strip()
    return re.fullmatch(r"-?\d+", got) is not None and int(got) == int(answer)


# --------------------------------------------------------------------------- wrong solutions (preference, PRM data)


def reasoning_steps(solution: str) -> list[str]:
    """The lines of a worked solution's ``<think>`` block, one reasoning step each."""
    think = solution.split("<think>\n", 1)[1].split("\n</think>", 1)[0]
    return think.split("\n")


def corrupt_solution(p: Problem, rng: random.Random) -> tuple[list[str], list[int], str]:
    """A plausible wrong worked solution: one column digit is miswritten and the error carried
    through to the final answer. Returns (steps, step labels, full text): steps before the
    wrong column are labelled 1, it and every later step 0 (Math-Shepherd convention: a
    step is correct only if a correct answer can still be reached from it).
    """
    steps = reasoning_steps(p.solution)
    cols = [i for i, s in enumerate(steps) if s.split(":")[0].lower() in PLACES]
    k = rng.choice(cols)
    place = PLACES.index(steps[k].split(":")[0].lower())
    pat = r"write (\d)" if p.meta["op"] == "+" else r"= (\d+)\.$"
    m = list(re.finditer(pat, steps[k]))[-1]
    old = int(m.group(1)) % 10
    new = (old + rng.randint(1, 9)) % 10
    wrong = int(p.answer) + (new - old) * 10**place
    if wrong < 0:
        new, wrong = (old + 1) % 10, int(p.answer) + ((old + 1) % 10 - old) * 10**place
    steps = list(steps)
    steps[k] = steps[k][: m.start(1)] + str(new) + steps[k][m.end(1):]
    steps[-1] = re.sub(r"= \d+\.$", f"= {wrong}.", steps[-1])
    labels = [1 if i < k else 0 for i in range(len(steps))]
    return steps, labels, _format("\n".join(steps), str(wrong))


def preference_row(p: Problem, rng: random.Random) -> dict[str, Any]:
    """(question, correct worked solution, corrupted solution) as a preference pair."""
    _, _, wrong = corrupt_solution(p, rng)
    return {"prompt": p.question, "chosen": p.solution, "rejected": wrong, "task": p.task, "answer": p.answer}


def step_row(p: Problem, rng: random.Random, wrong: bool) -> dict[str, Any]:
    """A step-labelled solution for PRM training: the correct one (all 1) or a corrupted one."""
    if wrong:
        steps, labels, _ = corrupt_solution(p, rng)
    else:
        steps = reasoning_steps(p.solution)
        labels = [1] * len(steps)
    return {"prompt": p.question, "steps": steps, "labels": labels, "answer": p.answer}


# --------------------------------------------------------------------------- format and verifier registry

FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)


def is_well_formatted(response: str) -> bool:
    """True for exactly ``<think>…</think>`` followed by ``<answer>…</answer>`` and nothing else."""
    m = FORMAT_RE.match(response)
    return bool(m and m.group(1).strip() and m.group(2).strip())


# task name (the ``task`` field of a row) -> verifier(response, answer) -> bool
VERIFIERS = {"arithmetic": verify_arithmetic}
