"""The whole system in one Ray job: every stage in order, one config, one run directory.

    python -m jobs.pipeline --config configs/toy.yaml --out runs/demo            (what `synadapt demo` runs)
    python -m jobs.pipeline --config configs/r1-distill-qwen-7b.yaml --dry_run   (print the plan, run nothing)
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/r1-distill-qwen-7b.yaml

Stages (each skipped when ``<out>/stages/<stage>.json`` says it finished, so a failed pipeline resumes where it
stopped): reasoner (train or reuse the embedded tiny model, or use ``model``) → collect_dcot → synthesize (+ the
wrong-target control) → train_refiner → train_classifier → AdaR1: train_sft → merge → build_preferences →
train_dpo → evaluate (every row of the results table) → results.json, results.md and plots under ``<out>``.
:func:`stage_configs` resolves every stage's config once; the run and ``--dry_run`` both read it.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from jobs.common import init_ray, is_uri, load_stage_config, read_parquet_rows
from jobs.evaluate import EvaluateConfig
from synadapt.adar1.merge import MergeConfig
from synadapt.adar1.preferences import PreferenceConfig
from synadapt.adar1.train import DpoConfig, SftConfig
from synadapt.data.dcot import CollectDcotConfig
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig
from synadapt.latent.reasoner import AdaptiveReasoner
from synadapt.latent.stages import ClassifierJobConfig, RefinerJobConfig, SynthesizeConfig
from synadapt.models.lm import PromptFormat
from synadapt.models.tiny import TinyReasonerConfig

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Every stage of SynAdapt + AdaR1 on one model; the pipeline sets each stage's model, task, prompt and paths."""

    out: str = "runs/demo"
    """Run directory: one sub-directory per stage (and the Ray Train checkpoints), results.json / results.md / plots
    at the top. On a multi-node cluster, a directory on a file system every node mounts at the same path (NFS, EFS,
    a ReadWriteMany volume): stages run on any node and load the models the previous stages wrote there."""
    model: str = ""
    """Long-CoT base model (directory or hub id); empty trains or reuses the embedded tiny reasoner."""
    task: TaskConfig = field(default_factory=TaskConfig)
    reasoner: TinyReasonerConfig = field(default_factory=TinyReasonerConfig)
    prompt: PromptFormat = field(default_factory=PromptFormat)
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
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """The results-table evaluation: its generation limits, batch size and actors (concurrency, num_gpus); the
    pipeline sets its model, methods, data (``eval_data``), out_dir, reasoner and long_model."""
    eval_data: DataSource = field(default_factory=lambda: DataSource(split="test"))
    """Questions of the results table and of the classifier's F1 (the embedded test split by default)."""


class Stages:
    """Runs each stage once: a finished stage leaves ``stages/<name>.json`` and is skipped on the next run."""

    def __init__(self, out: str):
        self.dir = Path(out) / "stages"
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
        # As jobs.common.load_stage_config does: a relative local dir would be a Hub id in a Ray Train worker's cwd.
        return os.path.abspath(cfg.model) if os.path.exists(cfg.model) else cfg.model
    from synadapt.models.tiny import reasoner_dir

    return str(reasoner_dir(cfg.task, cfg.reasoner))


def run_dir_of(cfg: PipelineConfig) -> str:
    """Where the pipeline writes everything: ``out`` as an absolute path (Ray Train workers have their own cwd)."""
    if is_uri(cfg.out):
        raise ValueError(
            f"pipeline: out {cfg.out!r} is a URI, but the refiner, the classifier and the AdaR1 models are model "
            "directories that every node loads from a file system; set out to a directory on a file system every "
            "node mounts at the same path (NFS, EFS, a ReadWriteMany volume)")
    return os.path.abspath(cfg.out)


def wire(section, stage: str, **values):
    """``section`` with the fields the pipeline derives set to ``values``; ValueError if the config set one of them
    (a stage section that names its own model, paths or data would otherwise be overridden without a word)."""
    default = type(section)()
    taken = [name for name in values if getattr(section, name) != getattr(default, name)]
    if taken:
        raise ValueError(f"pipeline: {', '.join(f'{stage}.{n}' for n in taken)} is set by the pipeline (from out, "
                         "model, task, prompt or the stage it reads from); remove it from the config")
    return replace(section, **values)


def stage_configs(cfg: PipelineConfig) -> dict:
    """Every stage's config as the pipeline runs it, in order: outputs and Ray Train storage under ``out``, model,
    task and prompt from the top level, each stage's inputs from the stage before. Loads no model, starts no Ray."""
    out, model = run_dir_of(cfg), base_model(cfg)
    shared = {"task": cfg.task, "prompt": cfg.prompt}
    dcot = wire(cfg.collect_dcot, "collect_dcot", model=model, out_dir=os.path.join(out, "dcot"), **shared)
    # The DCoTs' problems travel with them: Z_syn ids and per-latent targets come from the same data set.
    synth = wire(cfg.synthesize, "synthesize", model=model, dcot_dir=dcot.out_dir, data=dcot.data,
                 out_dir=os.path.join(out, "zsyn"), **shared)
    stages: dict = {"collect_dcot": dcot, "synthesize": synth}
    if cfg.wrong_target_questions:
        stages["synthesize_wrong_targets"] = replace(synth, dcot_dir=os.path.join(out, "dcot_control"),
                                                     out_dir=os.path.join(out, "zsyn_wrong"), wrong_targets=True)
    run_dir = os.path.join(out, "reasoner")  # what `synadapt serve --run-dir` and the latent rows load
    refiner = wire(cfg.train_refiner, "train_refiner", model=model, zsyn_dir=synth.out_dir, data=dcot.data,
                   out_dir=os.path.join(run_dir, "refiner"), **shared)
    stages["train_refiner"] = replace(refiner, storage_path=refiner.storage_path or os.path.join(run_dir, "ray"))
    clf = wire(cfg.train_classifier, "train_classifier", run_dir=run_dir, task=cfg.task,
               features_dir=os.path.join(out, "classifier_features"))
    stages["train_classifier"] = replace(clf, storage_path=clf.storage_path or os.path.join(clf.features_dir, "ray"))
    models = {"base": model}
    if cfg.adar1:
        adar1 = os.path.join(out, "adar1")
        sft = wire(cfg.sft, "sft", model=model, output_dir=os.path.join(adar1, "short_cot"), **shared)
        sft = replace(sft, train=replace(sft.train, storage_path=sft.train.storage_path or f"{sft.output_dir}-ray"))
        merge = wire(cfg.merge, "merge", long_model=model, short_model=sft.output_dir,
                     output_dir=os.path.join(adar1, "merged"), **shared)
        prefs = wire(cfg.preferences, "preferences", long_model=model, short_model=sft.output_dir,
                     output_dir=os.path.join(adar1, "preferences"), **shared)
        dpo = wire(cfg.dpo, "dpo", model=merge.output_dir, pairs=os.path.join(prefs.output_dir, "pairs.jsonl"),
                   output_dir=os.path.join(adar1, "dpo"))
        dpo = replace(dpo, train=replace(dpo.train, storage_path=dpo.train.storage_path or f"{dpo.output_dir}-ray"))
        stages.update(train_sft=sft, merge=merge, build_preferences=prefs, train_dpo=dpo)
        models.update(short=sft.output_dir, merged=merge.output_dir, dpo=dpo.output_dir)
    stages["evaluate"] = evaluation_parts(cfg, models, run_dir, out)
    return stages


def evaluation_parts(cfg: PipelineConfig, models: dict, run_dir: str, out: str) -> list[tuple[EvaluateConfig, dict]]:
    """The results table as evaluations of one model each: (config, {method: row name}) per part."""
    taus = sorted(set(cfg.taus) | {0.5})
    base_methods = ["long_cot", "nothink", "ccot", "ccot_zeroed", "ccot_shuffled", "nothink+classifier@0.5"] + \
        [f"synadapt@{t:g}" for t in taus]
    plan = [(models["base"], base_methods, {})]
    if cfg.adar1:
        plan += [(models["short"], ["long_cot"], {"long_cot": "short_cot"}),
                 (models["merged"], ["long_cot"], {"long_cot": "adar1_merge"}),
                 (models["dpo"], ["long_cot"], {"long_cot": "adar1_dpo"}),
                 (models["base"], ["synadapt+adar1@0.5"], {"synadapt+adar1@0.5": "synadapt+adar1"})]
    return [(wire(cfg.evaluate, "evaluate", model=model, methods=methods, data=cfg.eval_data, task=cfg.task,
                  prompt=cfg.prompt, out_dir=os.path.join(out, "eval", f"part{i}"), reasoner=run_dir,
                  long_model=models.get("dpo", "")), rename)
            for i, (model, methods, rename) in enumerate(plan)]


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) every stage; returns the results dict written to ``<out>/results.json``."""
    from jobs.collect_dcot import run_collect_dcot
    from jobs.synthesize import run_synthesize
    from jobs.train_classifier import run_train_classifier
    from jobs.train_refiner import run_train_refiner

    t0 = time.time()
    plan = stage_configs(cfg)  # every config error surfaces here, before any stage runs
    out = run_dir_of(cfg)
    stages = Stages(out)
    model = base_model(cfg)
    if not cfg.model:
        from synadapt.models.tiny import ensure_tiny_reasoner

        stages.run("reasoner", lambda: ensure_tiny_reasoner(model, cfg.reasoner, cfg.task))
    init_ray()
    stages.run("collect_dcot", lambda: run_collect_dcot(plan["collect_dcot"]))
    stages.run("synthesize", lambda: run_synthesize(plan["synthesize"]))
    if "synthesize_wrong_targets" in plan:
        stages.run("synthesize_wrong_targets", lambda: wrong_target_control(
            plan["synthesize"], plan["synthesize_wrong_targets"], cfg.wrong_target_questions))
    refiner = plan["train_refiner"]
    run_dir = plan["train_classifier"].run_dir

    def refine():
        metrics = run_train_refiner(refiner)
        AdaptiveReasoner.save_run(run_dir, model, None, None, cfg.prompt)
        return metrics
    stages.run("train_refiner", refine)
    stages.run("train_classifier", lambda: run_train_classifier(plan["train_classifier"], cfg.eval_data))
    if cfg.adar1:
        run_adar1(plan, stages)
    results = stages.run("evaluate", lambda: evaluate_all(plan["evaluate"], out, model, cfg.eval_data,
                                                          stages.summary))
    results["wall_seconds"] = round(time.time() - t0, 1)
    (Path(out) / "results.json").write_text(json.dumps(results, indent=2))  # the demo-wall target reads it
    return results


def wrong_target_control(gold_cfg: SynthesizeConfig, wrong_cfg: SynthesizeConfig, n: int) -> dict:
    """Stage 1 towards random wrong answers on ``n`` questions: convergence alone proves nothing, final L_dcot does."""
    from jobs.synthesize import run_synthesize

    gold = {r["id"]: r for r in read_parquet_rows(gold_cfg.out_dir) if not r.get("error")}
    ids = sorted(gold)[:: max(1, len(gold) // n)][:n]
    if not ids:  # checked before the subset is written: a resume would otherwise reuse an empty one
        raise ValueError(f"synthesize_wrong_targets: no Z_syn record without an error in {gold_cfg.out_dir!r}")
    dcot_subset = Path(wrong_cfg.dcot_dir)
    if not dcot_subset.exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        dcot_subset.mkdir(parents=True)
        rows = [r for r in read_parquet_rows(gold_cfg.dcot_dir) if r["id"] in set(ids)]
        pq.write_table(pa.Table.from_pylist(rows), dcot_subset / "subset.parquet")
    counts = run_synthesize(wrong_cfg)
    wrong = [r for r in read_parquet_rows(wrong_cfg.out_dir) if not r.get("error")]
    gold_dcot = statistics.fmean(gold[r["id"]]["loss_dcot"] for r in wrong)
    wrong_dcot = statistics.fmean(r["loss_dcot"] for r in wrong)
    return {**counts, "gold_mean_final_loss_dcot": gold_dcot, "wrong_mean_final_loss_dcot": wrong_dcot,
            "wrong_over_gold_loss_dcot": wrong_dcot / gold_dcot if gold_dcot else None,
            "gold_converged_share": statistics.fmean(bool(gold[r["id"]]["converged"]) for r in wrong),
            "wrong_converged_share": statistics.fmean(bool(r["converged"]) for r in wrong)}


def run_adar1(plan: dict, stages: Stages) -> None:
    """Short model → merge → preference pairs → DPO, each writing the model directory the next one reads."""
    from jobs.build_preferences import run_build_preferences
    from jobs.merge import run_merge
    from jobs.train_dpo import run_dpo
    from jobs.train_sft import run_sft

    stages.run("train_sft", lambda: {"model": run_sft(plan["train_sft"])})
    stages.run("merge", lambda: {"model": run_merge(plan["merge"])})
    stages.run("build_preferences", lambda: run_build_preferences(plan["build_preferences"]))
    stages.run("train_dpo", lambda: {"model": run_dpo(plan["train_dpo"])})


def evaluate_all(parts: list[tuple[EvaluateConfig, dict]], out: str, model: str, eval_data: DataSource,
                 summary: dict) -> dict:
    """Every row of the results table, each from a Ray Data evaluation over the same questions."""
    from jobs.evaluate import run_evaluate
    from synadapt.eval.metrics import add_long_share, markdown_table, with_rel_g, write_results

    rows, records = [], {}
    for ev, rename in parts:
        result = run_evaluate(ev)
        done = [r for r in read_parquet_rows(os.path.join(ev.out_dir, "records")) if not r.get("error")]
        for row in result["rows"]:
            name = rename.get(row["method"], row["method"])
            records[name] = [r for r in done if r["method"] == row["method"]]
            row["method"] = name
            rows.append(row)
    if "long_cot" in records and "short_cot" in records:  # AdaR1: how often the merged / DPO model still thinks long
        tokens = {n: {r["question_id"]: r["generated_tokens"] for r in records[n]} for n in ("long_cot", "short_cot")}
        for row in rows:
            if row["method"] in ("adar1_merge", "adar1_dpo"):
                add_long_share(row, records[row["method"]], tokens["long_cot"], tokens["short_cot"])
    with_rel_g(rows)
    path = write_results(Path(out), task=eval_data.path or f"embedded-{eval_data.split}", model=model, rows=rows,
                         stages=summary)
    print(markdown_table(rows), flush=True)
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------- --dry_run


def _pick(obj, names: str) -> dict:
    return {n: asdict(v) if hasattr(v, "__dataclass_fields__") else v
            for n in names.split() if (v := getattr(obj, n)) is not None}


def _actors(c) -> str:
    return f"Ray Data: {c.concurrency} actors x ({c.num_cpus:g} CPU, {c.num_gpus:g} GPU), {c.batch_size} rows a batch"


def _trainer(workers: int, use_gpu: bool, cpus: float, zero: int) -> str:
    each = f"{cpus:g} CPU" + (", 1 GPU" if use_gpu else "")
    return f"Ray Train: {workers} workers x ({each}), " + (f"DeepSpeed ZeRO-{zero}" if zero else "DDP (no DeepSpeed)")


def _source(data: DataSource) -> str:
    return data.path or f"embedded:{data.split}"


def describe_stages(cfg: PipelineConfig) -> list[dict]:
    """What ``--dry_run`` prints, per stage in run order: its settings, the Ray resources it asks for, and every
    input, output and Ray Train storage path (the same configs :func:`run_pipeline` runs)."""
    plan, rows = stage_configs(cfg), []
    if not cfg.model:
        rows.append({"stage": "reasoner", "resources": "driver process (trains only if the cache has no model)",
                     "settings": {"task": asdict(cfg.task)}, "inputs": {},
                     "outputs": {"model": base_model(cfg)}, "storage": {}})
    for name, c in plan.items():
        if name == "collect_dcot":
            row = {"resources": _actors(c), "settings": _pick(c, "generation"),
                   "inputs": {"model": c.model, "data": _source(c.data)},
                   "outputs": {"out_dir": c.out_dir}}
        elif name.startswith("synthesize"):
            row = {"resources": _actors(c), "settings": _pick(c, "synthesis wrong_targets"),
                   "inputs": {"model": c.model, "dcot_dir": c.dcot_dir}, "outputs": {"out_dir": c.out_dir}}
            if c.wrong_targets:
                row["settings"]["questions"] = cfg.wrong_target_questions
                row["outputs"]["dcot_subset"] = c.dcot_dir
        elif name == "train_refiner":
            cpus = 1.0 if c.use_gpu else c.threads / max(c.num_workers, 1)
            row = {"resources": _trainer(c.num_workers, c.use_gpu, cpus, c.deepspeed_stage),
                   "settings": _pick(c, "refiner init_from checkpoint_every max_failures"),
                   "inputs": {"model": c.model, "zsyn_dir": c.zsyn_dir,
                              "data": _source(c.data)},
                   "outputs": {"out_dir": c.out_dir}, "storage": {"storage_path": c.storage_path}}
        elif name == "train_classifier":
            row = {"resources": f"{_actors(c)}; {_trainer(c.num_workers, False, 1, 0)}",
                   "settings": _pick(c, "classifier"),
                   "inputs": {"run_dir": c.run_dir, "data": _source(c.data)},
                   "outputs": {"features_dir": c.features_dir, "classifier": os.path.join(c.run_dir, "classifier")},
                   "storage": {"storage_path": c.storage_path}}
        elif name in ("train_sft", "train_dpo"):
            t = c.train
            row = {"resources": _trainer(t.num_workers, t.use_gpu, t.cpus_per_worker, t.deepspeed_stage),
                   "settings": _pick(t, "learning_rate epochs max_steps per_device_batch_size grad_accum max_length "
                                        "bf16 gradient_checkpointing lora_r"),
                   "inputs": {"model": c.model, **({"pairs": c.pairs} if name == "train_dpo" else
                                                   {"data": _source(c.data)})},
                   "outputs": {"output_dir": c.output_dir}, "storage": {"storage_path": t.storage_path}}
        elif name == "merge":
            sweep = (f"; sweep: {len(c.sweep)} Ray tasks x ({c.eval_num_cpus:g} CPU, {c.eval_num_gpus:g} GPU)"
                     if c.sweep else "")
            row = {"resources": "driver process (streams tensors, no Ray)" + sweep,
                   "settings": _pick(c, "alpha sweep" + (" generation" if c.sweep else "")),
                   "inputs": {"long_model": c.long_model, "short_model": c.short_model},
                   "outputs": {"output_dir": c.output_dir,
                               **({"sweep_dir": f"{c.output_dir}-sweep"} if c.sweep else {})}}
        elif name == "build_preferences":
            row = {"resources": _actors(c), "settings": _pick(c, "k generation m1 m2 eps dedupe_sources"),
                   "inputs": {"long_model": c.long_model, "short_model": c.short_model,
                              "data": _source(c.data)},
                   "outputs": {"output_dir": c.output_dir}}
        else:  # evaluate: one Ray Data evaluation per model of the table
            first = c[0][0]
            row = {"resources": _actors(first) + f", {len(c)} evaluations in turn",
                   "settings": {"generation": asdict(first.generation), "threads": first.threads,
                                "parts": [{"model": ev.model, "methods": ev.methods} for ev, _ in c]},
                   "inputs": {"data": _source(first.data), "reasoner": first.reasoner},
                   "outputs": {**{f"part{i}": ev.out_dir for i, (ev, _) in enumerate(c)},
                               "results": os.path.join(run_dir_of(cfg), "results.json")}}
        rows.append({"stage": name, **row, "storage": row.get("storage", {})})
    return rows


def print_dry_run(cfg: PipelineConfig) -> None:
    """Print :func:`describe_stages` as YAML: one mapping per stage."""
    print(f"# pipeline dry run: nothing is loaded or started. out = {run_dir_of(cfg)}")
    for i, row in enumerate(describe_stages(cfg), 1):
        print(yaml.safe_dump({f"{i}. {row.pop('stage')}": row}, sort_keys=False, width=120, default_flow_style=None),
              end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry_run" in argv or "--dry-run" in argv
    argv = [a for a in argv if a not in ("--dry_run", "--dry-run")]
    if "-h" in argv or "--help" in argv:
        print("--dry_run: print every stage's resolved config, Ray resources and paths; load and start nothing\n")
    cfg = load_stage_config(PipelineConfig, argv, "pipeline")
    if dry_run:
        print_dry_run(cfg)
        return 0
    results = run_pipeline(cfg)
    print(f"pipeline: wrote {Path(cfg.out) / 'results.json'} in {results['wall_seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    from jobs.pipeline import main as _main

    sys.exit(_main())
