"""Stage 3 on Ray: label questions with the trained refiner (Ray Data), then fit the difficulty classifier (Ray Train).

    python -m jobs.train_classifier --config configs/toy.yaml --run_dir runs/demo/reasoner

1. A Ray Data actor pool loads the base model + refiner once per actor and writes, per question, the classifier
   features, the latent answer, ``hard`` (that answer is wrong), question-only features and the answer NLL.
2. A Ray Train worker fits the MLP with the pairwise L_diff + BCE and reports it as a checkpoint.
3. Hard-class F1 of ours and of both baselines (question-only MLP, answer perplexity) on ``eval_data`` go into
   ``run_dir/classifier/classifier.json`` and the job's printed summary.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from jobs.common import (
    apply_rows,
    fit_torch_trainer,
    init_ray,
    load_stage_config,
    load_stage_problems,
    map_to_parquet,
    read_parquet_rows,
)
from synadapt.config import build
from synadapt.latent.stages import ClassifierJobConfig, feature_batch

log = logging.getLogger(__name__)


class FeatureLabeler:
    """Ray Data actor: the reasoner (base + refiner) once; problems in, feature records out."""

    def __init__(self, cfg: ClassifierJobConfig):
        import torch

        from synadapt.latent.reasoner import AdaptiveReasoner

        torch.set_num_threads(cfg.threads)
        self.reasoner = AdaptiveReasoner.load(cfg.run_dir)

    def __call__(self, batch: dict) -> dict:
        return apply_rows(lambda rows: feature_batch(self.reasoner, rows), batch)


def classifier_train_loop(config: dict) -> None:
    """Ray Train worker: fit the classifier on the feature records; rank 0 reports it as the checkpoint."""
    import ray.train
    import torch

    from synadapt.latent.classifier import train_classifier

    cfg = build(ClassifierJobConfig, config["cfg"])
    rows = list(ray.train.get_dataset_shard("train").iter_rows())  # every worker gets every row: a full-batch fit
    clf = train_classifier(torch.tensor([r["features"] for r in rows]),
                           torch.tensor([float(r["hard"]) for r in rows]), cfg.classifier)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            clf.save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"examples": len(rows), "hard_share": sum(r["hard"] for r in rows) / len(rows)},
                         checkpoint=checkpoint)


def label(cfg: ClassifierJobConfig, data, out_dir: str) -> list[dict]:
    problems, _malformed = load_stage_problems(data, cfg.task)
    rows = [{k: p.get(k) for k in ("id", "question", "answer", "difficulty")} for p in problems]
    map_to_parquet(rows, FeatureLabeler, {"cfg": cfg}, out_dir, batch_size=cfg.batch_size,
                   concurrency=cfg.concurrency, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, desc="label")
    ids = {r["id"] for r in rows}
    return [r for r in read_parquet_rows(out_dir) if r["id"] in ids and not r.get("error")]


def classifier_report(train_rows: list[dict], eval_rows: list[dict], clf, cfg) -> dict:
    """Hard-class F1 on ``eval_rows`` for ours and both baselines (thresholds fitted on ``train_rows``)."""
    import torch

    from synadapt.latent.classifier import best_threshold, f1_hard, train_classifier

    def tensors(rows, key):
        return torch.tensor([r[key] for r in rows], dtype=torch.float32)

    hard_train, hard_eval = tensors(train_rows, "hard"), tensors(eval_rows, "hard")
    question_only = train_classifier(tensors(train_rows, "question_features"), hard_train, cfg.classifier)
    nll_threshold = best_threshold(tensors(train_rows, "answer_nll"), hard_train)
    return {
        "eval_questions": len(eval_rows), "eval_hard_share": float(hard_eval.mean()),
        "f1_ours": f1_hard(clf.score(tensors(eval_rows, "features")), hard_eval),
        "f1_question_only": f1_hard(question_only.score(tensors(eval_rows, "question_features")), hard_eval),
        "f1_answer_perplexity": f1_hard(tensors(eval_rows, "answer_nll"), hard_eval, nll_threshold),
    }


def run_train_classifier(cfg: ClassifierJobConfig, eval_data=None) -> dict:
    """Label, fit, evaluate; writes the classifier into ``cfg.run_dir/classifier`` and returns the F1 report."""
    import ray.data

    from synadapt.data.source import DataSource
    from synadapt.latent.classifier import DifficultyClassifier

    init_ray()
    train_rows = label(cfg, cfg.data, str(Path(cfg.features_dir) / "train"))
    if not train_rows:
        raise ValueError("train_classifier: no labelled questions")
    result = fit_torch_trainer(classifier_train_loop, {"cfg": asdict(cfg)}, name="train_classifier",
                               datasets={"train": ray.data.from_items(
                                   [{"features": r["features"], "hard": r["hard"]} for r in train_rows])},
                               split_datasets=False, num_workers=cfg.num_workers,
                               storage_path=cfg.storage_path or str(Path(cfg.features_dir).absolute() / "ray"))
    out = Path(cfg.run_dir) / "classifier"
    with result.checkpoint.as_directory() as ckpt:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ckpt, out)
    eval_rows = label(cfg, eval_data or DataSource(split="test"), str(Path(cfg.features_dir) / "eval"))
    report = classifier_report(train_rows, eval_rows, DifficultyClassifier.load(out), cfg)
    report.update(train_questions=len(train_rows), train_hard_share=sum(r["hard"] for r in train_rows) / len(train_rows))
    meta = json.loads((out / "classifier.json").read_text())
    (out / "classifier.json").write_text(json.dumps({**meta, "report": report}, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_stage_config(ClassifierJobConfig, sys.argv[1:] if argv is None else argv, "train_classifier")
    print(f"train_classifier: {json.dumps(run_train_classifier(cfg))}", flush=True)
    return 0


if __name__ == "__main__":
    from jobs.train_classifier import main as _main

    sys.exit(_main())
