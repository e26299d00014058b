"""Arithmetic generator: worked solutions verify, perturbed answers do not, splits are disjoint."""

from posttrain.synth.tasks import (arithmetic_problems, extract_answer, solve_addition, solve_subtraction,
                                   verify_arithmetic)


def test_worked_solutions_verify_and_perturbations_fail():
    for p in arithmetic_problems(200, "train", seed=1):
        assert verify_arithmetic(p.solution, p.answer)
        assert not verify_arithmetic(p.solution.replace(f"<answer>{p.answer}</answer>",
                                                        f"<answer>{int(p.answer) + 1}</answer>"), p.answer)
        assert p.solution.startswith("<think>\n") and "</think>\n<answer>" in p.solution


def test_column_procedures_by_hand():
    text, result = solve_addition(478, 356)
    assert result == 834
    assert text.splitlines()[0] == "Ones: 8 + 6 = 14, write 4, carry 1."
    text, result = solve_subtraction(503, 278)
    assert result == 225
    assert "borrow" in text.splitlines()[0]


def test_splits_are_disjoint():
    train = {p.question for p in arithmetic_problems(500, "train", seed=0)}
    test = {p.question for p in arithmetic_problems(100, "test", seed=7)}
    assert not train & test and len(test) == 100


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
