"""The issue targets of the Foundation, SynAdapt and AdaR1, measured from ONE pipeline run (all ratios on the same questions).

    python bench/targets.py --run runs/demo          # reads a finished `synadapt demo` run
    python bench/targets.py --run runs/demo --fresh  # runs the pipeline first (the default config)

Prints each target with its measured value and PASS/MISS, and writes bench/out/targets.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def measure(run: Path) -> list[dict]:
    res = json.loads((run / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    st = res.get("stages", {})
    out = []

    def target(name, value, ok, detail=""):
        out.append({"target": name, "value": value, "pass": bool(ok) if value is not None else None, "detail": detail})

    syn = st.get("synthesize", {})
    if syn:
        share = syn["converged"] / max(1, syn["converged"] + syn["failed_to_converge"])
        target("stage 1: >= 95% of training questions converge", round(share, 3), share >= 0.95,
               f"median steps {syn.get('median_steps')}")
    ctl = st.get("synthesize_wrong_targets", {})
    if ctl.get("wrong_over_gold_loss_dcot") is not None:
        r = ctl["wrong_over_gold_loss_dcot"]
        target("stage 1: final L_dcot wrong / gold >= 3", round(r, 2), r >= 3,
               f"gold {ctl['gold_mean_final_loss_dcot']:.3f}, wrong {ctl['wrong_mean_final_loss_dcot']:.3f}, "
               f"wrong targets converged {ctl['wrong_converged_share']:.2f}")
    long, nothink = rows.get("long_cot"), rows.get("nothink")
    if long and nothink:  # Foundation: the teacher solves every level; answering directly degrades gradually
        levels = sorted(long["by_difficulty"], key=int)
        worst = min(long["by_difficulty"][k]["accuracy"] for k in levels)
        target("long_cot accuracy >= 95% at every level", worst, worst >= 0.95,
               " ".join(f"L{k} {long['by_difficulty'][k]['accuracy']:.2f}" for k in levels))
        direct = [nothink["by_difficulty"][k]["accuracy"] for k in levels]
        target("nothink >= 80% at level 1, <= 30% at the hardest", direct[0], direct[0] >= 0.80 and direct[-1] <= 0.30,
               " ".join(f"L{k} {a:.2f}" for k, a in zip(levels, direct)))
        gradual = all(a >= b for a, b in zip(direct, direct[1:])) and sum(0.3 < a < 0.8 for a in direct) >= 2
        target("nothink declines gradually (monotone, >= 2 levels in between)", gradual, gradual)
    if "ccot" in rows and nothink:
        d = rows["ccot"]["accuracy"] - nothink["accuracy"]
        target("ccot accuracy >= nothink + 10 points", round(d * 100, 1), d >= 0.10)
    if "ccot" in rows and "ccot_zeroed" in rows:
        d = rows["ccot"]["accuracy"] - rows["ccot_zeroed"]["accuracy"]
        target("ccot accuracy >= zeroed-latent control + 10 points", round(d * 100, 1), d >= 0.10)
    if "ccot" in rows and long:
        r = rows["ccot"]["mean_generated_tokens"] / long["mean_generated_tokens"]
        target("ccot generated tokens <= 10% of long_cot", round(r, 3), r <= 0.10)
    clf = st.get("train_classifier", {})
    if clf:
        ours = clf["f1_ours"]
        target("classifier hard-class F1 >= 0.75 and above both baselines", round(ours, 3),
               ours >= 0.75 and ours > clf["f1_question_only"] and ours > clf["f1_answer_perplexity"],
               f"question-only {clf['f1_question_only']:.3f}, answer perplexity {clf['f1_answer_perplexity']:.3f}")
    s5 = rows.get("synadapt@0.5")
    if s5 and long:
        acc, tok = s5["accuracy"] / long["accuracy"], s5["mean_generated_tokens"] / long["mean_generated_tokens"]
        target("synadapt@0.5 accuracy >= 97% of long_cot", round(acc, 3), acc >= 0.97)
        target("synadapt@0.5 generated tokens <= 40% of long_cot", round(tok, 3), tok <= 0.40)
        target("synadapt@0.5 Rel-G >= 2.5", round(s5["rel_g"], 2) if s5["rel_g"] else None,
               (s5["rel_g"] or 0) >= 2.5)
    dpo = rows.get("adar1_dpo")
    if dpo and long:
        acc, tok = dpo["accuracy"] / long["accuracy"], dpo["mean_generated_tokens"] / long["mean_generated_tokens"]
        target("adar1_dpo accuracy >= 98% of long_cot", round(acc, 3), acc >= 0.98)
        target("adar1_dpo generated tokens <= 50% of long_cot", round(tok, 3), tok <= 0.50)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="pipeline run directory")
    p.add_argument("--fresh", action="store_true", help="run the pipeline into --run first")
    args = p.parse_args()
    if args.fresh:
        from jobs.pipeline import PipelineConfig, run_pipeline

        run_pipeline(PipelineConfig(out=args.run))
    targets = measure(Path(args.run))
    for t in targets:
        flag = {True: "PASS", False: "MISS", None: "n/a"}[t["pass"]]
        print(f"{flag:4}  {t['target']:<58} {t['value']!s:>8}  {t['detail']}")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "targets.json").write_text(json.dumps({"run": args.run, "targets": targets}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
