"""Answer extraction and grading for math problems.

Grading is called from Ray actors and thread pools, where math-verify's own SIGALRM-based timeout either raises or
quietly returns False for every answer. So math-verify always runs here with its timeouts disabled, inside a
module-level thread pool, and this module enforces the time limit itself.
"""
from __future__ import annotations

import concurrent.futures
import logging
import re
import threading

logger = logging.getLogger(__name__)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_KEY_RE = re.compile(r"answer\s+is|answer\s*:", re.IGNORECASE)
_ANSWER_VALUE_RE = re.compile(r"[\s:*]*(.+?)(?=\n|\.\s|\.?$)", re.MULTILINE)
# A minus sign right after a word or ")" is subtraction ("3-4"), not a negative number.
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+/\d+|\d+(?:\.\d+)?|\.\d+)"
)
_INT_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)")
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{(.*)\}$", re.DOTALL)
_TRAILING_TEXT_UNIT_RE = re.compile(r"^(.*\S)\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}$", re.DOTALL)
# Unit words must be separated from the number by a space, so "3x" stays an expression rather than "3".
_NUMBER_WITH_UNIT_RE = re.compile(r"^([+-]?[\d.,/]*\d)(?:\s+[A-Za-z]+\.?(?:\^\{?\d\}?)?)+$")
_WORDS_RE = re.compile(r"^\(?([A-Za-z][A-Za-z ]*)\)?$")

# Threads cannot be killed, so a timed-out job keeps its worker until sympy gives up; a generous pool keeps a few
# pathological answers from starving everyone else.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grading")
_STATS = {"calls": 0, "int_fast_path": 0, "timeouts": 0, "errors": 0}
_STATS_LOCK = threading.Lock()


def _bump(key: str) -> None:
    with _STATS_LOCK:
        _STATS[key] += 1


def grading_stats() -> dict[str, int]:
    """Counts since import: ``calls`` to answers_match, ``int_fast_path`` hits, ``timeouts`` and ``errors``."""
    with _STATS_LOCK:
        return dict(_STATS)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}``, or None if there is none or it is never closed."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    depth = 1
    for i in range(starts[-1], len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[starts[-1]:i].strip()
    return None


def extract_answer(text: str, think_end: str = "</think>") -> str | None:
    """Final answer in a model response, or None if there is none.

    Only the text after the last ``think_end`` counts, so answers tried while thinking are ignored. Then the first
    rule that applies wins: last ``\\boxed{}``/``\\fbox{}``; text after the last ``####``; "the answer is X" or
    "answer: X"; the last number; the whole remaining text if it is short (<= 32 chars, one line).
    """
    if not text:
        return None
    if think_end and think_end in text:
        text = text.rsplit(think_end, 1)[1]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        tail = tail.splitlines()[0].strip() if tail else ""
        return tail.rstrip(".").strip() or None
    # The last statement wins, so "Final Answer: The final answer is $5$" gives 5, not "The final answer is $5$".
    for key in reversed(list(_ANSWER_KEY_RE.finditer(text))):
        stated = _ANSWER_VALUE_RE.match(text, key.end())
        answer = stated.group(1).strip().strip("*").strip().strip("$").strip().rstrip(".").strip() if stated else ""
        if answer:
            return answer
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1]
    rest = text.strip()
    if rest and len(rest) <= 32 and "\n" not in rest:
        return rest
    return None


def _normalise(answer: str) -> str:
    """Drop dollars, LaTeX spacing, a trailing unit and an enclosing ``\\text{}``: what both sides share."""
    s = answer.replace("\\$", "").strip().strip("$").strip()
    if s.startswith(("\\(", "\\[")) and s.endswith(("\\)", "\\]")):
        s = s[2:-2].strip()
    # MATH writes thousands as 10,\\!000 or 10{,}000.
    s = re.sub(r"\\[!,;]", "", s).replace("\\ ", " ").replace("{,}", ",").rstrip(".").strip()
    m = _TRAILING_TEXT_UNIT_RE.match(s)
    if m and "\\text" not in m.group(1) and "\\mbox" not in m.group(1):
        s = m.group(1).strip()
    m = _TEXT_WRAP_RE.match(s)
    if m:
        s = m.group(1).strip()
    m = _NUMBER_WITH_UNIT_RE.match(s)
    if m:
        s = m.group(1)
    return s


def _as_int(s: str) -> int | None:
    s = s.replace(" ", "")
    return int(s.replace(",", "")) if _INT_RE.fullmatch(s) else None


def _wrap_for_latex(s: str) -> str:
    return s if "$" in s or "\\boxed" in s else f"${s}$"


def _math_verify(pred: str, gold: str) -> bool:
    # Imported lazily: sympy and the LaTeX grammar take a second to load and most callers hit the int fast path.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(_wrap_for_latex(gold), extraction_config=config, parsing_timeout=None)
    pred_parsed = parse(_wrap_for_latex(pred), extraction_config=config, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def answers_match(pred: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether ``pred`` is mathematically the same answer as ``gold``. Never raises.

    Integers compare exactly as Python ints (no float tolerance, so 21-digit answers are safe). Pure words compare
    case-insensitively ("east" == "East", "\\text{(B)}" == "B"). Everything else goes to math-verify, limited to
    ``timeout_s`` seconds; a timeout or an error counts as wrong and is tallied in :func:`grading_stats`.
    """
    _bump("calls")
    if pred is None or not str(pred).strip():
        return False
    p, g = _normalise(str(pred)), _normalise(str(gold))
    p_int, g_int = _as_int(p), _as_int(g)
    if p_int is not None and g_int is not None:
        _bump("int_fast_path")
        return p_int == g_int
    if p == g and p:
        return True
    p_words, g_words = _WORDS_RE.match(p), _WORDS_RE.match(g)
    if p_words and g_words:
        return " ".join(p_words.group(1).lower().split()) == " ".join(g_words.group(1).lower().split())
    future = _POOL.submit(_math_verify, p, g)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        _bump("timeouts")
        logger.warning("grading timed out after %gs: pred=%.80r gold=%.80r", timeout_s, p, g)
        return False
    except Exception:  # a grader must never take down a rollout or eval worker
        _bump("errors")
        logger.warning("grading failed: pred=%.80r gold=%.80r", p, g, exc_info=True)
        return False


def grade(response: str, gold: str, think_end: str = "</think>", timeout_s: float = 5.0) -> tuple[bool, str | None]:
    """Extract the answer from a model ``response`` and check it against ``gold``: (correct, extracted answer)."""
    pred = extract_answer(response, think_end=think_end)
    return answers_match(pred, gold, timeout_s=timeout_s), pred
