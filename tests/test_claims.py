"""posttrain.synth.claims: the arithmetic a worked solution states, checked claim by claim."""

import pytest

from posttrain.synth.claims import arithmetic_errors, first_false_claim
from posttrain.synth.tasks import problems


@pytest.mark.parametrize("task", ["addition", "subtraction", "linear", "gcd", "countdown"])
def test_programmatic_solutions_have_no_errors(task):
    for split in ("train", "test"):
        for p in problems(task, 150, split, seed=3):
            assert arithmetic_errors(p.solution) == [], p.solution


@pytest.mark.parametrize("text, errors", [
    # a GCD right by luck: every step of it is false (floor 153 / 288 is 0)
    ("153 / 288 = 3, 3 * 288 = 764, remainder 153 - 764 = 9.", ["153 / 288 = 3", "3 * 288 = 764", "153 - 764 = 9"]),
    ("23 / 7 = 3, 3 * 7 = 21, remainder 23 - 21 = 2.", []),
    ("Tens: 9 + 0 + 1 (carry) = 10, write 0, carry 1.", []),
    ("Tens: 9 + 0 + 1 (carry) = 11, write 1, carry 1.", ["9 + 0 + 1 = 11"]),
    ("Ones: 4 + 8 = 12, write 3, carry 1.", ["= 12, write 3, carry 1"]),
    ("Ones: 4 + 8 = 12, write 2.", ["= 12, write 2"]),  # the carry dropped
    ("Ones: 2 < 5, borrow 1: 12 - 5 = 7.", []),
    ("Ones: 8 >= 9: 8 - 9 = 1.", ["8 - 9 = 1", "8 >= 9"]),
    ("Tens: 5 - 1 (borrowed) = 4 >= 1: 4 - 1 = 3.", []),
    ("566 = 5 hundreds + 6 tens + 6 ones.", []),
    ("566 = 5 hundreds + 7 tens + 6 ones.", ["566 = 5 hundreds + 7 tens + 6 ones"]),
    ("So -198 - 2 = -200.", []),
    ("So -198 - 2 = -196.", ["-198 - 2 = -196"]),
    # not claims of these kinds: an expression on the right, a decimal, an unknown
    ("-12 + 12 = 12 - 12.", []),
    ("-198 - 2 = -(198 + 2).", []),
    ("7 / 2 = 3.5", []),
    ("The equation is 5x - 7 = 8. Add 7 to both sides: 5x = 8 + 7.", []),
    ("No numbers here.", []),
    # numbers with thousands separators are not read (a match inside one misread them: '000 + 234 = 1')
    ("1,000 + 234 = 1,234.", []),
    ("So 1,049 - 720 = 329.", []),
    ("1000 + 234 = 1,234.", []),
])
def test_claims(text, errors):
    assert arithmetic_errors(text) == errors


@pytest.mark.parametrize("text, written, corrected", [
    ("Ones: 8 >= 9: 8 - 9 = 1.", "8 >= 9", "8 < 9"),  # the first in the text, not the first kind
    ("Tens: 9 + 0 + 1 (carry) = 11, write 1, carry 1.", "9 + 0 + 1 = 11", "9 + 0 + 1 (carry) = 10"),
    ("Ones: 4 + 8 = 12, write 2.", "= 12, write 2", "= 12, write 2, carry 1"),
    ("So 566 = 5 hundreds + 7 tens + 6 ones.", "566 = 5 hundreds + 7 tens + 6 ones", "566 = 5 hundreds + 6 tens + 6 ones"),
    ("276 / 72 = 3, 3 * 72 = 206, remainder 276 - 206 = 70.", "3 * 72 = 206", "3 * 72 = 216"),
])
def test_first_false_claim_span_and_correction(text, written, corrected):
    claim = first_false_claim(text)
    assert (claim.written, claim.corrected) == (written, corrected)
    # the span is the claim as it stands in the text given, notes included
    assert arithmetic_errors(text[claim.start:claim.end]) == [written]
    repaired = text[:claim.start] + claim.corrected
    assert first_false_claim(repaired) is None


def test_first_false_claim_none_when_all_hold():
    assert first_false_claim("23 / 7 = 3, 3 * 7 = 21, remainder 23 - 21 = 2.") is None
    assert first_false_claim("") is None


# a cold-start model's GCD step: each claim true of the digits it wrote, but the tens column
# reads 2 (the tens digit of 222) as the bottom digit where 216 has a 1
MISREAD = ("222 / 216 = 1, 1 * 216 = 216, remainder 222 - 216.\n"
           "Ones: 2 - 6: 2 < 6, borrow 1: 10 - 6 = 4, 4 + 2 = 6.\n"
           "Tens: 2 - 1 (borrowed) = 1, 1 - 2: 1 < 2, borrow 1: 10 - 2 = 8, 8 + 1 = 9.\n"
           "Hundreds: 2 - 1 (borrowed) = 1, 1 - 2: 1 < 2, borrow 1: 10 - 2 = 8, 8 + 1 = 9.\n"
           "So 222 - 216 = 996.")


@pytest.mark.parametrize("text, cut_before, corrected", [
    (MISREAD, "Tens: 2 - 1 (borrowed) = 1, 1 - ", "1"),  # the bottom digit of a borrowing column
    (("27 = 2 tens + 7 ones.\n26 = 2 tens + 6 ones.\nOnes: 7 + 6 = 13, write 3, carry 1.\n"
     "Tens: 3 + 2 = 5, 5 + 1 (carry) = 6, write 6.\nSo 27 + 26 = 63."), "Tens: ", "2"),  # the top digit
    (("Ones: 4 - 7: 4 < 7, borrow 1: 10 - 7 = 3, 3 + 4 = 7.\nTens: 9 - 1 (borrowed) = 8, 7 - 2: 7 >= 2: 7 - 2 = 5.\n"
     "So 94 - 27 = 57."), "Tens: 9 - 1 (borrowed) = 8, ", "8"),  # the lent-from digit not repeated
    (("Ones: 2 - 0: 2 >= 0: 2 - 0 = 2.\nTens: 6 - 6: 6 >= 6: 6 - 6 = 0.\nHundreds: 6 - 5: 6 >= 5: 6 - 5 = 1.\n"
     "So 662 - 60 = 102."), "Hundreds: 6 - ", "0"),  # a digit the shorter number lacks is 0
])
def test_column_operands_against_the_closing_line(text, cut_before, corrected):
    claim = first_false_claim(text)
    assert text[:claim.start] == text[:text.index(cut_before) + len(cut_before)]
    assert claim.corrected == corrected


def test_column_operands_need_a_closing_line_of_the_same_operation():
    assert arithmetic_errors(MISREAD.rsplit("\n", 1)[0]) == []  # cut before its closing line: nothing to check
    assert arithmetic_errors("Ones: 7 + 6 = 13, write 3, carry 1.\nSo 42 - 21 = 21.") == []


@pytest.mark.parametrize("text, cut_before, corrected", [
    # a count from 10 below ten times the divisor (every later claim true, counting on past 45)
    ("10 * 5 = 50, 45 < 50, so count from 10: 10: 50, 11: 50 + 5 = 55, 12: 55 + 5 = 60",
     "so count from ", "1"),
    ("10 * 3 = 30, 39 >= 30, so count from 1: 1: 3", "so count from ", "10"),
    # a count that goes on past the dividend: cut after the count that reached it
    (("10 * 3 = 30, 39 >= 30, so count from 10: 10: 30, 11: 30 + 3 = 33, 12: 33 + 3 = 36, 13: 36 + 3 = 39, "
     "14: 39 + 3 = 42.\nSo 39 / 3 = 14."), "13: 36 + 3 = 39", "."),
])
def test_counts_start_and_stop_where_the_dividend_says(text, cut_before, corrected):
    claim = first_false_claim(text)
    assert text[:claim.start] == text[:text.index(cut_before) + len(cut_before)]
    assert claim.corrected == corrected
    assert first_false_claim(text[:claim.start] + claim.corrected) is None


def test_typeset_operators_are_read_as_their_ascii_ones():
    assert arithmetic_errors("3 \u00d7 4 = 13, 12 \u00f7 4 = 3, 7 \u2212 5 = 3, 9 \u2265 10, 9 \u2264 10") == [
        "3 * 4 = 13", "7 - 5 = 3", "9 >= 10"]


def test_a_chain_of_equalities_is_checked_link_by_link():
    assert arithmetic_errors("2 + 3 = 5 = 6") == ["5 = 6"]
    assert arithmetic_errors("2 + 3 = 5 = 5 = 7.") == ["5 = 7"]
    assert arithmetic_errors("2 + 3 = 5 = 5, and 12 + 4 = 16 = 16 + 0") == []  # (an expression on the right: not read)
    claim = first_false_claim("so 2 + 3 = 5 = 6, then")
    assert claim.written == "5 = 6" and claim.corrected == " = 5"
