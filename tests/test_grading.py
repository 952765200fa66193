"""Answer extraction and grading on real-format model outputs, including from many threads at once."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from synadapt.data.grading import answers_match, extract_answer, grade, grading_stats


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("So the total is 1,234.\n#### 1,234.", "1,234"),
    ("Thus $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("First \\boxed{3}, no wait, \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("\\fbox{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
    ("So the answer is 3.5 cm.\nDone", "3.5 cm"),
    ("We get 3-4 = -1, then 3/4 and finally 12,000", "12,000"),
    ("x = -7", "-7"),
    ("East", "East"),
    ("no digits here and far too long to be an answer by itself", None),
    ("", None),
])
def test_extract_answer_rules(text, expected):
    assert extract_answer(text) == expected


def test_only_the_text_after_the_last_think_end_counts():
    response = "<think>maybe \\boxed{3}</think>hmm</think>The answer is 5."
    assert extract_answer(response) == "5"
    assert extract_answer("<think>\\boxed{3}</think>") is None
    assert extract_answer("<think>\\boxed{3}</think>", think_end="") == "3"
    # The embedded task answers with a bare digit right after thinking.
    assert extract_answer("m=4,y+7=1,n-4=7</think>7") == "7"


def test_truncated_last_box_is_not_replaced_by_an_earlier_one():
    assert extract_answer("Say \\boxed{7}, then \\boxed{8") == "8"


@pytest.mark.parametrize("pred, gold", [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac12", "\\dfrac{1}{2}"),
    ("x=5", "5"),
    ("5\\text{ cm}", "5"),
    ("5 cm", "5"),
    ("\\text{(B)}", "B"),
    ("east", "East"),
    ("1,000", "1000"),
    ("10,\\!000", "10000"),
    ("\\$1,000", "1000"),
    ("+5", "5"),
    ("\\text{5}", "5"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
])
def test_equivalent_answers_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("7", "8"),
    ("\\frac{1}{", "0.5"),
    ("3x", "3"),
    ("west", "East"),
    (None, "5"),
    ("", "5"),
    ("100000000000000000001", "100000000000000000000"),
])
def test_different_or_malformed_answers_do_not_match(pred, gold):
    assert not answers_match(pred, gold)


def test_integers_compare_exactly():
    before = grading_stats()["int_fast_path"]
    assert answers_match("100000000000000000000", "100,000,000,000,000,000,000")
    assert not answers_match("100000000000000000001", "100000000000000000000")
    assert grading_stats()["int_fast_path"] == before + 2


def test_grade_returns_correctness_and_prediction():
    assert grade("<think>2+2=5?</think>So the answer is $\\boxed{\\dfrac{1}{2}}$.", "0.5") == (True, "\\dfrac{1}{2}")
    assert grade("Janet has 16 eggs.\n#### 18", "18") == (True, "18")
    assert grade("I am not sure, sorry, I cannot solve this problem at all.", "3") == (False, None)


CASES = [
    ("...so \\boxed{\\frac{1}{2}}", "0.5", True),
    ("Therefore \\boxed{\\dfrac{3}{4}}.", "\\frac34", True),
    ("#### 72", "72", True),
    ("The answer is 7.", "8", False),
    ("\\boxed{(1, 2)}", "(1,2)", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\boxed{\\frac{1}{}", "0.5", False),
]


def test_grading_from_threads_matches_sequential():
    """math-verify's SIGALRM timeout fails off the main thread; grading must give identical results there."""
    errors_before = grading_stats()["errors"]
    sequential = [grade(r, g)[0] for r, g, _ in CASES]
    assert sequential == [want for _, _, want in CASES]
    seen_threads = set()

    def grade_in_thread(case):
        seen_threads.add(threading.current_thread().name)
        return grade(case[0], case[1])[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(grade_in_thread, CASES * 3))
    assert threaded == sequential * 3
    assert threading.main_thread().name not in seen_threads
    assert grading_stats()["errors"] == errors_before


def test_timeout_counts_as_wrong_and_pool_recovers():
    # A 60-term sum of fractions takes sympy ~0.2 s: slow enough to miss a 10 ms limit, cheap enough to let finish.
    slow = "+".join(f"\\frac{{{i}}}{{{i + 1}}}" for i in range(1, 61))
    before = grading_stats()["timeouts"]
    assert not answers_match(slow, "0.5", timeout_s=0.01)
    assert grading_stats()["timeouts"] == before + 1
    assert answers_match("\\frac{2}{4}", "0.5")
