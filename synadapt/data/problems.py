"""One problem schema for every data set, and loaders that turn JSONL, Parquet or Hugging Face data into it.

A problem is a plain dict::

    {"id": str, "question": str, "answer": str,                  # required
     "difficulty": int | None, "long_cot": str | None, "short_cot": str | None, "source": str}

Loading never drops a bad row silently and never fails the whole load because of one: every row that cannot be
turned into a problem is reported in :attr:`LoadReport.malformed` with its 1-based line (JSONL) or row number.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synadapt.data.grading import extract_answer

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "question", "answer")
OPTIONAL_TEXT_FIELDS = ("long_cot", "short_cot")


def _number_str(value: Any, name: str) -> str:
    """Answers arrive as str, int or float (27.0 in AMC dumps); integral numbers become "27"."""
    if isinstance(value, bool):
        raise ValueError(f"invalid field {name!r}: expected a string or number, got bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    raise ValueError(f"invalid field {name!r}: expected a string or number, got {type(value).__name__}")


def _difficulty(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("invalid field 'difficulty': expected an integer, got bool")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"invalid field 'difficulty': expected an integer, got {value!r}")


def validate_problem(row: dict) -> dict:
    """The problem in ``row`` in normalised schema form (schema fields only); ValueError names the bad field."""
    problem: dict[str, Any] = {}
    for name in REQUIRED_FIELDS:
        value = row.get(name)
        if value is None:
            raise ValueError(f"missing field {name!r}")
        if name == "question" and not isinstance(value, str):
            raise ValueError(f"invalid field 'question': expected a string, got {type(value).__name__}")
        text = value.strip() if isinstance(value, str) else _number_str(value, name)
        if not text:
            raise ValueError(f"empty field {name!r}")
        problem[name] = text
    problem["difficulty"] = _difficulty(row.get("difficulty"))
    for name in OPTIONAL_TEXT_FIELDS:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"invalid field {name!r}: expected a string or null, got {type(value).__name__}")
        problem[name] = value
    source = row.get("source", "")
    if not isinstance(source, str):
        raise ValueError(f"invalid field 'source': expected a string, got {type(source).__name__}")
    problem["source"] = source
    return problem


# ---------------------------------------------------------------------------------------------------- adapters


def _first(row: dict, *keys: str) -> Any:
    """Value of the first of ``keys`` present in ``row``; data set dumps disagree on capitalisation."""
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    alternatives = f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
    raise ValueError(f"missing field {keys[0]!r}{alternatives}")


def _boxed_answer(row: dict) -> str:
    """``answer`` if the row has one, else the last ``\\boxed{}`` of ``solution``."""
    if row.get("answer") not in (None, ""):
        return _number_str(row["answer"], "answer")
    solution = row.get("solution")
    if not isinstance(solution, str):
        raise ValueError("missing field 'answer' (and no 'solution' to take a \\boxed{} answer from)")
    answer = extract_answer(solution, think_end="") if re.search(r"\\(?:boxed|fbox)", solution) else None
    if not answer:
        raise ValueError("missing field 'answer' and 'solution' has no \\boxed{} answer")
    return answer


def _generic(row: dict) -> dict:
    return dict(row)


def _gsm8k(row: dict) -> dict:
    full = _first(row, "answer")
    if not isinstance(full, str) or "####" not in full:
        raise ValueError("invalid field 'answer': no '#### <final answer>' in GSM8K answer")
    reasoning, final = full.rsplit("####", 1)
    # <<48/2=24>> are GSM8K's calculator annotations, noise for a chain of thought.
    long_cot = re.sub(r"<<[^<>]*>>", "", reasoning).strip() or None
    return {"id": row.get("id"), "question": _first(row, "question"), "answer": final.strip().rstrip("."),
            "long_cot": long_cot}


def _math(row: dict) -> dict:
    level = row.get("level")
    if isinstance(level, str):
        # MATH writes "Level 3"; a few training rows have "Level ?", which is no difficulty at all.
        digits = re.search(r"\d+", level)
        level = int(digits.group()) if digits else None
    solution = row.get("solution")
    return {"id": row.get("id", row.get("unique_id")), "question": _first(row, "problem", "question"),
            "answer": _boxed_answer(row), "difficulty": level,
            "long_cot": solution if isinstance(solution, str) else None}


def _aime(row: dict) -> dict:
    raw = _first(row, "answer", "Answer")
    text = _number_str(raw, "answer")
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError(f"invalid field 'answer': AIME answers are integers, got {raw!r}")
    return {"id": row.get("id", row.get("ID")), "question": _first(row, "problem", "Problem", "question"),
            "answer": str(int(text))}


def _amc23(row: dict) -> dict:
    return {"id": row.get("id"), "question": _first(row, "question", "problem"),
            "answer": _number_str(_first(row, "answer"), "answer")}


def _olympiadbench(row: dict) -> dict:
    final = _first(row, "final_answer")
    parts = [final] if isinstance(final, str) else list(final) if isinstance(final, (list, tuple)) else None
    if not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"invalid field 'final_answer': expected a non-empty list of strings, got {final!r}")
    solution = row.get("solution")
    if isinstance(solution, list):
        solution = "\n\n".join(s for s in solution if isinstance(s, str))
    return {"id": row.get("id"), "question": _first(row, "question"),
            "answer": ", ".join(p.strip().strip("$").strip() for p in parts),
            "long_cot": solution if isinstance(solution, str) and solution else None}


def _minerva(row: dict) -> dict:
    solution = row.get("solution")
    return {"id": row.get("id"), "question": _first(row, "problem", "question"), "answer": _boxed_answer(row),
            "long_cot": solution if isinstance(solution, str) else None}


ADAPTERS: dict[str, Callable[[dict], dict]] = {
    "generic": _generic,
    "gsm8k": _gsm8k,
    "math": _math,
    "math500": _math,
    "aime": _aime,
    "amc23": _amc23,
    "olympiadbench": _olympiadbench,
    "minerva": _minerva,
}


# ----------------------------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """Problems loaded from ``source``, and the rows that could not be: (1-based line or row number, reason)."""

    problems: list[dict]
    malformed: list[tuple[int, str]] = field(default_factory=list)
    source: str = ""
    unit: str = "line"
    """What the numbers in ``malformed`` count: "line" for JSONL, "row" for tables."""

    def summary(self, max_listed: int = 10) -> str:
        """One line: how many problems loaded, and every malformed row (up to ``max_listed``) with its reason."""
        text = f"loaded {len(self.problems)} problems from {self.source}"
        if not self.malformed:
            return text
        listed = "; ".join(f"{self.unit} {n}: {reason}" for n, reason in self.malformed[:max_listed])
        more = f"; ... and {len(self.malformed) - max_listed} more" if len(self.malformed) > max_listed else ""
        return f"{text}; {len(self.malformed)} malformed rows: {listed}{more}"


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            if isinstance(row, dict):
                yield lineno, row, ""
            else:
                yield lineno, None, f"expected a JSON object, got {type(row).__name__}"


def _table_rows(rows: Any) -> Iterator[tuple[int, dict | None, str]]:
    for number, row in enumerate(rows, 1):
        yield number, dict(row), ""


def _dataset_rows(source: str, split: str | None) -> Any:
    import datasets

    path = Path(source)
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "state.json",
                                                                  "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        return loaded[split or "test"] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(source, split=split or "test")


def load_problems(source: str, adapter: str = "generic", field_map: dict[str, str] | None = None,
                  split: str | None = None, limit: int | None = None) -> LoadReport:
    """Load problems from a ``.jsonl`` file, a ``.parquet`` file, a ``save_to_disk`` directory or a HF data set.

    ``field_map`` maps a field name the adapter reads to the source column holding it (``{"question": "problem"}``)
    and is applied before the adapter, one of :data:`ADAPTERS`. Rows without an ``id`` get ``"{stem}-{number}"``;
    rows without a ``source`` get the stem. ``split`` (default "test") only applies to data sets, and ``limit``
    stops after that many good problems. Malformed rows are collected in the report and logged, never raised.
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; choose from {sorted(ADAPTERS)}")
    adapt = ADAPTERS[adapter]
    path = Path(source)
    stem = path.stem if path.suffix in (".jsonl", ".parquet") else Path(source.rstrip("/\\")).name
    if path.suffix == ".jsonl":
        rows, unit = _jsonl_rows(path), "line"
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows, unit = _table_rows(pq.read_table(path).to_pylist()), "row"
    else:
        rows, unit = _table_rows(_dataset_rows(source, split)), "row"

    report = LoadReport(problems=[], source=str(source), unit=unit)
    for number, raw, error in rows:
        if limit is not None and len(report.problems) >= limit:
            break
        if raw is None:
            report.malformed.append((number, error))
            continue
        for name, column in (field_map or {}).items():
            if column in raw:
                raw[name] = raw[column]
        try:
            row = adapt(raw)
            if row.get("id") is None:
                row["id"] = f"{stem}-{number}"
            if not row.get("source"):
                row["source"] = stem
            report.problems.append(validate_problem(row))
        except (ValueError, TypeError, KeyError) as e:
            # A TypeError or KeyError is a row shaped unlike its adapter expects: report it like any bad row.
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            report.malformed.append((number, reason))
    if report.malformed:
        first = ", ".join(str(n) for n, _ in report.malformed[:5])
        logger.warning("%s: %d malformed rows skipped (%ss %s%s); see LoadReport.malformed", source,
                       len(report.malformed), unit, first, ", ..." if len(report.malformed) > 5 else "")
    return report


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` as JSON Lines (UTF-8, one object a line), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
