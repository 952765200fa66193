"""The whole system in one Ray job: every stage in order, one config, one run directory.

    python -m jobs.pipeline --config configs/toy.yaml --out runs/demo            (what `synadapt demo` runs)
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/r1-distill-qwen-7b.yaml

Stages (each skipped when ``<out>/stages/<stage>.json`` says it finished, so a failed pipeline resumes where it
stopped): reasoner (train or reuse the embedded tiny model, or use ``model``) → collect_dcot → synthesize (+ the
wrong-target control) → train_refiner → train_classifier → AdaR1: train_sft → merge → build_preferences →
train_dpo → evaluate (every row of the results table) → results.json, results.md and plots under ``<out>``.
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from jobs.common import init_ray, load_stage_config, read_parquet_rows
from synadapt.adar1.merge import MergeConfig
from synadapt.adar1.preferences import PreferenceConfig
from synadapt.adar1.train import DpoConfig, SftConfig
from synadapt.data.dcot import CollectDcotConfig
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig
from synadapt.latent.reasoner import AdaptiveReasoner
from synadapt.latent.stages import ClassifierJobConfig, RefinerJobConfig, SynthesizeConfig
from synadapt.models.lm import GenerationConfig, PromptFormat
from synadapt.models.tiny import TinyReasonerConfig

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Every stage of SynAdapt + AdaR1 on one model; stage sections override the shared fields above them."""

    out: str = "runs/demo"
    """Run directory: one sub-directory per stage, results.json / results.md / plots at the top."""
    model: str = ""
    """Long-CoT base model (directory or hub id); empty trains or reuses the embedded tiny reasoner."""
    task: TaskConfig = field(default_factory=TaskConfig)
    reasoner: TinyReasonerConfig = field(default_factory=TinyReasonerConfig)
    prompt: PromptFormat = field(default_factory=PromptFormat)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    collect_dcot: CollectDcotConfig = field(default_factory=CollectDcotConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    wrong_target_questions: int = 120
    """Questions re-synthesised towards a random wrong answer (the control for stage 1); 0 skips it."""
    train_refiner: RefinerJobConfig = field(default_factory=RefinerJobConfig)
    train_classifier: ClassifierJobConfig = field(default_factory=ClassifierJobConfig)
    taus: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    """τ sweep for the synadapt@τ rows (0.5 is always included)."""
    adar1: bool = True
    """Run the AdaR1 branch (short model, merge, preferences, DPO) and its rows."""
    sft: SftConfig = field(default_factory=SftConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    eval_data: DataSource = field(default_factory=lambda: DataSource(split="test"))
    """Questions of the results table (the embedded test split by default)."""


class Stages:
    """Runs each stage once: a finished stage leaves ``stages/<name>.json`` and is skipped on the next run."""

    def __init__(self, out: Path):
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.summary: dict = {}

    def run(self, name: str, fn):
        marker = self.dir / f"{name}.json"
        if marker.exists():
            self.summary[name] = json.loads(marker.read_text())
            print(f"[pipeline] {name}: done before, skipped", flush=True)
            return self.summary[name]
        print(f"[pipeline] {name}: running", flush=True)
        t0 = time.time()
        result = fn()
        result = {**result, "stage_seconds": round(time.time() - t0, 1)} if isinstance(result, dict) \
            else {"result": result, "stage_seconds": round(time.time() - t0, 1)}
        marker.write_text(json.dumps(result, indent=2, default=str))
        self.summary[name] = result
        print(f"[pipeline] {name}: finished in {result['stage_seconds']:.0f}s", flush=True)
        return result


def base_model(cfg: PipelineConfig) -> str:
    if cfg.model:
        return cfg.model
    from synadapt.models.tiny import reasoner_dir

    return str(reasoner_dir(cfg.task, cfg.reasoner))


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) every stage; returns the results dict written to ``<out>/results.json``."""
    from jobs.collect_dcot import run_collect_dcot
    from jobs.synthesize import run_synthesize
    from jobs.train_classifier import run_train_classifier
    from jobs.train_refiner import run_train_refiner

    t0 = time.time()
    out = Path(cfg.out).resolve()  # Ray Train workers run in their own working directories
    stages = Stages(out)
    model = base_model(cfg)
    shared = {"task": cfg.task, "prompt": cfg.prompt}
    if not cfg.model:
        from synadapt.models.tiny import ensure_tiny_reasoner

        stages.run("reasoner", lambda: ensure_tiny_reasoner(model, cfg.reasoner, cfg.task))
    init_ray()
    dcot = replace(cfg.collect_dcot, model=model, out_dir=str(out / "dcot"), **shared)
    stages.run("collect_dcot", lambda: run_collect_dcot(dcot))
    synth = replace(cfg.synthesize, model=model, dcot_dir=dcot.out_dir, out_dir=str(out / "zsyn"),
                    data=dcot.data, **shared)
    stages.run("synthesize", lambda: run_synthesize(synth))
    if cfg.wrong_target_questions:
        stages.run("synthesize_wrong_targets", lambda: wrong_target_control(synth, cfg.wrong_target_questions, out))
    run_dir = out / "reasoner"
    refiner = replace(cfg.train_refiner, model=model, zsyn_dir=synth.out_dir, out_dir=str(run_dir / "refiner"),
                      **shared)

    def refine():
        metrics = run_train_refiner(refiner)
        AdaptiveReasoner.save_run(run_dir, model, None, None, cfg.prompt)
        return metrics
    stages.run("train_refiner", refine)
    clf = replace(cfg.train_classifier, run_dir=str(run_dir), features_dir=str(out / "classifier_features"),
                  task=cfg.task)
    stages.run("train_classifier", lambda: run_train_classifier(clf, cfg.eval_data))
    models = {"base": model}
    if cfg.adar1:
        models.update(run_adar1(cfg, model, out, stages))
    results = stages.run("evaluate", lambda: evaluate_all(cfg, models, str(run_dir), out, stages.summary))
    results["wall_seconds"] = round(time.time() - t0, 1)
    return results


def wrong_target_control(synth: SynthesizeConfig, n: int, out: Path) -> dict:
    """Stage 1 towards random wrong answers on ``n`` questions: convergence alone proves nothing, final L_dcot does."""
    from jobs.synthesize import run_synthesize

    gold = {r["id"]: r for r in read_parquet_rows(synth.out_dir) if not r.get("error")}
    ids = sorted(gold)[:: max(1, len(gold) // n)][:n]
    wrong_dir = out / "zsyn_wrong"
    dcot_subset = out / "dcot_control"
    if not dcot_subset.exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        dcot_subset.mkdir(parents=True)
        rows = [r for r in read_parquet_rows(synth.dcot_dir) if r["id"] in set(ids)]
        pq.write_table(pa.Table.from_pylist(rows), dcot_subset / "subset.parquet")
    counts = run_synthesize(replace(synth, dcot_dir=str(dcot_subset), out_dir=str(wrong_dir), wrong_targets=True))
    wrong = [r for r in read_parquet_rows(str(wrong_dir)) if not r.get("error")]
    gold_dcot = statistics.fmean(gold[r["id"]]["loss_dcot"] for r in wrong)
    wrong_dcot = statistics.fmean(r["loss_dcot"] for r in wrong)
    return {**counts, "gold_mean_final_loss_dcot": gold_dcot, "wrong_mean_final_loss_dcot": wrong_dcot,
            "wrong_over_gold_loss_dcot": wrong_dcot / gold_dcot if gold_dcot else None,
            "gold_converged_share": statistics.fmean(bool(gold[r["id"]]["converged"]) for r in wrong),
            "wrong_converged_share": statistics.fmean(bool(r["converged"]) for r in wrong)}


def run_adar1(cfg: PipelineConfig, model: str, out: Path, stages: Stages) -> dict:
    """Short model → merge → preference pairs → DPO; returns the model directories of the AdaR1 rows."""
    from jobs.build_preferences import run_build_preferences
    from jobs.merge import run_merge
    from jobs.train_dpo import run_dpo
    from jobs.train_sft import run_sft

    adar1 = out / "adar1"
    sft = replace(cfg.sft, model=model, output_dir=str(adar1 / "short_cot"), task=cfg.task, prompt=cfg.prompt)
    stages.run("train_sft", lambda: {"model": run_sft(sft)})
    merge = replace(cfg.merge, long_model=model, short_model=sft.output_dir, output_dir=str(adar1 / "merged"),
                    task=cfg.task, prompt=cfg.prompt, generation=cfg.generation)
    stages.run("merge", lambda: {"model": run_merge(merge)})
    prefs = replace(cfg.preferences, long_model=model, short_model=sft.output_dir,
                    output_dir=str(adar1 / "preferences"), task=cfg.task, prompt=cfg.prompt)
    stages.run("build_preferences", lambda: run_build_preferences(prefs))
    dpo = replace(cfg.dpo, model=merge.output_dir, pairs=str(Path(prefs.output_dir) / "pairs.jsonl"),
                  output_dir=str(adar1 / "dpo"))
    stages.run("train_dpo", lambda: {"model": run_dpo(dpo)})
    return {"short": sft.output_dir, "merged": merge.output_dir, "dpo": dpo.output_dir}


def evaluate_all(cfg: PipelineConfig, models: dict, run_dir: str, out: Path, summary: dict) -> dict:
    """Every row of the results table, each from a Ray Data evaluation over the same questions."""
    from jobs.evaluate import EvaluateConfig, run_evaluate
    from synadapt.eval.metrics import markdown_table, with_rel_g, write_results

    taus = sorted(set(cfg.taus) | {0.5})
    base_methods = ["long_cot", "nothink", "ccot", "ccot_zeroed", "nothink+classifier@0.5"] + \
        [f"synadapt@{t:g}" for t in taus]
    plan = [(models["base"], base_methods, {})]
    if cfg.adar1:
        plan += [(models["short"], ["long_cot"], {"long_cot": "short_cot"}),
                 (models["merged"], ["long_cot"], {"long_cot": "adar1_merge"}),
                 (models["dpo"], ["long_cot"], {"long_cot": "adar1_dpo"}),
                 (models["base"], ["synadapt+adar1@0.5"], {"synadapt+adar1@0.5": "synadapt+adar1"})]
    rows = []
    for i, (model, methods, rename) in enumerate(plan):
        ev = EvaluateConfig(model=model, methods=methods, data=cfg.eval_data, task=cfg.task,
                            out_dir=str(out / "eval" / f"part{i}"), generation=cfg.generation, prompt=cfg.prompt,
                            reasoner=run_dir, long_model=models.get("dpo", ""))
        for row in run_evaluate(ev)["rows"]:
            row["method"] = rename.get(row["method"], row["method"])
            rows.append(row)
    with_rel_g(rows)
    path = write_results(out, task=cfg.eval_data.path or f"embedded-{cfg.eval_data.split}", model=models["base"],
                         rows=rows, stages=summary)
    print(markdown_table(rows), flush=True)
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_stage_config(PipelineConfig, sys.argv[1:] if argv is None else argv, "pipeline")
    results = run_pipeline(cfg)
    print(f"pipeline: wrote {Path(cfg.out) / 'results.json'} in {results['wall_seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    from jobs.pipeline import main as _main

    sys.exit(_main())
