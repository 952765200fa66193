"""Stage 2 on Ray Train + DeepSpeed: train the refiner (LoRA + projection) to produce continuous thoughts.

    python -m jobs.train_refiner --config configs/toy.yaml --model PATH --zsyn_dir runs/zsyn --out_dir runs/refiner
    ray job submit --working-dir . -- python -m jobs.train_refiner --config configs/r1-distill-qwen-7b.yaml ...

The Z_syn records reach the workers through Ray Data: read tasks load the synthesize stage's Parquet shards and
every worker gets an equal share (``ray.train.get_dataset_shard("zsyn")``); the latents never pass through the
driver. Every worker builds the refiner on its own copy of the base model inside a DeepSpeed engine (ZeRO-2 by
default; fp32 on CPU over gloo, bf16 on GPU over NCCL) or, with ``deepspeed_stage: 0``, plain DDP, so all ranks
share one optimisation. Every ``checkpoint_every`` steps (the same steps on every rank: rank 0's clock decides
when a time budget is spent) each rank reports its part of a checkpoint: the ZeRO optimizer partition, and from
rank 0 the PEFT adapter + projection and the step. A killed worker makes Ray Train restart the group, which resumes
from the latest checkpoint with the optimizer state; re-running the job with the same storage does too.
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
    deepspeed_config,
    fit_torch_trainer,
    init_ray,
    latest_checkpoint_dir,
    load_stage_config,
    skip_deepspeed_shm_build,
)
from synadapt.config import build
from synadapt.latent.stages import RefinerJobConfig, refiner_examples

log = logging.getLogger(__name__)


def zsyn_records(zsyn_dir: str):
    """The converged, error-free Z_syn records (id, z, shape) in ``zsyn_dir``'s Parquet shards, as a Ray Dataset."""
    import ray.data
    from ray.data.expressions import col

    ds = ray.data.read_parquet(zsyn_dir)  # only *.parquet: a writer's .tmp and a set-aside .bad shard are skipped
    usable = col("converged")
    if "error" in ds.schema().names:  # records written without the error column (older runs, other tools)
        usable = usable & (col("error") == "")
    return ds.filter(expr=usable).select_columns(["id", "z", "shape"])


def checkpoint_trainable_weights_only(refiner) -> None:
    """Make ``refiner.state_dict()`` (what DeepSpeed checkpoints) hold only the trainable weights. The frozen base
    is reachable under two names, inside the adapter and as ``refiner.base``, and DeepSpeed's
    ``exclude_frozen_parameters`` drops only the first: a 7B base would be copied into every checkpoint."""
    trainable = {name for name, p in refiner.named_parameters() if p.requires_grad}

    def keep_trainable(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.removeprefix(prefix) not in trainable]:
            del state_dict[key]

    refiner.register_state_dict_post_hook(keep_trainable)


def refiner_train_loop(config: dict) -> None:
    """Ray Train worker: examples from its Z_syn shard, the refiner (fresh, ``init_from`` or the latest checkpoint)
    in a DeepSpeed engine or DDP, train, report checkpoints."""
    import ray.train
    import ray.train.torch
    import torch

    from synadapt.latent.refiner import Refiner, train_refiner
    from synadapt.models.lm import load_model

    cfg = build(RefinerJobConfig, config["cfg"])
    torch.set_num_threads(cfg.threads)
    rank = ray.train.get_context().get_world_rank()
    model, tok = load_model(cfg.model)
    examples = refiner_examples(ray.train.get_dataset_shard("zsyn").iter_rows(), cfg.data.load(cfg.task), tok, cfg)
    if not examples:
        raise ValueError(f"train_refiner: worker {rank} has no Z_syn record of a known problem: are data and task "
                         "those of the synthesize run?")
    resume = latest_checkpoint_dir()
    state = json.loads((Path(resume) / "state.json").read_text()) if resume else {"step": 0, "seconds": 0.0}
    if resume:
        refiner = Refiner.load(model, Path(resume) / "refiner", trainable=True)
    elif cfg.init_from:
        refiner = Refiner.load(model, cfg.init_from, trainable=True)
    else:
        refiner = Refiner(model, cfg.refiner, tok.convert_tokens_to_ids(cfg.refiner.draft_token))
    optimizer = torch.optim.AdamW(refiner.trainable_parameters(), lr=cfg.refiner.lr)
    if cfg.deepspeed_stage:
        import deepspeed

        skip_deepspeed_shm_build()
        ds = deepspeed_config(cfg.deepspeed_stage, bf16=cfg.use_gpu, micro_batch=cfg.refiner.batch_size, grad_accum=1)
        checkpoint_trainable_weights_only(refiner)
        engine, *_ = deepspeed.initialize(model=refiner, optimizer=optimizer, config=ds)
        # The adapter is already loaded; this restores each rank's ZeRO partition of the Adam state.
        if resume and engine.load_checkpoint(str(Path(resume) / "deepspeed"), load_module_strict=False)[0] is None:
            raise ValueError(f"train_refiner: checkpoint {resume} has no DeepSpeed state (written with "
                             "deepspeed_stage 0?); resume with the stage it was written with")
    else:
        # Which weights a step uses depends on the loss settings (the pause control, a full copy's unused head).
        engine = ray.train.torch.prepare_model(refiner, parallel_strategy_kwargs={"find_unused_parameters": True})
        if resume:
            optimizer.load_state_dict(torch.load(Path(resume) / "optimizer.pt", weights_only=True))

    def checkpoint(stats: dict) -> None:
        # Every rank reports one directory; Ray merges them into the checkpoint (DeepSpeed writes one file per rank).
        with tempfile.TemporaryDirectory() as tmp:
            if cfg.deepspeed_stage:
                engine.save_checkpoint(str(Path(tmp) / "deepspeed"), exclude_frozen_parameters=True)
            if rank == 0:
                refiner.save(Path(tmp) / "refiner")
                if not cfg.deepspeed_stage:
                    torch.save(optimizer.state_dict(), Path(tmp) / "optimizer.pt")
                (Path(tmp) / "state.json").write_text(json.dumps({"step": stats["steps"],
                                                                   "seconds": stats["seconds"]}))
            files = any(Path(tmp).iterdir())
            ray.train.report({**stats, "examples": len(examples), "resumed_from_step": state["step"]},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if files else None)

    stats = train_refiner(refiner, examples, cfg.refiner, start_step=state["step"], start_seconds=state["seconds"],
                          engine=engine, optimizer=optimizer, on_checkpoint=checkpoint,
                          checkpoint_every=cfg.checkpoint_every)
    checkpoint(stats)


def run_train_refiner(cfg: RefinerJobConfig) -> dict:
    """Train the refiner on Ray Train; copies the final checkpoint's refiner to ``cfg.out_dir``; returns metrics."""
    if not cfg.model:
        raise ValueError("train_refiner: set model to the base model directory or hub id (--model PATH)")
    if cfg.deepspeed_stage not in (0, 2):
        raise ValueError(f"train_refiner: deepspeed_stage {cfg.deepspeed_stage} is not supported; use 2 (ZeRO-2) or "
                         "0 (DDP): ZeRO-3 partitions the weights that saving the adapter reads")
    init_ray()
    try:
        # Read before the fit, by Ray Data tasks into the object store: once the training workers hold every CPU of
        # a small cluster, read tasks could not be scheduled and the workers would wait for their shards forever.
        zsyn = zsyn_records(cfg.zsyn_dir).materialize()
    except (FileNotFoundError, ValueError) as e:  # Ray Data: no such directory / no Parquet files in it
        raise ValueError(f"train_refiner: cannot read Z_syn records in {cfg.zsyn_dir!r} ({e}); run jobs.synthesize "
                         "first") from e
    if zsyn.count() < max(cfg.num_workers, 1):
        raise ValueError(f"train_refiner: {zsyn.count()} converged Z_syn records in {cfg.zsyn_dir!r}, fewer than the "
                         f"{cfg.num_workers} workers; run jobs.synthesize first (or on more questions)")
    result = fit_torch_trainer(refiner_train_loop, {"cfg": asdict(cfg)}, name="train_refiner",
                               datasets={"zsyn": zsyn},
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
