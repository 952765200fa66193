import json

import pytest

from synadapt.config import describe, load_config
from jobs.pipeline import PipelineConfig
from synadapt.eval.metrics import add_long_share, markdown_table, summarize, with_rel_g, write_results


def _records(accs, tokens, level):
    return [{"correct": a, "generated_tokens": t, "forward_positions": t + 10, "seconds": 0.01, "difficulty": level}
            for a, t in zip(accs, tokens)]


def test_rows_rel_g_and_results_files(tmp_path):
    long = summarize("long_cot", _records([1, 1, 1, 0], [40, 40, 40, 40], 1) + _records([1, 1], [80, 80], 2))
    fast = summarize("nothink", _records([1, 0, 1, 0], [2, 2, 2, 2], 1) + _records([0, 0], [2, 2], 2))
    assert long["accuracy"] == pytest.approx(5 / 6) and long["by_difficulty"]["2"]["mean_generated_tokens"] == 80
    rows = with_rel_g([long, fast])
    assert rows[0]["rel_g"] == pytest.approx(1.0)
    assert rows[1]["rel_g"] == pytest.approx(((2 / 6) / (5 / 6)) / (2 / (320 / 6)))
    path = write_results(tmp_path, "t", "m", rows)
    data = json.loads(path.read_text())
    assert [r["method"] for r in data["rows"]] == ["long_cot", "nothink"]
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_vs_forward_positions.png").exists()
    assert "| nothink |" in markdown_table(rows) and "L2" in markdown_table(rows)
    with pytest.raises(ValueError, match="no records"):
        summarize("empty", [])


def test_long_share_is_per_question_midpoint_by_level():
    # Long CoT writes 40 tokens at level 1 and 80 at level 2, the short model 10 and 20: midpoints 25 and 50.
    recs = [{"question_id": q, "difficulty": lv, "correct": 1, "generated_tokens": t, "forward_positions": t,
             "seconds": 0.0} for q, lv, t in [("a", 1, 12), ("b", 1, 30), ("c", 2, 45), ("d", 2, 70), ("x", 2, 99)]]
    long_tok, short_tok = {"a": 40, "b": 40, "c": 80, "d": 80}, {"a": 10, "b": 10, "c": 20, "d": 20}
    row = add_long_share(summarize("adar1_dpo", recs), recs, long_tok, short_tok)
    assert row["long_share"] == 0.5  # "x" has no reference and is left out
    assert row["by_difficulty"]["1"]["long_share"] == 0.5 and row["by_difficulty"]["2"]["long_share"] == 0.5
    assert "Share of long responses" in markdown_table([row])
    with pytest.raises(ValueError, match="no question has both"):
        add_long_share(summarize("m", recs), recs, long_tok, {})


def test_config_yaml_overrides_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("out: runs/x\ntask:\n  levels: 4\nreasoner:\n  lr: 1\n")
    cfg = load_config(PipelineConfig, f, ["--task.levels", "3", "--evaluate.generation.max_new_tokens=12"])
    assert cfg.out == "runs/x" and cfg.task.levels == 3 and cfg.evaluate.generation.max_new_tokens == 12
    assert cfg.reasoner.lr == 1.0 and isinstance(cfg.reasoner.lr, float)
    assert cfg.task.ops == "+-"  # untouched nested defaults survive a partial section
    with pytest.raises(ValueError, match="task.levelz"):
        load_config(PipelineConfig, None, ["--task.levelz", "3"])
    with pytest.raises(ValueError, match="must be int"):
        load_config(PipelineConfig, None, {"task": {"levels": "many"}})
    # YAML 1.1 reads 4e-4 (no dot) as a string; a float field takes it as the number, and still names a bad value.
    assert load_config(PipelineConfig, None, ["--reasoner.lr", "4e-4"]).reasoner.lr == 4e-4
    with pytest.raises(ValueError, match="reasoner.lr.*must be float"):
        load_config(PipelineConfig, None, ["--reasoner.lr", "fast"])
    help_lines = "\n".join(describe(PipelineConfig))
    assert "--task.levels (default 6)" in help_lines and "Difficulty levels" in help_lines
