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
        target("stage 1: final L_dcot wrong / gold >= 5", round(r, 2), r >= 5,
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
    ccot = rows.get("ccot")
    controls = [rows[c] for c in ("nothink", "ccot_zeroed", "ccot_shuffled") if c in rows]
    if ccot and controls:  # SynAdapt (#10): the latents must carry content the controls cannot
        best = max(controls, key=lambda r: r["accuracy"])
        d = ccot["accuracy"] - best["accuracy"]
        target("ccot >= max(nothink, zeroed, shuffled) + 15 points", round(d * 100, 1), d >= 0.15,
               f"ccot {ccot['accuracy']:.3f}, best control {best['method']} {best['accuracy']:.3f}")
        levels = [k for k in sorted(ccot["by_difficulty"], key=int) if int(k) >= 3]
        margins = [ccot["by_difficulty"][k]["accuracy"] - max(c["by_difficulty"][k]["accuracy"] for c in controls)
                   for k in levels]
        target("ccot above every control at every level >= 3", round(min(margins) * 100, 1) if margins else None,
               all(m > 0 for m in margins), " ".join(f"L{k} {m * 100:+.0f}" for k, m in zip(levels, margins)))
    if ccot and long:
        r = ccot["mean_generated_tokens"] / long["mean_generated_tokens"]
        target("ccot generated tokens <= 10% of long_cot", round(r, 3), r <= 0.10)
    clf = st.get("train_classifier", {})
    if clf:
        ours = clf["f1_ours"]
        target("classifier hard-class F1 above both baselines", round(ours, 3),
               ours > clf["f1_question_only"] and ours > clf["f1_answer_perplexity"],
               f"question-only {clf['f1_question_only']:.3f}, answer perplexity {clf['f1_answer_perplexity']:.3f}")
    s5, control5 = rows.get("synadapt@0.5"), rows.get("nothink+classifier@0.5")
    if s5 and long:
        acc, tok = s5["accuracy"] / long["accuracy"], s5["mean_generated_tokens"] / long["mean_generated_tokens"]
        target("synadapt@0.5 accuracy >= 97% of long_cot", round(acc, 3), acc >= 0.97)
        target("synadapt@0.5 generated tokens <= 40% of long_cot", round(tok, 3), tok <= 0.40)
        target("synadapt@0.5 Rel-G >= 2.5", round(s5["rel_g"], 2) if s5["rel_g"] else None,
               (s5["rel_g"] or 0) >= 2.5)
        if control5:
            target("synadapt@0.5 Rel-G above nothink+classifier@0.5", round(s5["rel_g"] or 0, 2),
                   (s5["rel_g"] or 0) > (control5["rel_g"] or 0), f"control {control5['rel_g'] or 0:.2f}")
    short = rows.get("short_cot")
    if short and long:  # AdaR1's premise (#11): the short model is right where it can be, and only there
        levels = sorted(long["by_difficulty"], key=int)
        easy = levels[:max(1, len(levels) // 2)]
        lv_s, lv_l = short["by_difficulty"], long["by_difficulty"]
        gap = max(lv_l[k]["accuracy"] - lv_s[k]["accuracy"] for k in easy)
        tok = sum(lv_s[k]["mean_generated_tokens"] for k in easy) / sum(lv_l[k]["mean_generated_tokens"] for k in easy)
        target(f"short_cot within 5 points of long_cot at L{easy[0]}-L{easy[-1]}, <= 50% of its tokens there",
               round(tok, 3), gap <= 0.05 and tok <= 0.50, f"largest gap {gap * 100:.1f} points; "
               + " ".join(f"L{k} {lv_s[k]['mean_generated_tokens'] / lv_l[k]['mean_generated_tokens']:.2f}"
                          for k in easy))
        drop = lv_l[levels[-1]]["accuracy"] - lv_s[levels[-1]]["accuracy"]
        target("short_cot degrades on the hardest level (>= 10 points below long_cot)", round(drop * 100, 1),
               drop >= 0.10, " ".join(f"L{k} {lv_s[k]['accuracy']:.2f}" for k in levels))
    prefs = st.get("build_preferences", {})
    if prefs.get("by_difficulty"):
        by = prefs["by_difficulty"]
        shares = [by[k]["share_prefer_long"] or 0.0 for k in sorted(by, key=int)]
        target("share of questions preferring long rises with level", round(prefs["share_prefer_long"] or 0, 3),
               all(a <= b for a, b in zip(shares, shares[1:])) and shares[-1] > shares[0],
               " ".join(f"L{k} {x:.2f}" for k, x in zip(sorted(by, key=int), shares))
               + f"; pairs {prefs.get('pairs_by_level')}")
    branch = [st.get(k, {}).get("stage_seconds") for k in ("train_sft", "merge", "build_preferences", "train_dpo")]
    if all(b is not None for b in branch):
        target("AdaR1 branch (SFT, merge, preferences, DPO) <= 6 minutes", round(sum(branch) / 60, 1),
               sum(branch) <= 360, " + ".join(f"{b:.0f}" for b in branch) + " s")
    dpo = rows.get("adar1_dpo")
    if dpo and long:  # AdaR1 (#11)
        acc, tok = dpo["accuracy"] / long["accuracy"], dpo["mean_generated_tokens"] / long["mean_generated_tokens"]
        target("adar1_dpo accuracy >= 98% of long_cot", round(acc, 3), acc >= 0.98)
        target("adar1_dpo generated tokens <= 50% of long_cot", round(tok, 3), tok <= 0.50)
        if "long_share" in dpo:
            levels = sorted(dpo["by_difficulty"], key=int)
            shares = [dpo["by_difficulty"][k].get("long_share", 0.0) for k in levels]
            rises = all(a <= b for a, b in zip(shares, shares[1:])) and shares[-1] > shares[0]
            target("adar1_dpo share of long responses rises with level", round(dpo["long_share"], 3), rises,
                   " ".join(f"L{k} {s:.2f}" for k, s in zip(levels, shares)))
    joined = rows.get("synadapt+adar1")  # the pipeline names the τ = 0.5 row so
    if joined and long and s5 and dpo:
        acc = joined["accuracy"] / long["accuracy"]
        best = max(s5["rel_g"] or 0, dpo["rel_g"] or 0)
        target("synadapt+adar1@0.5 Rel-G above synadapt@0.5 and adar1_dpo, >= 97% of long_cot",
               round(joined["rel_g"] or 0, 2), (joined["rel_g"] or 0) > best and acc >= 0.97,
               f"accuracy {acc:.3f} of long_cot; synadapt@0.5 {s5['rel_g'] or 0:.2f}, adar1_dpo {dpo['rel_g'] or 0:.2f}")
    wall = res.get("wall_seconds") or sum(s.get("stage_seconds", 0) for s in st.values() if isinstance(s, dict))
    if wall:
        target("make demo <= 20 minutes", round(wall / 60, 1), wall <= 1200, "minutes, pipeline wall")
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
