"""Rule-based reward functions: plain functions of completions, tested on literal strings.

Every reward function has the signature ``f(prompts, completions, **fields) -> list[float |
None]``: one value per completion, where ``fields`` holds the prompt rows' other columns
as lists aligned with the completions (``answer=[...]``, ``task=[...]``). ``None`` means
"no score" (the completion gets zero advantage and is counted in the metrics).

* :func:`exact_answer`: 1 if the final answer equals the reference number, else 0. The
  answer is the ``<answer>`` block when there is one, otherwise the last number in the
  text (so a model that has not learned the format can still be rewarded: R1-Zero style).
* :func:`tagged_answer`: the same, but only an ``<answer>`` block counts (strict).
* :func:`math_equal`: symbolic equivalence of the final answer and the reference with
  sympy (``1/2`` = ``0.5`` = ``2/4``); ``math-verify`` is used instead when installed.
* :func:`think_format`: 1 for ``<think>…</think>`` then ``<answer>…</answer>`` and nothing
  else, 0 otherwise (DeepSeek-R1's format reward).
* :func:`task_verifier`: the exact verifier of the row's ``task`` (arithmetic, linear, gcd,
  countdown: :mod:`posttrain.synth.tasks`).
"""

from __future__ import annotations

import re
from fractions import Fraction

from posttrain.reasoning import ANSWER_RE, extract_answer, is_well_formatted
from posttrain.synth.tasks import MAX_ANSWER_CHARS, TYPESET_OPERATORS

# a number: a comma only inside thousands ("12, so" is 12; "1,23" and "1,2,3" are no number), the
# ASCII or the Unicode minus
NUMBER_RE = re.compile(r"(?<![\d.,])[-\u2212]?\d+(?:,\d{3})*(?:\.\d+)?(?!\d|,\d)")


def final_answer(text: str, strict: bool = False) -> str | None:
    """The ``<answer>`` block's text, else (unless ``strict``) the last number in ``text``. An
    empty ``<answer>`` block is an empty answer (no number after it is taken instead)."""
    tagged = extract_answer(text)
    if tagged is not None:
        return tagged
    if ANSWER_RE.search(text):
        return ""
    if strict:
        return None
    nums = NUMBER_RE.findall(text)
    return nums[-1] if nums else None


def _as_number(s: str) -> Fraction | None:
    """``s`` as an exact number: digits with an optional sign (``-``, ``+`` or the Unicode minus)
    and decimals, commas only as thousands separators (``1,234``; ``1,2`` is not twelve).
    Exact, not a float: 10000000000000001 is not 10000000000000000."""
    s = s.strip().rstrip(".").translate(TYPESET_OPERATORS)
    if len(s) > MAX_ANSWER_CHARS:
        return None
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    return Fraction(s) if re.fullmatch(r"[-+]?[0-9]+(?:\.[0-9]+)?", s) else None


def _answers(fields: dict, n: int) -> list:
    if "answer" not in fields:
        raise KeyError("this reward needs an 'answer' field in the prompt rows")
    answers = fields["answer"]
    if len(answers) != n:
        raise ValueError(f"{len(answers)} answers for {n} completions")
    return answers


def exact_answer(prompts, completions, **fields) -> list[float | None]:
    """1.0 when the final answer (tagged, or the last number) equals ``answer`` numerically."""
    out = []
    for c, ref in zip(completions, _answers(fields, len(completions))):
        if ref is None:
            out.append(None)
            continue
        got = final_answer(c)
        a, b = (_as_number(got) if got else None), _as_number(str(ref))
        out.append(1.0 if a is not None and b is not None and a == b else 0.0)
    return out


def tagged_answer(prompts, completions, **fields) -> list[float | None]:
    """1.0 when the ``<answer>`` block holds the reference number; untagged answers score 0."""
    out = []
    for c, ref in zip(completions, _answers(fields, len(completions))):
        got = final_answer(c, strict=True)
        a, b = (_as_number(got) if got else None), _as_number(str(ref))
        out.append(None if ref is None else 1.0 if a is not None and a == b else 0.0)
    return out


# what the sympy fallback of math_equal reads: numbers, names, + - * / ^ and brackets. Model
# text must never reach Python's eval (sympify evaluates its input: ``__import__('os')...``),
# so no underscores, quotes or commas, no attribute access, and exponents that stay small
# (``9^9^9^9`` would compute for ever)
_SYMPY_SAFE = re.compile(r"[0-9A-Za-z\s+\-*/^().]{1,200}")
_EXPONENT = re.compile(r"(?:\^|\*\*)\s*(?!(?:-?\d{1,3}|[A-Za-z]|\(\s*-?\d{1,3}(?:\s*/\s*\d{1,3})?\s*\)|\(\s*[A-Za-z]\s*\))"
                       r"(?![\w(^]|\s*(?:\^|\*\*)))")


def _sympy_expr(text: str):
    """``text`` parsed by sympy without evaluation, or None when it is not a plain expression."""
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations

    text = text.strip().replace("^", "**")
    if (not _SYMPY_SAFE.fullmatch(text) or re.search(r"[A-Za-z)]\s*\.", text)
            or _EXPONENT.search(text)):
        return None
    names = {k: getattr(sympy, k) for k in ("Integer", "Float", "Rational", "Symbol", "Function", "Add", "Mul", "Pow",
                                           "sqrt", "pi", "E")}
    try:
        return parse_expr(text, local_dict={}, global_dict={"__builtins__": {}, **names},
                          transformations=standard_transformations, evaluate=False)
    except Exception:  # noqa: BLE001 - any parse failure: not an expression
        return None


#: seconds the symbolic comparison of one answer may take (``((9^999)^999)^999`` would take for ever)
SYMPY_SECONDS = 2.0


def _math_same(a: str, b: str) -> bool:
    """``a`` equals ``b``: as numbers (thousands separators allowed), else symbolically (at most
    :data:`SYMPY_SECONDS`; longer counts as not equal), else as text."""
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return x == y
    ea, eb = _sympy_expr(a), _sympy_expr(b)
    if ea is not None and eb is not None:
        import sympy

        try:
            same = _time_limited(lambda: bool(sympy.simplify(ea - eb) == 0), SYMPY_SECONDS)
        except TimeoutError:
            return False
        except Exception:  # noqa: BLE001 - sympy cannot compare them: fall back to the text
            same = None
        if same is not None:
            return same
    return a.strip() == b.strip()


def _time_limited(fn, seconds: float):
    """``fn()``, raising TimeoutError after ``seconds`` (a SIGALRM timer: Unix, main thread; elsewhere
    without a limit)."""
    import signal
    import threading

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return fn()

    def expire(signum, frame):
        raise TimeoutError

    import time

    pending, _ = signal.getitimer(signal.ITIMER_REAL)  # a caller's own timer, re-armed after
    if pending and pending <= seconds:
        return fn()  # (it would be cut short by ours; leave the caller's in charge)
    old = signal.signal(signal.SIGALRM, expire)
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - t0), 1e-3))


def math_equal(prompts, completions, **fields) -> list[float | None]:
    """1.0 when the final answer is mathematically equal to ``answer`` (math-verify when
    installed, else numbers, then sympy on plain expressions: never ``eval`` of model text)."""
    try:  # math-verify handles LaTeX and many notations; optional
        from math_verify import parse, verify

        def same(a: str, b: str) -> bool:
            return bool(verify(parse(b), parse(a)))
    except ImportError:
        same = _math_same

    out = []
    for c, ref in zip(completions, _answers(fields, len(completions))):
        got = final_answer(c)
        out.append(None if ref is None else 1.0 if got is not None and same(got, str(ref)) else 0.0)
    return out


def think_format(prompts, completions, **fields) -> list[float | None]:
    """1.0 for exactly ``<think>…</think>`` followed by ``<answer>…</answer>``, else 0.0
    (the strict parser of :mod:`posttrain.reasoning`)."""
    return [1.0 if is_well_formatted(c) else 0.0 for c in completions]


def task_verifier(prompts, completions, **fields) -> list[float | None]:
    """1.0 when the task's own verifier accepts the answer (rows carry ``task`` and ``answer``;
    see :data:`posttrain.synth.tasks.VERIFIERS`), else 0.0; rows of unknown tasks are unscored."""
    from posttrain.synth.tasks import VERIFIERS

    answers = _answers(fields, len(completions))
    tasks = fields.get("task") or [None] * len(completions)
    extra = {k: v for k, v in fields.items() if k not in ("answer", "task")}
    out = []
    for i, (c, ref, task) in enumerate(zip(completions, answers, tasks)):
        verify = VERIFIERS.get(task)
        if verify is None or ref is None:
            out.append(None)
            continue
        out.append(1.0 if verify(c, str(ref), **{k: v[i] for k, v in extra.items()}) else 0.0)
    return out


# name -> function, for configs (``rewards: [exact_answer, think_format]``)
REWARD_FUNCTIONS = {f.__name__: f for f in (exact_answer, tagged_answer, math_equal, think_format, task_verifier)}
