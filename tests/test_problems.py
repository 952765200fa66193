"""Problem schema and loaders: malformed rows are reported with their line numbers, every adapter on a real row."""
from __future__ import annotations

import json
import logging

import pytest

from synadapt.data.problems import ADAPTERS, LoadReport, load_problems, validate_problem, write_jsonl


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_validate_problem_normalises_and_names_bad_fields():
    p = validate_problem({"id": 3, "question": " 1+1? ", "answer": 2, "difficulty": "2", "extra": "dropped"})
    assert p == {"id": "3", "question": "1+1?", "answer": "2", "difficulty": 2, "long_cot": None,
                 "short_cot": None, "source": ""}
    with pytest.raises(ValueError, match="missing field 'answer'"):
        validate_problem({"id": "a", "question": "q"})
    with pytest.raises(ValueError, match="empty field 'question'"):
        validate_problem({"id": "a", "question": "  ", "answer": "1"})
    with pytest.raises(ValueError, match="difficulty"):
        validate_problem({"id": "a", "question": "q", "answer": "1", "difficulty": "hard"})


def test_jsonl_malformed_rows_are_reported_with_line_numbers(tmp_path, caplog):
    good = {"id": "q-1", "question": "m=4;y=m+7;?y", "answer": "1", "long_cot": "m=4,y+7=1",
            "short_cot": "4,1", "difficulty": 1}
    path = _write_lines(tmp_path / "toy.jsonl", [
        json.dumps(good),
        "",
        '{"id": "q-2", "question": "oops"',
        json.dumps({"id": "q-3", "question": "no answer"}),
        json.dumps({"question": "a=1;?a", "answer": 1}),
        json.dumps({"id": "q-5", "question": "", "answer": "2"}),
        "[1, 2]",
    ])
    with caplog.at_level(logging.WARNING):
        report = load_problems(path)
    assert [p["id"] for p in report.problems] == ["q-1", "toy-5"]
    assert report.problems[0] == {**good, "source": "toy"}
    assert report.problems[1]["answer"] == "1"
    lines = [n for n, _ in report.malformed]
    assert lines == [3, 4, 6, 7]
    reasons = dict(report.malformed)
    assert reasons[3].startswith("invalid JSON")
    assert reasons[4] == "missing field 'answer'"
    assert reasons[6] == "empty field 'question'"
    summary = report.summary()
    assert summary.startswith(f"loaded 2 problems from {path}; 4 malformed rows: line 3: invalid JSON")
    assert "line 4: missing field 'answer'" in summary
    assert "4 malformed rows" in caplog.text and "3, 4, 6, 7" in caplog.text


def test_limit_and_clean_summary(tmp_path):
    path = tmp_path / "few.jsonl"
    write_jsonl(path, [{"id": str(i), "question": f"q{i}", "answer": str(i)} for i in range(5)])
    report = load_problems(str(path), limit=3)
    assert isinstance(report, LoadReport)
    assert [p["id"] for p in report.problems] == ["0", "1", "2"]
    assert report.summary() == f"loaded 3 problems from {path}"


def test_parquet_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "question": "q1", "answer": "1", "difficulty": 2},
            {"id": "b", "question": "q2", "answer": None, "difficulty": None}]
    path = tmp_path / "probs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = load_problems(str(path))
    assert report.problems == [{"id": "a", "question": "q1", "answer": "1", "difficulty": 2, "long_cot": None,
                                "short_cot": None, "source": "probs"}]
    assert report.malformed == [(2, "missing field 'answer'")]
    assert "row 2: missing field 'answer'" in report.summary()


def test_field_map_renames_columns_before_the_adapter(tmp_path):
    path = tmp_path / "custom.jsonl"
    write_jsonl(path, [{"uid": "x1", "prompt": "What is 2+2?", "target": "4", "level": 1}])
    report = load_problems(str(path), field_map={"id": "uid", "question": "prompt", "answer": "target",
                                                 "difficulty": "level"})
    assert report.problems[0] == {"id": "x1", "question": "What is 2+2?", "answer": "4", "difficulty": 1,
                                  "long_cot": None, "short_cot": None, "source": "custom"}


def test_save_to_disk_dataset_dir(tmp_path):
    import datasets

    rows = [{"problem": "Compute $1/2+1/4$.", "solution": "We get $\\boxed{\\frac{3}{4}}$.", "level": "Level 2",
             "unique_id": "test/algebra/1.json"}]
    dataset_dir = tmp_path / "math_disk"
    datasets.Dataset.from_list(rows).save_to_disk(str(dataset_dir))
    report = load_problems(str(dataset_dir), adapter="math")
    assert report.malformed == []
    assert report.problems[0]["id"] == "test/algebra/1.json"
    assert report.problems[0]["answer"] == "\\frac{3}{4}"
    assert report.problems[0]["difficulty"] == 2
    assert report.problems[0]["source"] == "math_disk"


ADAPTER_CASES = [
    ("gsm8k",
     {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May?",
      "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                "altogether in April and May.\n#### 72"},
     {"answer": "72", "long_cot": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether "
                                  "in April and May."}),
    ("math",
     {"problem": "What is $\\frac{1}{2}$ of $\\frac{1}{3}$?", "level": "Level 1", "type": "Prealgebra",
      "solution": "Multiply: $\\frac{1}{2}\\cdot\\frac{1}{3} = \\boxed{\\frac{1}{6}}$."},
     {"answer": "\\frac{1}{6}", "difficulty": 1}),
    ("math500",
     {"problem": "Convert the point $(0,3)$ to polar coordinates.", "solution": "... $\\boxed{(3,\\frac{\\pi}{2})}$",
      "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
      "unique_id": "test/precalculus/807.json"},
     {"id": "test/precalculus/807.json", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "difficulty": 2}),
    ("aime",
     {"ID": "2024-I-2", "Problem": "There exist real numbers $x$ and $y$ ... Find $xy$.", "Solution": "...",
      "Answer": 25},
     {"id": "2024-I-2", "answer": "25"}),
    ("aime",
     {"id": 0, "problem": "Find the sum of all integer bases $b>9$ ...", "answer": "070"},
     {"id": "0", "answer": "70"}),
    ("amc23",
     {"id": 1, "question": "Cities $A$ and $B$ are $45$ miles apart ...", "answer": 27.0, "url": "..."},
     {"id": "1", "answer": "27"}),
    ("olympiadbench",
     {"id": 1606, "question": "Find all pairs $(x, y)$ ...", "solution": ["Step 1", "Step 2"],
      "final_answer": ["$(1,2)$", "$(3,4)$"], "is_multiple_answer": True, "unit": None},
     {"id": "1606", "answer": "(1,2), (3,4)", "long_cot": "Step 1\n\nStep 2"}),
    ("minerva",
     {"problem": "Preamble: ... Give the answer in seconds.", "solution": "It takes $\\boxed{2.4}$ seconds.",
      "type": "Introduction to Astronomy (8.282J Spring 2006)", "idx": 0},
     {"answer": "2.4", "long_cot": "It takes $\\boxed{2.4}$ seconds."}),
]


@pytest.mark.parametrize("adapter, row, expected", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_adapters_on_real_rows(tmp_path, adapter, row, expected):
    path = tmp_path / f"{adapter}.jsonl"
    write_jsonl(path, [row])
    report = load_problems(str(path), adapter=adapter)
    assert report.malformed == []
    (problem,) = report.problems
    assert problem["question"]
    assert {k: problem[k] for k in expected} == expected
    assert set(problem) == {"id", "question", "answer", "difficulty", "long_cot", "short_cot", "source"}


@pytest.mark.parametrize("adapter, row, reason", [
    ("gsm8k", {"question": "q", "answer": "no final answer"}, "####"),
    ("math", {"problem": "p", "solution": "no box here"}, "\\boxed"),
    ("aime", {"problem": "p", "answer": "1/2"}, "integers"),
    ("olympiadbench", {"question": "q", "final_answer": []}, "final_answer"),
    ("olympiadbench", {"question": "q", "final_answer": 3}, "final_answer"),
    ("amc23", {"answer": 1.0}, "missing field 'question' (or 'problem')"),
])
def test_adapters_report_bad_rows(tmp_path, adapter, row, reason):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [row])
    report = load_problems(str(path), adapter=adapter)
    assert report.problems == []
    assert len(report.malformed) == 1 and report.malformed[0][0] == 1
    assert reason in report.malformed[0][1]


def test_unknown_adapter_is_a_caller_error(tmp_path):
    with pytest.raises(ValueError, match="unknown adapter"):
        load_problems(str(tmp_path / "x.jsonl"), adapter="nope")
    assert "generic" in ADAPTERS


def test_data_parts_are_disjoint_cover_the_split_and_keep_every_level(tmp_path):
    from collections import Counter

    from synadapt.data.source import DataSource
    from synadapt.data.task import TaskConfig

    task = TaskConfig(train_per_level=30, val_per_level=10, test_per_level=20)
    whole = DataSource(split="train").load(task)
    parts = [DataSource(split="train", part=f"{k}/2").load(task) for k in (0, 1)]
    ids = [{p["id"] for p in part} for part in parts]
    assert not (ids[0] & ids[1]) and ids[0] | ids[1] == {p["id"] for p in whole}
    assert all(Counter(p["difficulty"] for p in part) == Counter({lv: 15 for lv in range(1, 7)}) for part in parts)
    limited = DataSource(split="train", part="1/2", limit=12).load(task)  # limit samples within the part
    assert {p["id"] for p in limited} <= ids[1] and len(limited) == 12

    path = tmp_path / "few.jsonl"
    write_jsonl(path, [{"id": str(i), "question": f"q{i}", "answer": str(i)} for i in range(7)])
    assert [p["id"] for p in DataSource(path=str(path), part="1/3").load(task)] == ["1", "4"]
    assert [p["id"] for p in DataSource(path=str(path), part="0/3", limit=2).load(task)] == ["0", "3"]
    for bad in ("2/2", "1", "a/3", "-1/2"):
        with pytest.raises(ValueError, match="data.part must be 'k/n'"):
            DataSource(split="train", part=bad).load(task)
