"""Where the AdaR1 DPO model loses accuracy (#11): per number of real operations in the question, how often it
goes long, how often it is right when short and when long, against the short and the long model on the same
questions. Reads a finished `synadapt demo` run (embedded task) and writes bench/out/adar1_routing.json.

    python bench/adar1_routing.py --run runs/demo
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig

# The evaluation parts of jobs.pipeline.evaluation_parts, in order: base model, short model, merged model, DPO model.
PARTS = {"long": "part0", "short": "part1", "dpo": "part3"}


def operations(question: str) -> int:
    """Statements after the first that apply an operator (copies such as ``n=y`` are not operations)."""
    return sum(not s.split("=")[1].isalpha() for s in question.split(";")[1:-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    args = p.parse_args()
    questions = {q["id"]: q["question"] for q in DataSource(split="test").load(TaskConfig())}
    records = {name: {r["question_id"]: r for r in pq.read_table(f"{args.run}/eval/{part}/records").to_pylist()
                      if r["method"] == "long_cot" and not r.get("error")} for name, part in PARTS.items()}
    table = defaultdict(lambda: defaultdict(int))
    for qid, r in records["dpo"].items():
        long_t, short_t = records["long"][qid]["generated_tokens"], records["short"][qid]["generated_tokens"]
        went_long = r["generated_tokens"] > (long_t + short_t) / 2  # the rule of metrics.add_long_share
        row = table[operations(questions[qid])]
        row["questions"] += 1
        row["short_model_right"] += records["short"][qid]["correct"]
        row["dpo_long"] += went_long
        row["dpo_right_when_long"] += went_long and r["correct"]
        row["dpo_right_when_short"] += (not went_long) and r["correct"]
    print("| operations | questions | short model right | DPO long | DPO right when long | DPO right when short |")
    print("|---|---|---|---|---|---|")
    for ops in sorted(table):
        t = table[ops]
        print(f"| {ops} | {t['questions']} | {t['short_model_right']} | {t['dpo_long']} | "
              f"{t['dpo_right_when_long']} / {t['dpo_long']} | {t['dpo_right_when_short']} / "
              f"{t['questions'] - t['dpo_long']} |")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "adar1_routing.json").write_text(json.dumps({"run": args.run, "by_operations": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
