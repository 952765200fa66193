"""Stage 1 on Ray Data: one synthetic continuous thought Z_syn per correct DCoT (METHOD.md §1).

    python -m jobs.synthesize --config configs/toy.yaml --model PATH --dcot_dir runs/dcot --out_dir runs/zsyn
    ray job submit --working-dir . -- python -m jobs.synthesize --config configs/r1-distill-qwen-7b.yaml ...

Each actor loads the frozen model once and optimises a whole batch of questions together (each with its own Z).
Resumable and exactly-once like every Ray Data stage (jobs.common.map_to_parquet); prints done / skipped /
failed-to-converge counts and the median number of optimisation steps.
"""
from __future__ import annotations

import json
import logging
import statistics
import sys

from jobs.common import apply_rows, init_ray, load_stage_config, map_to_parquet, read_parquet_rows
from synadapt.latent.stages import SynthesizeConfig, synthesize_batch

log = logging.getLogger(__name__)


class LatentSynthesizer:
    """Ray Data actor: the frozen model once, batches of DCoT records in, Z_syn records out."""

    def __init__(self, cfg: SynthesizeConfig):
        import torch

        from synadapt.models.lm import load_model

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.model, self.tok = load_model(cfg.model)

    def __call__(self, batch: dict) -> dict:
        return apply_rows(lambda rows: synthesize_batch(self.model, self.tok, rows, self.cfg), batch)


def run_synthesize(cfg: SynthesizeConfig) -> dict:
    """Synthesise Z_syn for every correct DCoT in ``cfg.dcot_dir``; returns counts and convergence statistics."""
    if not cfg.model:
        raise ValueError("synthesize: set model to the long-CoT model directory or hub id (--model PATH)")
    dcots = read_parquet_rows(cfg.dcot_dir)
    if not dcots:
        raise ValueError(f"synthesize: no DCoT records in {cfg.dcot_dir!r}; run jobs.collect_dcot first")
    targets = {}
    if cfg.synthesis.init == "targets":
        targets = {p["id"]: p for p in cfg.data.load(cfg.task)}
    rows = [{**{k: r[k] for k in ("id", "question", "answer", "difficulty", "dcot", "response")},
             **{k: targets.get(r["id"], {}).get(k) for k in ("latent_targets", "short_cot")}}
            for r in dcots if r.get("correct") and not r.get("error")]
    if not rows:
        raise ValueError(f"synthesize: none of the {len(dcots)} DCoTs in {cfg.dcot_dir!r} reached the gold answer; "
                         "a model that cannot solve its training questions has nothing to compress")
    init_ray()
    counts = map_to_parquet(rows, LatentSynthesizer, {"cfg": cfg}, cfg.out_dir, batch_size=cfg.batch_size,
                            concurrency=cfg.concurrency, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                            retries=cfg.retries, desc="synthesize")
    ids = {r["id"] for r in rows}
    # Small columns only: the Z arrays (m x hidden floats per question) stay on storage.
    records = [r for r in read_parquet_rows(cfg.out_dir, ["id", "error", "converged", "steps", "loss_dcot"])
               if r["id"] in ids and not r.get("error")]
    counts.update(dcot_records=len(dcots), incorrect_dcot_skipped=len(dcots) - len(rows),
                  converged=sum(bool(r["converged"]) for r in records),
                  failed_to_converge=sum(not r["converged"] for r in records),
                  median_steps=statistics.median(r["steps"] for r in records) if records else None,
                  mean_final_loss_dcot=statistics.fmean(r["loss_dcot"] for r in records) if records else None)
    return counts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_stage_config(SynthesizeConfig, sys.argv[1:] if argv is None else argv, "synthesize")
    print(f"synthesize: {json.dumps(run_synthesize(cfg))} -> {cfg.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    from jobs.synthesize import main as _main  # importable module name, so Ray pickles the actor by reference

    sys.exit(_main())
