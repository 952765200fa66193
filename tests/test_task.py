import random

import pytest

from synadapt.data.task import TaskConfig, make_problem, make_splits, sample_problems


def _value_of(question: str) -> int:
    """Evaluate a task question independently of the generator, statement by statement."""
    env = {}
    *statements, query = question.split(";")
    for s in statements:
        name, expr = s.split("=")
        if expr.isdigit():
            env[name] = int(expr)
        elif expr.isalpha():
            env[name] = env[expr]
        else:
            var, op, operand = expr[0], expr[1], int(expr[2:])
            env[name] = {"+": env[var] + operand, "-": env[var] - operand, "*": env[var] * operand}[op] % 10
    return env[query.lstrip("?")]


def test_splits_are_deterministic_and_disjoint():
    cfg = TaskConfig(train_per_level=30, val_per_level=10, test_per_level=20)
    a, b = make_splits(cfg), make_splits(cfg)
    assert a == b
    qs = {k: {p["question"] for p in v} for k, v in a.items()}
    assert not (qs["train"] & qs["test"]) and not (qs["val"] & qs["test"]) and not (qs["train"] & qs["val"])
    assert len(a["test"]) == 20 * cfg.levels
    assert make_splits(TaskConfig(seed=1, train_per_level=30, val_per_level=10, test_per_level=20)) != a


def test_records_are_correct_and_difficulty_is_number_of_steps():
    cfg = TaskConfig(ops="+-*")
    for p in sample_problems(7, 25, cfg):
        assert set(p) >= {"id", "question", "answer", "long_cot", "short_cot", "difficulty"}
        assert int(p["answer"]) == _value_of(p["question"])
        assert p["question"].count(";") == p["difficulty"] + 1
        assert len(p["long_cot"].split(",")) == p["difficulty"] + 1
        assert p["short_cot"].split(",")[-1] == p["long_cot"].split(",")[-1].split("=")[0] + "=" + p["answer"]
        assert [s.split("=")[0] for s in p["short_cot"].split(",")] == \
            [s.split("=")[0] for s in p["question"].split(";")[1:-1]]  # the names: each step's key
        assert p["long_cot"].endswith("=" + p["answer"])
        assert len(p["short_cot"]) < len(p["long_cot"])


def test_values_short_format_is_still_selectable():
    for p in sample_problems(3, 5, TaskConfig(short_format="values")):
        assert p["short_cot"].split(",")[-1] == p["answer"] and "=" not in p["short_cot"]
    with pytest.raises(ValueError, match="short_format"):
        sample_problems(3, 1, TaskConfig(short_format="names"))


def test_ops_short_format_skips_copies_but_not_the_asked_variable():
    ops, full = (sample_problems(3, 20, TaskConfig(short_format=f)) for f in ("ops", "var_values"))
    assert [p["question"] for p in ops] == [p["question"] for p in full]  # the format never moves the draw
    for p, f in zip(ops, full):
        statements = dict(s.split("=") for s in p["question"].split(";")[1:-1])
        kept = [s.split("=")[0] for s in p["short_cot"].split(",")]
        asked = p["question"].split("?")[1]
        assert kept == [n for n in statements if not statements[n].isalpha() or n == asked]
        assert set(p["short_cot"].split(",")) <= set(f["short_cot"].split(","))
    assert sum(len(p["short_cot"]) for p in ops) < 0.8 * sum(len(p["short_cot"]) for p in full)


def test_ops_only_drops_an_asked_copy_unless_nothing_else_is_written():
    ops, only = (sample_problems(3, 30, TaskConfig(short_format=f)) for f in ("ops", "ops_only"))
    assert [p["question"] for p in only] == [p["question"] for p in ops]
    for o, p in zip(ops, only):
        statements = dict(s.split("=") for s in p["question"].split(";")[1:-1])
        set_by_op = [n for n, rhs in statements.items() if not rhs.isalpha()]
        names = [e.split("=")[0] for e in p["short_cot"].split(",")]
        assert names == (set_by_op or [p["question"].split("?")[1]])  # a chain of copies keeps its one entry
        assert p["short_cot"].split(",") == [e for e in o["short_cot"].split(",") if e.split("=")[0] in names]
        assert p["answer"] == p["short_cot"][-1]  # an asked copy holds the last written value
    assert sum(len(p["short_cot"]) for p in only) < sum(len(p["short_cot"]) for p in ops)


def test_ops_packed_is_ops_without_separators_and_keeps_the_budget():
    for steps in (0, 2):
        ops, packed = (sample_problems(3, 20, TaskConfig(short_format=f, short_steps=steps))
                       for f in ("ops", "ops_packed"))
        for o, p in zip(ops, packed):
            assert (p["question"], p["answer"]) == (o["question"], o["answer"])
            assert p["short_cot"] == o["short_cot"].replace(",", "") and "," not in p["short_cot"]
            # one-character names and values: the entries are recoverable, every third character a "="
            assert p["short_cot"][1::3] == "=" * (len(p["short_cot"]) // 3)


def test_short_steps_budget_keeps_the_first_entries_and_leaves_the_rest_to_the_answer():
    budget, ops = (sample_problems(3, 20, TaskConfig(short_format="ops", short_steps=s)) for s in (2, 0))
    assert [p["question"] for p in budget] == [p["question"] for p in ops]  # the budget never moves the draw
    for b, o in zip(budget, ops):
        assert b["short_cot"].split(",") == o["short_cot"].split(",")[:2] and b["answer"] == o["answer"]
    assert any(len(o["short_cot"].split(",")) > 2 for o in ops)  # some chains were cut
    with pytest.raises(ValueError, match="short_steps must be >= 0"):
        TaskConfig(short_steps=-1)


def test_the_shipped_reasoner_stays_valid_for_the_default_task():
    from synadapt.models.tiny import SHIPPED_DIR, TinyReasonerConfig, reasoner_dir

    assert reasoner_dir(TaskConfig(), TinyReasonerConfig()) == SHIPPED_DIR
    assert reasoner_dir(TaskConfig(short_steps=2), TinyReasonerConfig()) != SHIPPED_DIR  # other problems, other key
    assert reasoner_dir(TaskConfig(val_per_level=10), TinyReasonerConfig()) != SHIPPED_DIR  # other held-out questions
    # The reasoner never reads the train split (val and test are drawn first and do not move with it).
    assert reasoner_dir(TaskConfig(train_per_level=600), TinyReasonerConfig()) == SHIPPED_DIR
    assert make_splits(TaskConfig(train_per_level=600))["test"] == make_splits(TaskConfig())["test"]


def test_level_and_ops_knobs():
    rng = random.Random(0)
    p = make_problem(rng, 4, TaskConfig(ops="+"))
    assert "-" not in p["question"] and "*" not in p["question"] and p["difficulty"] == 4


def test_copy_share_sets_how_many_steps_are_real_operations():
    def n_ops(p):
        return sum(c in "+-*" for c in p["question"])

    assert all(n_ops(p) == 0 for p in sample_problems(1, 10, TaskConfig(copy_share=1.0)))
    assert all(n_ops(p) == p["difficulty"] for p in sample_problems(1, 10, TaskConfig(copy_share=0.0)))
    level6 = [p for p in sample_problems(1, 300, TaskConfig()) if p["difficulty"] == 6]
    mean_ops = sum(map(n_ops, level6)) / len(level6)
    assert 3.2 < mean_ops < 4.0  # Binomial(6, 0.6)
    for p in level6:
        assert int(p["answer"]) == _value_of(p["question"])
