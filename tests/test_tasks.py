"""Arithmetic generator: worked solutions verify, perturbed answers do not, splits are disjoint."""

from posttrain.synth.tasks import (
    arithmetic_problems,
    extract_answer,
    solve_addition,
    solve_subtraction,
    verify_arithmetic,
)


def test_worked_solutions_verify_and_perturbations_fail():
    for p in arithmetic_problems(200, "train", seed=1):
        assert verify_arithmetic(p.solution, p.answer)
        assert not verify_arithmetic(p.solution.replace(f"<answer>{p.answer}</answer>",
                                                        f"<answer>{int(p.answer) + 1}</answer>"), p.answer)
        assert p.solution.startswith("<think>\n") and "</think>\n<answer>" in p.solution


def test_column_procedures_by_hand():
    text, result = solve_addition(478, 356)
    assert result == 834
    assert text.splitlines() == ["478 = 4 hundreds + 7 tens + 8 ones.", "356 = 3 hundreds + 5 tens + 6 ones.",
                                 "Ones: 8 + 6 = 14, write 4, carry 1.",
                                 "Tens: 7 + 5 = 12, 12 + 1 (carry) = 13, write 3, carry 1.",
                                 "Hundreds: 4 + 3 = 7, 7 + 1 (carry) = 8, write 8."]
    text, result = solve_subtraction(503, 278)
    assert result == 225
    assert text.splitlines()[2:] == ["Ones: 3 - 8: 3 < 8, borrow 1: 10 - 8 = 2, 2 + 3 = 5.",
                                     "Tens: 0 - 1 (borrowed) = -1, -1 - 7: -1 < 7, borrow 1: 9 - 7 = 2.",
                                     "Hundreds: 5 - 1 (borrowed) = 4, 4 - 2: 4 >= 2: 4 - 2 = 2."]


def test_signed_arithmetic_by_hand():
    """Signed sums inside linear equations reduce to the column methods, sign written first."""
    from posttrain.synth.tasks import solve_signed

    text, v = solve_signed(-16, "-", 22)
    assert v == -38 and text.splitlines()[0] == "-16 - 22 = -(16 + 22)." and text.endswith("So 16 + 22 = 38 and -16 - 22 = -38.")
    text, v = solve_signed(-30, "+", 5)
    assert v == -25 and text.splitlines()[0] == "-30 + 5 = -(30 - 5)."
    text, v = solve_signed(8, "-", 28)
    assert v == -20 and text.splitlines()[0] == "8 - 28 = -(28 - 8)."
    text, v = solve_signed(-6, "+", 17)
    assert v == 11 and text.splitlines()[0] == "-6 + 17 = 17 - 6."
    text, v = solve_signed(17, "+", 28)
    assert v == 45 and text.splitlines()[0] == "17 = 1 tens + 7 ones." and "carry 1" in text
    assert solve_signed(-3, "+", 5) == ("-3 + 5 = 2.", 2)  # single digits: one line
    for a in range(-250, 251, 7):
        for b in range(0, 40, 3):
            assert solve_signed(a, "+", b)[1] == a + b and solve_signed(a, "-", b)[1] == a - b


def test_linear_and_gcd_solutions_by_hand():
    from posttrain.synth.tasks import _split_of, gcd_problem, linear_problem

    class Draws:  # a random.Random stand-in returning fixed draws
        def __init__(self, ints, choices=()):
            self.ints, self.choices = list(ints), list(choices)

        def randint(self, lo, hi):
            return self.ints.pop(0)

        def choice(self, seq):
            return self.choices.pop(0)

    p = linear_problem(Draws([5, 9, -28]), _split_of("lin5,9,-28"))
    assert p.question == "Solve for x: 5x - 28 = 17." and p.answer == "9"
    lines = p.solution.splitlines()
    assert lines[2] == "Add 28 to both sides: 5x = 17 + 28." and "So 17 + 28 = 45." in lines
    assert lines[-5:-2] == ["Divide both sides by 5: x = 45 / 5.",
                            ("10 * 5 = 50, 45 < 50, so count from 1: 1: 5, 2: 5 + 5 = 10, 3: 10 + 5 = 15, 4: 15 + 5 = 20, "
                            "5: 20 + 5 = 25, 6: 25 + 5 = 30, 7: 30 + 5 = 35, 8: 35 + 5 = 40, 9: 40 + 5 = 45."),
                            "So 45 / 5 = 9 and x = 9."]
    p = gcd_problem(Draws([23, 24], [12]), _split_of("gcd276,288"))
    assert p.question == "What is the greatest common divisor of 276 and 288?" and p.answer == "12"
    assert p.solution.splitlines()[2:5] == ["288 / 276 = 1, 1 * 276 = 276, remainder 288 - 276 = 12.",
                                            "276 / 12 = 23, 23 * 12 = 276, remainder 276 - 276 = 0.",
                                            "The last non-zero remainder is 12."]


def test_count_up_by_hand():
    """Division by counting in d's, from 1 or from 10 when 10 d does not pass n."""
    from posttrain.synth.claims import arithmetic_errors
    from posttrain.synth.tasks import count_up

    assert count_up(42, 6) == (("10 * 6 = 60, 42 < 60, so count from 1: 1: 6, 2: 6 + 6 = 12, 3: 12 + 6 = 18, "
                               "4: 18 + 6 = 24, 5: 24 + 6 = 30, 6: 30 + 6 = 36, 7: 36 + 6 = 42.\nSo 42 / 6 = 7."), 7)
    assert count_up(65, 5) == (("10 * 5 = 50, 65 >= 50, so count from 10: 10: 50, 11: 50 + 5 = 55, 12: 55 + 5 = 60, "
                               "13: 60 + 5 = 65.\nSo 65 / 5 = 13."), 13)
    assert count_up(120, 12)[0] == "10 * 12 = 120, 120 >= 120, so count from 10: 10: 120.\nSo 120 / 12 = 10."
    assert count_up(7, 7)[0] == "10 * 7 = 70, 7 < 70, so count from 1: 1: 7.\nSo 7 / 7 = 1."
    for d in range(2, 13):
        for q in range(1, 21):
            text, got = count_up(d * q, d)
            assert got == q and not arithmetic_errors(text)


def test_euclid_step_by_hand():
    """A Euclid step works a borrowing remainder in columns, and only such a remainder."""
    from posttrain.synth.claims import arithmetic_errors
    from posttrain.synth.tasks import borrows, euclid_step

    assert euclid_step(348, 276) == ("348 / 276 = 1, 1 * 276 = 276, remainder 348 - 276.\n"
                                     "Ones: 8 - 6: 8 >= 6: 8 - 6 = 2.\n"
                                     "Tens: 4 - 7: 4 < 7, borrow 1: 10 - 7 = 3, 3 + 4 = 7.\n"
                                     "Hundreds: 3 - 1 (borrowed) = 2, 2 - 2: 2 >= 2: 2 - 2 = 0.\n"
                                     "So 348 - 276 = 72.")
    assert euclid_step(276, 72) == "276 / 72 = 3, 3 * 72 = 216, remainder 276 - 216 = 60."
    assert euclid_step(216, 72) == "216 / 72 = 3, 3 * 72 = 216, remainder 216 - 216 = 0."
    assert euclid_step(9, 4) == "9 / 4 = 2, 2 * 4 = 8, remainder 9 - 8 = 1."
    assert borrows(100, 98) and borrows(13, 7) and not borrows(276, 216) and not borrows(99, 99)
    for n in range(10, 400, 7):
        for d in range(2, n, 11):
            assert not arithmetic_errors(euclid_step(n, d)), (n, d)


def test_division_line_by_hand():
    """One Euclid step: quotient, product, remainder as a difference."""
    from posttrain.synth.tasks import division_line

    assert division_line(23, 7) == "23 / 7 = 3, 3 * 7 = 21, remainder 23 - 21 = 2."
    assert division_line(108, 12) == "108 / 12 = 9, 9 * 12 = 108, remainder 108 - 108 = 0."


def test_splits_are_disjoint():
    train = {p.question for p in arithmetic_problems(500, "train", seed=0)}
    test = {p.question for p in arithmetic_problems(100, "test", seed=7)}
    assert not train & test and len(test) == 100


def test_a_sum_and_its_commuted_twin_share_a_split():
    """'What is 45 + 80?' in training makes 'What is 80 + 45?' no held-out question."""
    def operands(ps):
        return {frozenset((p.meta["a"], p.meta["b"])) for p in ps if p.meta["op"] == "+"}

    train = operands(arithmetic_problems(2000, "train", seed=0, ops="+"))
    test = operands(arithmetic_problems(400, "test", seed=0, ops="+"))
    assert len(test) > 300 and not train & test


def test_extract_answer_and_bad_responses():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer("no tags") is None
    assert not verify_arithmetic("<answer>forty</answer>", "40")
    assert verify_arithmetic("<answer>1,234</answer>", "1234")


def test_corrupted_solutions_are_wrong_and_labelled():
    import random

    from posttrain.synth.tasks import corrupt_solution, extract_answer, reasoning_steps, step_row

    rng = random.Random(0)
    for p in arithmetic_problems(60, "train", seed=3):
        steps, labels, text = corrupt_solution(p, rng)
        assert not verify_arithmetic(text, p.answer) and extract_answer(text) is not None
        assert len(steps) == len(labels) == len(reasoning_steps(p.solution))
        k = labels.index(0)  # first wrong step: a column, everything after it wrong as well
        assert labels == [1] * k + [0] * (len(steps) - k) and steps[:k] == reasoning_steps(p.solution)[:k]
        assert step_row(p, rng, wrong=False)["labels"] == [1] * len(steps)


# --------------------------------------------------------------------------- reasoning format and other tasks

import pytest

from posttrain.reasoning import parse_reasoning
from posttrain.synth.tasks import TASKS, VERIFIERS, problems


@pytest.mark.parametrize("text,error", [
    ("<think>\nadd\n</think>\n<answer>5</answer>", None),
    ("  <think>a</think>   <answer> 5 </answer>\n", None),
    ("The answer is 5.", "no <think> block"),
    ("<think>a<answer>5</answer>", "<think> is never closed"),
    ("Sure! <think>a</think><answer>5</answer>", "text before <think>"),
    ("<think>a</think> so 5", "no <answer> block"),
    ("<think>a</think><answer>5", "<answer> is never closed"),
    ("<think>a</think><answer>5</answer> Done!", "text after </answer>"),
    ("<think>a</think> hmm <answer>5</answer>", "text between </think> and <answer>"),
    ("<think>  </think><answer>5</answer>", "empty <think> block"),
    ("<think>a</think><answer> </answer>", "empty <answer>"),
])
def test_parser_is_strict_and_says_why(text, error):
    p = parse_reasoning(text)
    assert p.error == error
    if error is None:
        assert p.answer == "5" and p.think
    # the lenient parser only needs an answer block
    has_answer = "<answer>" in text and error not in ("<answer> is never closed", "empty <answer>")
    assert (parse_reasoning(text, strict=False).answer == "5") == has_answer


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_verifies_its_worked_solution_and_rejects_perturbations(task):
    train, test = problems(task, 40, "train", seed=2), problems(task, 20, "test", seed=2)
    assert not {p.question for p in train} & {p.question for p in test}  # disjoint splits
    for p in train + test:
        row = p.as_prompt_row()
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer", "task")}
        assert VERIFIERS[task](p.solution, p.answer, **extra), p.solution
        assert parse_reasoning(p.solution).ok
        wrong = p.solution.replace(f"<answer>{p.answer}</answer>", "<answer>12345</answer>")
        assert not VERIFIERS[task](wrong, p.answer, **extra)


def test_task_verifiers_by_hand():
    assert VERIFIERS["linear"]("<think>t</think><answer>x = -3</answer>", "-3")
    assert VERIFIERS["gcd"]("<think>t</think><answer>6</answer>", "6")
    # countdown: any expression over the allowed numbers that reaches the target, each number at most once
    ok = VERIFIERS["countdown"]
    assert ok("<think>t</think><answer>5 * 5 + 2 + 1</answer>", "(1 + 2) + (5 * 5)", numbers=[1, 2, 5, 5], target=28)
    assert not ok("<think>t</think><answer>5 * 5 + 3</answer>", "x", numbers=[1, 2, 5], target=28)  # 3 not given
    assert not ok("<think>t</think><answer>5 * 5 * 5</answer>", "x", numbers=[5, 5], target=125)  # 5 used 3 times
    assert not ok("<think>t</think><answer>__import__('os')</answer>", "1 + 1", numbers=[1, 1], target=2)


@pytest.mark.parametrize("written, ok", [
    ("1,234", True), ("1234", True), ("+1234", True), ("1234.", True), (" 1234 ", True),
    ("12,34", False), ("1 234", False), ("1234.5", False), ("1,2345", False), ("x = 1234", False),
])
def test_integer_answers_as_they_may_be_written(written, ok):
    from posttrain.synth.tasks import VERIFIERS

    assert VERIFIERS["addition"](f"<answer>{written}</answer>", "1234") == ok
    assert VERIFIERS["gcd"](f"<answer>{written}</answer>", "1234") == ok
    linear = VERIFIERS["linear"]
    assert linear(f"<answer>{written}</answer>", "1234") == (ok or written == "x = 1234")
    assert linear("<answer>X = -3.</answer>", "-3") and linear("<answer>x=-3</answer>", "-3")
    assert not linear("<answer>y = -3</answer>", "-3")


def test_verdicts_on_adversarial_answers():
    """Exact numbers (no float rounding), a trailing comma, an empty answer block, stray closing
    tags, long or deep answers, a reference that is no integer, a 'response' row field."""
    from posttrain.rewards.functions import exact_answer, math_equal, tagged_answer

    def ex(text, ref, fn=exact_answer):
        return fn(None, [text], answer=[ref])[0]

    assert ex("<answer>10000000000000001</answer>", "10000000000000000") == 0.0
    assert ex("<answer>" + "9" * 150 + "</answer>", "8" * 150) == 0.0
    assert ex("The total is 12, so we are done.", "12") == 1.0 and ex("it is 1,234.", "1234") == 1.0
    assert ex("it is 1,0000", "0") == 0.0 and ex("values 1,2,3", "3") == 0.0  # no number: malformed commas
    assert ex("Result: \u22127", "-7") == 1.0
    assert ex("<think>x</think><answer></answer> 5", "5") == 0.0  # the block is the answer, empty
    assert ex("<answer>+5</answer>", "5", tagged_answer) == 1.0 and ex("<answer>\u22125</answer>", "-5") == 1.0
    bad = parse_reasoning("<think>a</think><answer>5</answer> Actually it is 7. </answer>")
    assert not bad.ok and bad.error == "nested or repeated tags"
    assert not parse_reasoning("<think>a</think>b</think><answer>5</answer>").ok
    for task in ("addition", "countdown"):
        q = problems(task, 1, "test")[0]
        assert not VERIFIERS[task]("<think>x</think><answer>" + "1+" * 5000 + "1</answer>", q.answer, **q.meta)
    assert not VERIFIERS["addition"]("<think>x</think><answer>" + "1" * 4400 + "</answer>", "5")
    with pytest.raises(ValueError, match="reference answer '5.0' is not an integer"):
        VERIFIERS["addition"]("<think>x</think><answer>5</answer>", "5.0")
    q = problems("addition", 1, "test")[0]  # a row field named like the verifier's own argument
    assert VERIFIERS["addition"](f"<think>x</think><answer>{q.answer}</answer>", q.answer, response="other")
    import time

    t0 = time.perf_counter()
    assert ex("<answer>((9^999)^999)^999</answer>", "1", math_equal) == 0.0
    assert time.perf_counter() - t0 < 10  # the symbolic comparison is cut off (2 s), not run for ever
    import signal

    signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 30.0)  # a caller's own timer survives the comparison's
    try:
        assert ex("<answer>x*(x+1)</answer>", "x**2+x", math_equal) == 1.0
        assert 20 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
