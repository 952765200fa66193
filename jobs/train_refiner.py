"""Stage 2 on Ray Train + DeepSpeed: train the refiner (LoRA + projection) to produce continuous thoughts.

    python -m jobs.train_refiner --config configs/toy.yaml --model PATH --zsyn_dir runs/zsyn --out_dir runs/refiner
    ray job submit --working-dir . -- python -m jobs.train_refiner --config configs/r1-distill-qwen-7b.yaml ...

Every worker builds the refiner on its own copy of the base model and trains on its shard of the Z_syn examples
inside a DeepSpeed engine (ZeRO-2 by default; fp32 on CPU over gloo, bf16 on GPU over NCCL). Rank 0 reports a
checkpoint (PEFT adapter + projection.safetensors + step) every ``checkpoint_every`` steps; a killed worker makes
Ray Train restart the group, which resumes from the latest checkpoint.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from jobs.common import (deepspeed_config, fit_torch_trainer, init_ray, latest_checkpoint_dir, load_stage_config,
                         read_parquet_rows, skip_deepspeed_shm_build)
from synadapt.config import build
from synadapt.latent.stages import RefinerJobConfig, refiner_examples, zsyn_array

log = logging.getLogger(__name__)


def refiner_train_loop(config: dict) -> None:
    """Ray Train worker: build (or resume) the refiner, wrap it in DeepSpeed, train, report checkpoints."""
    import ray.train
    import torch

    from synadapt.latent.refiner import Refiner, train_refiner
    from synadapt.models.lm import load_model

    cfg = build(RefinerJobConfig, config["cfg"])
    torch.set_num_threads(cfg.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, tok = load_model(cfg.model)
    examples = refiner_examples(config["zsyn"], cfg.data.load(cfg.task), tok, cfg)[rank::world]
    resume = latest_checkpoint_dir()
    if resume:
        refiner = Refiner.load(model, Path(resume) / "refiner", trainable=True)
        start = json.loads((Path(resume) / "state.json").read_text())["step"]
    elif cfg.init_from:
        refiner, start = Refiner.load(model, cfg.init_from, trainable=True), 0
    else:
        refiner, start = Refiner(model, cfg.refiner, tok.convert_tokens_to_ids(cfg.refiner.draft_token)), 0
    engine = None
    if cfg.deepspeed_stage > 0:
        import deepspeed

        skip_deepspeed_shm_build()
        ds = deepspeed_config(cfg.deepspeed_stage, bf16=cfg.use_gpu, micro_batch=cfg.refiner.batch_size, grad_accum=1)
        engine, *_ = deepspeed.initialize(model=refiner, config=ds, optimizer=torch.optim.AdamW(
            refiner.trainable_parameters(), lr=cfg.refiner.lr))

    def report(step: int, metrics: dict, final: bool = False) -> None:
        if not final and step % cfg.checkpoint_every:
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                refiner.save(Path(tmp) / "refiner")
                (Path(tmp) / "state.json").write_text(json.dumps({"step": step}))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)

    stats = train_refiner(refiner, examples, cfg.refiner, start_step=start, engine=engine,
                          on_step=lambda step, parts: report(step, parts))
    report(stats["steps"], {k: v for k, v in stats.items() if k != "steps"}, final=True)


def run_train_refiner(cfg: RefinerJobConfig) -> dict:
    """Train the refiner on Ray Train; copies the final checkpoint's refiner to ``cfg.out_dir``; returns metrics."""
    if not cfg.model:
        raise ValueError("train_refiner: set model to the base model directory or hub id (--model PATH)")
    zsyn = [{"id": r["id"], "converged": bool(r["converged"]), "z": zsyn_array(r).tolist(),
             "shape": [int(x) for x in r["shape"]]} for r in read_parquet_rows(cfg.zsyn_dir) if not r.get("error")]
    if not any(r["converged"] for r in zsyn):
        raise ValueError(f"train_refiner: no converged Z_syn records in {cfg.zsyn_dir!r}; run jobs.synthesize first")
    init_ray()
    result = fit_torch_trainer(refiner_train_loop, {"cfg": asdict(cfg), "zsyn": zsyn}, name="train_refiner",
                               # Beside out_dir, never inside it: out_dir is replaced by the final checkpoint.
                               storage_path=cfg.storage_path or str(Path(cfg.out_dir).absolute().parent / "ray"),
                               num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, max_failures=cfg.max_failures,
                               resources_per_worker={"CPU": cfg.threads / max(cfg.num_workers, 1)}
                               if not cfg.use_gpu else None)
    with result.checkpoint.as_directory() as ckpt:
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        shutil.copytree(Path(ckpt) / "refiner", cfg.out_dir)
    return dict(result.metrics)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_stage_config(RefinerJobConfig, sys.argv[1:] if argv is None else argv, "train_refiner")
    print(f"train_refiner: {json.dumps(run_train_refiner(cfg))} -> {cfg.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    from jobs.train_refiner import main as _main

    sys.exit(_main())
