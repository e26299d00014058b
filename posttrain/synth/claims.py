"""Check the arithmetic a worked solution states, step by step (a rule-based process verifier).

An answer verifier accepts a response whose final answer is right, whatever its steps say. On
a small model many such responses are right by luck: a GCD of 9 reached through
``153 / 288 = 3, 3 * 288 = 764``, a sum whose carry was dropped twice. Kept for SFT they
teach the wrong steps. :func:`arithmetic_errors` finds every claim of these kinds in a text
and returns the false ones:

* equations of integers and ``+ - * /`` (``/`` is integer division, as in the long-division
  lines ``23 / 7 = 3, 3 * 7 = 21``), chained ones included (``9 + 0 + 1 (carry) = 10``;
  the parenthesised notes ``(carry)`` / ``(borrowed)`` are read as absent);
* comparisons ``a >= b``, ``a < b``, ``a > b``, ``a <= b``;
* place values ``566 = 5 hundreds + 6 tens + 6 ones``;
* column digits ``= 12, write 2, carry 1`` (the written digit and the carry of the sum);
* column operands: the digits a column line starts from (``Tens: 2 - 1 (borrowed) = 1, 1 - 2:``)
  against the digits of the numbers in the ``So 222 - 216 = ...`` line that closes the columns.
  A digit read off the wrong number or place makes every later claim true of the wrong digits,
  so without this check a repair cuts at the closing line and leaves the columns contradicting
  it, and a right-by-luck answer passed (in 9 of the 67 wrong answers of a cold-start model on
  400 held-out questions, the first error in 1; in 5 of its 333 right answers);
* counting (``10 * 5 = 50, 45 < 50, so count from 1: 1: 5, 2: 5 + 5 = 10, ...``): the count
  starts from 10 exactly when the dividend is at least ten times the divisor, and stops at the
  dividend. A count from 10 below it (every claim after it true, counting on past the dividend
  to the token limit) was the first error in 11 of the 25 linear equations a 200-step
  cold-start model got wrong on 160 held-out questions, and 2 of its right answers got there
  by luck through one.

Text with no such claims has no errors: the check is safe on any response. Equations whose
right side is not an integer (``-(198 + 2)``, ``3.5``) are not claims of this kind and are
passed over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from posttrain.synth.tasks import PLACES, TYPESET_OPERATORS

_NOTE = re.compile(r"\s*\((?:carry|carried|borrowed|borrow)\)")
_NUM = r"-?\d+"
# a chain of at least two integers joined by + - * /, then "= integer" not followed by more
# digits, a decimal point, an opening parenthesis or an operator (the right side is then an
# expression, as in "-12 + 12 = 12 - 12"); a leading minus only where it cannot be a binary operator
# (numbers written with thousands separators, 1,234, are not read: no match starts or ends
# inside one)
_EQUATION = re.compile(r"(?<![\w.,])(" + _NUM + r"(?:\s*[-+*/]\s*\d+)+)\s*=\s*(" + _NUM
                       + r")(?!\d|[.,]\d|\s*\(|\s*[-+*/]\s*\d)")
_COMPARE = re.compile(r"(?<![\w.,])(" + _NUM + r")\s*(>=|<=|<|>|\u2265|\u2264)\s*(" + _NUM + r")(?!\w|[.,]\d)")
_CHAIN = re.compile(r"\s*=\s*(-?\d+)(?!\d|[.,]\d|\s*[-+*/]\s*\d)")
_TYPESET_COMPARE = {"\u2265": ">=", "\u2264": "<="}
_PLACES = {"thousands": 1000, "hundreds": 100, "tens": 10, "ones": 1}
_PLACE_VALUE = re.compile(r"(?<![\w.])(\d+)\s*=\s*((?:\d+\s+(?:thousands|hundreds|tens|ones)\s*\+\s*)*"
                          r"\d+\s+ones)\b")
_COLUMN = re.compile(r"=\s*(\d+),\s*write\s+(\d+)(?:,\s*carry\s+(\d+))?")
_TERM = re.compile(r"\d+|[-+*/]")
# a column line as the worked solutions write it (posttrain.synth.tasks): "Tens: 7 + 5 = 12, ...",
# "Ones: 4 - 7: 4 < 7, ...", "Hundreds: 3 - 1 (borrowed) = 2, 2 - 2: ..."; and the line closing the columns
_COLUMN_LINE = re.compile("(" + "|".join(p.capitalize() for p in PLACES) + r"): (\d+) ([-+]) (\d+)"
                          r"(?: \(borrowed\) = (-?\d+), (-?\d+) - (\d+))?")
_CLOSING = re.compile(r"So (\d+) ([-+]) (\d+) =")
_COUNT = re.compile(r"(\d+)\s*(?:<|>=)\s*(\d+), so count from (\d+):((?:\s*\d+: (?:\d+ \+ \d+ = )?\d+,?)*)")
_COUNT_ITEM = re.compile(r",?\s*\d+: (?:\d+ \+ \d+ = )?(\d+)")
_PLACE_INDEX = {p: i for i, p in enumerate(PLACES)}


def _evaluate(expr: str) -> int | None:
    """Integer value of ``a op b op c ...`` with * and / (integer division) before + and -."""
    expr = expr.strip()
    negative = expr.startswith("-")
    tokens = _TERM.findall(expr[1:] if negative else expr)
    values, ops = [int(tokens[0]) * (-1 if negative else 1)], []
    for op, num in zip(tokens[1::2], tokens[2::2]):
        n = int(num)
        if op in "*/":
            if op == "/" and n == 0:
                return None
            values[-1] = values[-1] * n if op == "*" else int(values[-1] / n)  # towards zero, as written
        else:
            values.append(n)
            ops.append(op)
    total = values[0]
    for op, v in zip(ops, values[1:]):
        total = total + v if op == "+" else total - v
    return total


@dataclass(frozen=True)
class Claim:
    """One false arithmetic claim of a text: ``text[start:end]`` (offsets in the text as given,
    notes such as ``(carry)`` included) states ``written``; ``corrected`` is what holds in its
    place (the same left side with the true value, the comparison the other way round)."""

    start: int
    end: int
    written: str
    corrected: str


_FLIP = {">=": "<", "<=": ">", "<": ">=", ">": "<="}


def _without_notes(text: str) -> tuple[str, list[int]]:
    """``text`` with the ``(carry)``-style notes removed, and each kept character's offset in ``text``."""
    kept, offsets, last = [], [], 0
    for m in _NOTE.finditer(text):
        kept.append(text[last:m.start()])
        offsets.extend(range(last, m.start()))
        last = m.end()
    kept.append(text[last:])
    return "".join(kept), [*offsets, *range(last, len(text) + 1)]


def _place_value(n: int) -> str:
    names = sorted(_PLACES, key=_PLACES.get)  # ones, tens, hundreds, thousands
    digits = str(n)[::-1][: len(names)]
    return " + ".join(f"{d} {names[i]}" for i, d in reversed(list(enumerate(digits))))


def _column_operand_claims(text: str) -> list[Claim]:
    """Column lines whose digits are not those of the numbers the closing ``So a op b =`` line
    names (a missing digit is 0). In a column that lent one (``(borrowed) = t, t - d``) the
    bottom digit is ``d`` and ``t`` must repeat the top digit less the borrow as written. The
    claim spans the first wrong digit; ``corrected`` is the right one."""
    claims, block, offset = [], [], 0
    for line in text.split("\n"):
        stripped, start = line.strip(), offset + len(line) - len(line.lstrip())
        offset += len(line) + 1
        col = _COLUMN_LINE.match(stripped)
        if col:
            block.append((start, col))
            continue
        close = _CLOSING.match(stripped)
        if close:
            a, op, b = close.group(1), close.group(2), close.group(3)
            for at, m in block:
                if m.group(3) != op:
                    continue
                place = _PLACE_INDEX[m.group(1).lower()]
                digit = {n: int(s[::-1][place]) if place < len(s) else 0 for n, s in (("a", a), ("b", b))}
                # (group, the value it must have): the top digit; in a borrowing column the top digit
                # less the borrow repeated, then the bottom digit; else the bottom digit
                checks = [(2, digit["a"])] + ([(6, int(m.group(5))), (7, digit["b"])] if m.group(5) else [(4, digit["b"])])
                for g, want in checks:
                    if int(m.group(g)) != want:
                        claims.append(Claim(at + m.start(g), at + m.end(g),
                                            f"{m.group(0)} (in {a} {op} {b})", str(want)))
                        break
        block = []
    return claims


def _count_claims(text: str) -> list[Claim]:
    """Counts in ``d``s (:func:`posttrain.synth.tasks.count_up`) that start from the wrong place
    (from 10 exactly when the dividend ``n`` is at least ``10 * d``) or go on past ``n``: the
    start number, or the counting after the count reached ``n`` (corrected to the full stop that
    ends the count)."""
    claims = []
    for m in _COUNT.finditer(text):
        n, ten, start = int(m.group(1)), int(m.group(2)), int(m.group(3))
        want = 10 if n >= ten else 1
        if start != want:
            claims.append(Claim(m.start(3), m.end(3), f"{m.group(1)} vs {m.group(2)}, so count from {start}", str(want)))
            continue
        for item in _COUNT_ITEM.finditer(m.group(4)):
            if int(item.group(1)) > n:
                at = m.start(4) + item.start()
                claims.append(Claim(at, m.end(4), f"counted past {n}: {item.group(0).strip(', ')}", "."))
                break
    return claims


def false_claims(text: str) -> list[Claim]:
    """The false arithmetic claims of ``text``, by kind (equations, comparisons, place values,
    column digits, column operands, counts), each kind in the order of the text."""
    plain, at = _without_notes(text)
    plain = plain.translate(TYPESET_OPERATORS)  # (same length: positions kept)
    claims = []

    def add(m, written, corrected):
        # a claim that spans a removed note keeps it: the span runs from the first to the last kept character
        claims.append(Claim(at[m.start()], at[m.end() - 1] + 1, written, corrected))

    for m in _EQUATION.finditer(plain):
        value = _evaluate(m.group(1))
        if value != int(m.group(2)):  # None (a division by zero) is false, with nothing to put in its place
            add(m, f"{m.group(1).strip()} = {m.group(2)}",
                "" if value is None else text[at[m.start()]: at[m.start(2)]] + str(value))
            continue
        end = m.end()  # a chain "2 + 3 = 5 = 6": each further "= n" must be the same value
        while value is not None and (more := _CHAIN.match(plain, end)):
            if int(more.group(1)) != value:
                add(more, f"{m.group(2)} = {more.group(1)}", text[at[more.start()]: at[more.start(1)]] + str(value))
                break
            end = more.end()
    for m in _COMPARE.finditer(plain):
        a, op, b = int(m.group(1)), _TYPESET_COMPARE.get(m.group(2), m.group(2)), int(m.group(3))
        if not {">=": a >= b, "<=": a <= b, "<": a < b, ">": a > b}[op]:
            add(m, f"{a} {op} {b}", f"{a} {_FLIP[op]} {b}")
    for m in _PLACE_VALUE.finditer(plain):
        total = sum(int(d) * _PLACES[p] for d, p in re.findall(r"(\d+)\s+(thousands|hundreds|tens|ones)", m.group(2)))
        if total != int(m.group(1)):
            add(m, f"{m.group(1)} = {' '.join(m.group(2).split())}", f"{m.group(1)} = {_place_value(int(m.group(1)))}")
    for m in _COLUMN.finditer(plain):
        total, digit, carry = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        if digit != total % 10 or carry != total // 10:
            add(m, m.group(0), f"= {total}, write {total % 10}" + (f", carry {total // 10}" if total >= 10 else ""))
    return claims + _column_operand_claims(text) + _count_claims(text)


def arithmetic_errors(text: str) -> list[str]:
    """The false arithmetic claims of ``text``, each as written (empty when all hold)."""
    return [c.written for c in false_claims(text)]


def first_false_claim(text: str) -> Claim | None:
    """The false claim that starts first in ``text`` (None when every claim holds): where a
    verifier-guided repair would cut a response and write ``corrected`` instead."""
    return min(false_claims(text), key=lambda c: c.start, default=None)


class ArithmeticStepVerifier:
    """A rule-based step verifier for GRPO's process supervision (``step_verifier: arithmetic``):
    the same ``score_many(prompts, step_lists)`` as :class:`posttrain.rewards.process.ProcessRewardModel`,
    each step scoring 1.0 when every arithmetic claim in it holds (a step with none holds) and
    0.0 otherwise. So within a group the tokens up to a false step get a negative advantage
    even when every completion's final answer scored the same."""

    def score_many(self, prompts: list, step_lists: list[list[str]]) -> list[list[float]]:
        return [[0.0 if arithmetic_errors(s) else 1.0 for s in steps] for steps in step_lists]


STEP_VERIFIERS = {"arithmetic": ArithmeticStepVerifier}
