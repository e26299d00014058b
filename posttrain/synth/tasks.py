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

from posttrain.reasoning import extract_answer, format_solution, is_well_formatted  # noqa: F401 (re-exported)

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
        row = {"prompt": self.question, "task": self.task, "answer": self.answer}
        if self.task == "countdown":  # the verifier needs the allowed numbers and the target
            row.update(numbers=self.meta["numbers"], target=self.meta["target"])
        return row


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
        return Problem("arithmetic", question, str(result), format_solution(reasoning, str(result)),
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


def verify_arithmetic(response: str, answer: str, **_) -> bool:
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
    return steps, labels, format_solution("\n".join(steps), str(wrong))


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


# --------------------------------------------------------------------------- linear equations


def _int_answer(response: str, answer: str, prefix: str = "") -> bool:
    """True when the ``<answer>`` holds the integer ``answer`` (optionally written ``x = 5``)."""
    got = extract_answer(response)
    if got is None:
        return False
    got = got.replace(",", "").replace(" ", "")
    if prefix and got.startswith(prefix + "="):
        got = got[len(prefix) + 1 :]
    return re.fullmatch(r"-?\d+", got) is not None and int(got) == int(answer)


def linear_problem(rng: random.Random, split: str) -> Problem:
    """``a x + b = c`` with an integer solution, solved by undoing ``b`` then ``a``."""
    while True:
        a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-30, 30)
        if b == 0 or _split_of(f"lin{a},{x},{b}") != split:
            continue
        c = a * x + b
        sign = "+" if b > 0 else "-"
        question = f"Solve for x: {a}x {sign} {abs(b)} = {c}."
        undo = (f"Subtract {b} from both sides: {a}x = {c} - {b} = {c - b}." if b > 0 else
                f"Add {-b} to both sides: {a}x = {c} + {-b} = {c - b}.")
        reasoning = (f"The equation is {a}x {sign} {abs(b)} = {c}.\n{undo}\n"
                     f"Divide both sides by {a}: x = {c - b} / {a} = {x}.\n"
                     f"Check: {a} * {x} {sign} {abs(b)} = {a * x} {sign} {abs(b)} = {c}.")
        assert (c - b) % a == 0 and (c - b) // a == x
        return Problem("linear", question, str(x), format_solution(reasoning, str(x)), {"a": a, "b": b, "c": c})


def verify_linear(response: str, answer: str, **_) -> bool:
    return _int_answer(response, answer, prefix="x")


# --------------------------------------------------------------------------- greatest common divisor


def gcd_problem(rng: random.Random, split: str) -> Problem:
    """GCD of two numbers, solved with Euclid's algorithm written out step by step."""
    while True:
        g = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15])
        a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
        if a == b or _split_of(f"gcd{min(a, b)},{max(a, b)}") != split:
            continue
        hi, lo = max(a, b), min(a, b)
        lines = [f"Use Euclid's algorithm on {hi} and {lo}."]
        x, y = hi, lo
        while y:
            q, r = divmod(x, y)
            lines.append(f"{x} = {q} * {y} + {r}.")
            x, y = y, r
        lines.append(f"The last non-zero remainder is {x}.")
        assert x == __import__("math").gcd(a, b)
        return Problem("gcd", f"What is the greatest common divisor of {a} and {b}?", str(x),
                       format_solution("\n".join(lines), str(x)), {"a": a, "b": b})


def verify_gcd(response: str, answer: str, **_) -> bool:
    return _int_answer(response, answer)


# --------------------------------------------------------------------------- countdown (search)


def _countdown_solutions(nums: list[int], target: int) -> list[tuple[str, list[str]]]:
    """(expression, steps) reaching ``target`` from ``nums`` (each used at most once), by search."""
    found: list[tuple[str, list[str]]] = []

    def search(items: list[tuple[int, str]], steps: list[str]) -> None:
        if len(found) >= 3:
            return
        for v, e in items:
            if v == target and steps:
                found.append((e, list(steps)))
                return
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ea), (b, eb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                cands = [(a + b, f"({ea} + {eb})", f"{a} + {b} = {a + b}")] if i < j else []
                cands += [(a * b, f"({ea} * {eb})", f"{a} * {b} = {a * b}")] if i < j else []
                if a > b:
                    cands.append((a - b, f"({ea} - {eb})", f"{a} - {b} = {a - b}"))
                if b > 1 and a % b == 0:
                    cands.append((a // b, f"({ea} / {eb})", f"{a} / {b} = {a // b}"))
                for v, e, st in cands:
                    search(rest + [(v, e)], steps + [st])

    search([(n, str(n)) for n in nums], [])
    return found


def countdown_problem(rng: random.Random, split: str) -> Problem:
    """Reach a target with three or four small numbers and + - * / (each number at most once)."""
    while True:
        nums = sorted(rng.randint(1, 12) for _ in range(rng.choice([3, 4])))
        target = rng.randint(10, 60)
        if _split_of(f"cd{nums},{target}") != split:
            continue
        sols = _countdown_solutions(nums, target)
        if not sols:
            continue
        expr, steps = min(sols, key=lambda s: len(s[1]))
        expr = expr[1:-1] if expr.startswith("(") and expr.endswith(")") else expr
        reasoning = (f"I need to reach {target} using some of {', '.join(map(str, nums))}, each at most once.\n"
                     + "\n".join(steps) + f"\nSo {expr} = {target}.")
        question = (f"Using the numbers {', '.join(map(str, nums))} (each at most once) and + - * /, write an "
                    f"expression equal to {target}.")
        return Problem("countdown", question, expr, format_solution(reasoning, expr),
                       {"numbers": nums, "target": target})


def verify_countdown(response: str, answer: str, numbers: list[int] | None = None, target: int | None = None,
                     **_) -> bool:
    """The answer expression uses only the given numbers (each at most once) and equals the target.

    Without ``numbers``/``target`` they are recovered by evaluating the reference ``answer``.
    """
    import ast

    got = extract_answer(response)
    if got is None:
        return False

    def evaluate(expr: str) -> tuple[float, list[int]] | None:
        try:
            tree = ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval")
        except SyntaxError:
            return None
        used: list[int] = []

        def ev(n):
            if isinstance(n, ast.Expression):
                return ev(n.body)
            if isinstance(n, ast.Constant) and isinstance(n.value, int):
                used.append(n.value)
                return n.value
            if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
                a, b = ev(n.left), ev(n.right)
                if isinstance(n.op, ast.Div):
                    if b == 0:
                        raise ZeroDivisionError
                    return a / b
                return a + b if isinstance(n.op, ast.Add) else a - b if isinstance(n.op, ast.Sub) else a * b
            raise ValueError("not an arithmetic expression")

        try:
            return ev(tree), used
        except (ValueError, ZeroDivisionError, RecursionError):
            return None

    ref = evaluate(answer)
    if ref is None:
        return False
    numbers = list(numbers) if numbers is not None else ref[1]
    target = target if target is not None else ref[0]
    res = evaluate(got)
    if res is None:
        return False
    value, used = res
    pool = list(numbers)
    for u in used:
        if u not in pool:
            return False
        pool.remove(u)
    return abs(value - target) < 1e-9


# --------------------------------------------------------------------------- registry


@dataclass
class Task:
    """A verifiable task: a seeded generator of questions and an exact verifier."""

    name: str
    make: Any  # (rng, split) -> Problem
    verify: Any  # (response, answer) -> bool


TASKS = {
    "arithmetic": Task("arithmetic", lambda rng, split: arithmetic_problem(rng, split), verify_arithmetic),
    "linear": Task("linear", linear_problem, verify_linear),
    "gcd": Task("gcd", gcd_problem, verify_gcd),
    "countdown": Task("countdown", countdown_problem, verify_countdown),
}
# task name (the ``task`` field of a row) -> verifier(response, answer, **row_fields) -> bool
VERIFIERS = {name: t.verify for name, t in TASKS.items()}


def problems(task: str, n: int, split: str, seed: int = 0) -> list[Problem]:
    """``n`` distinct questions of ``task`` from ``split`` ('train' or 'test')."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if task == "arithmetic":
        return arithmetic_problems(n, split, seed)
    rng = random.Random(f"{task}-{split}-{seed}")
    seen, out = set(), []
    for _ in range(n * 200):
        p = TASKS[task].make(rng, split)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"{task}: could not draw {n} distinct {split} questions")
