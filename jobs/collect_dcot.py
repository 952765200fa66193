"""DCoT collection: the frozen long-CoT model thinks about every training question once (METHOD.md §1).

    python -m jobs.collect_dcot --config configs/r1-distill-qwen-7b.yaml --model runs/tiny --out_dir runs/dcot
    ray job submit --working-dir . -- python -m jobs.collect_dcot --model <path> ...

Recipe: load problems (embedded split or a data file; malformed rows are counted and skipped) → Ray Data actor pool,
each actor loading the model once → Parquet shards under ``out_dir`` with one record per question id
(``synadapt.data.dcot.COLUMNS`` + ``error``). ``out_dir`` may be a URI (``s3://bucket/run/dcot``). Re-running skips
ids already written and redoes those that failed with an error; a killed actor is restarted by Ray and its batch
redone, a bounded number of times (``retries``); at the end every id is checked to be written exactly once.
"""
from __future__ import annotations

import json
import logging
import sys

from jobs.common import apply_rows, init_ray, load_stage_config, load_stage_problems, map_to_parquet, read_parquet_rows
from jobs.vllm_generate import collect_dcot_vllm
from synadapt.data.dcot import CollectDcotConfig, collect_batch
from synadapt.models.vllm_engine import check_backend

log = logging.getLogger(__name__)


class DcotCollector:
    """Ray Data actor: one copy of the model, a batch of problems in, DCoT records out."""

    def __init__(self, cfg: CollectDcotConfig):
        import torch

        from synadapt.models.lm import load_model

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.model, self.tok = load_model(cfg.model)

    def run(self, rows: list[dict]) -> list[dict]:
        return collect_batch(self.model, self.tok, rows, self.cfg.generation, self.cfg.prompt)

    def __call__(self, batch: dict) -> dict:
        return apply_rows(self.run, batch)


def run_collect_dcot(cfg: CollectDcotConfig, actor_cls: type = DcotCollector) -> dict:
    """Collect DCoTs for every problem of ``cfg.data``; returns the counts (see :func:`jobs.common.map_to_parquet`)
    plus ``malformed`` (input rows skipped), ``correct`` (records whose thought reached the gold answer) and
    ``problems`` (valid input problems)."""
    if not cfg.model:
        raise ValueError("collect_dcot: set model to the long-CoT model directory or hub id (--model PATH)")
    problems, malformed = load_stage_problems(cfg.data, cfg.task)
    # Only schema fields travel to the actors: their columns must be uniform (Ray Data builds arrays from them).
    rows = [{k: p.get(k) for k in ("id", "question", "answer", "difficulty")} for p in problems]
    check_backend(cfg.generation.backend)  # a missing vLLM extra fails here, before Ray starts
    init_ray()
    if cfg.generation.backend == "vllm":
        counts = collect_dcot_vllm(cfg, rows)
    else:
        counts = map_to_parquet(rows, actor_cls, {"cfg": cfg}, cfg.out_dir, batch_size=cfg.batch_size,
                                concurrency=cfg.concurrency, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                retries=cfg.retries, desc="collect_dcot")
    ids = {r["id"] for r in rows}
    records = [r for r in read_parquet_rows(cfg.out_dir, ["id", "correct"]) if r["id"] in ids]
    counts.update(problems=len(problems), malformed=malformed, correct=sum(bool(r.get("correct")) for r in records))
    return counts


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_stage_config(CollectDcotConfig, sys.argv[1:] if argv is None else argv, "collect_dcot")
    counts = run_collect_dcot(cfg)
    print(f"collect_dcot: {json.dumps(counts)} -> {cfg.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    # Run as the importable module, not __main__, so Ray workers unpickle DcotCollector by reference.
    from jobs.collect_dcot import main as _main

    sys.exit(_main())
