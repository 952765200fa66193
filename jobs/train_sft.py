"""AdaR1 short-CoT model: TRL SFTTrainer on short-CoT data inside a Ray Train TorchTrainer with DeepSpeed.

    python -m jobs.train_sft --config configs/adar1/sft.yaml --model runs/tiny --train.max_steps 100

(or the ``sft:`` section of a pipeline YAML such as configs/r1-distill-qwen-7b.yaml).

Recipe: load the problems (embedded task or ``data.path``) → prompt/completion rows (written to
``<output_dir>/sft_data.jsonl`` for auditing) → fit on ``train.num_workers`` workers, each reporting the trainer's
checkpoints to Ray Train (re-running resumes) → export the last checkpoint as a Hugging Face model directory.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import TrainerCallback

from jobs.common import (
    deepspeed_config,
    fit_torch_trainer,
    init_ray,
    latest_checkpoint_dir,
    load_stage_config,
    skip_deepspeed_shm_build,
)
from synadapt.adar1.train import (
    SftConfig,
    TrainSettings,
    build_sft_trainer,
    export_hf_model,
    hf_checkpoint,
    sft_examples,
)
from synadapt.data.problems import write_jsonl

log = logging.getLogger(__name__)


class RunInfo(TrainerCallback):
    """Puts how the run is distributed and the step it resumed from (0 = fresh) into the trainer's log history,
    and so into the metrics reported to Ray Train and the exported ``train_info.json``."""

    def __init__(self, trainer, resume: str | None):
        self.info = {"distributed_type": str(trainer.accelerator.distributed_type.value),
                     "num_processes": trainer.accelerator.num_processes, "resumed_from_step": 0}
        if resume:
            self.info["resumed_from_step"] = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
            log.info("resuming from %s (step %d)", resume, self.info["resumed_from_step"])

    def on_train_begin(self, args, state, control, **kwargs):
        state.log_history.append({**self.info, "step": state.global_step})


class CompleteCheckpointReport(RayTrainReportCallback):
    """Reports a trainer checkpoint to Ray Train only once every rank has finished writing it.

    The HF Trainer writes each rank's RNG state (and DeepSpeed its per-rank ZeRO shards) after the last collective
    of a save and calls ``on_save`` without a barrier, so Ray's stock callback can copy a file that another rank is
    still writing (seen in CI: a 0-byte ``rng_state_1.pth`` in a persisted checkpoint, ``EOFError`` on resume). Hence
    the barrier. Ranks of one node share the trainer's output dir, so only each node's local rank 0 uploads it: two
    ranks never write the same file to storage, and each node still contributes the files only it holds.
    """

    def on_save(self, args, state, control, **kwargs):
        import ray.train
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if ray.train.get_context().get_local_rank() == 0:
            return super().on_save(args, state, control, **kwargs)
        metrics = {}
        for entry in state.log_history:
            metrics.update(entry)
        ray.train.report(metrics=metrics, checkpoint=None)


def check_checkpoint_complete(checkpoint_dir: str, world_size: int) -> None:
    """Raise ValueError naming what is missing if a trainer checkpoint is not whole: an empty file, or no RNG state
    for some rank (a resume from such a checkpoint would fail deep inside ``torch.load``)."""
    root = Path(checkpoint_dir)
    empty = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.stat().st_size == 0)
    if world_size > 1:
        empty += [f"rng_state_{r}.pth (missing)" for r in range(world_size)
                  if not (root / f"rng_state_{r}.pth").exists()]
    if empty:
        raise ValueError(f"checkpoint {checkpoint_dir} is incomplete: {', '.join(empty)}")


def train_loop(config: dict) -> None:
    """One Ray Train worker: build the TRL trainer, report its checkpoints, resume from the latest one."""
    import ray.train
    import torch
    from ray.train.huggingface.transformers import prepare_trainer

    settings: TrainSettings = config["cfg"].train
    torch.set_num_threads(settings.threads_per_worker)
    skip_deepspeed_shm_build()
    # Every worker gets every row (a small text set); the HF trainer's distributed sampler gives each rank its part.
    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    trainer = config["build"](config["cfg"], rows, config["work_dir"], config["deepspeed"])
    trainer.add_callback(CompleteCheckpointReport())
    trainer = prepare_trainer(trainer)
    resume = hf_checkpoint(latest_checkpoint_dir())
    if resume:
        check_checkpoint_complete(resume, trainer.accelerator.num_processes)
    trainer.add_callback(RunInfo(trainer, resume))
    trainer.train(resume_from_checkpoint=resume)


def fit_and_export(build, cfg, rows: list[dict], stage: str) -> str:
    """Fit ``build``'s trainer on Ray Train with ``cfg.train`` and export the result to ``cfg.output_dir``.

    ``rows`` reach the workers as a Ray Dataset that every worker reads whole: TRL needs a map-style dataset to
    tokenize, and its sampler splits it by rank and, on resume, skips exactly the batches already trained on, which
    holds only if every rank sees the same rows in the same order (hence one block).
    """
    import ray.data

    s: TrainSettings = cfg.train
    init_ray()
    name = s.run_name or stage
    # Trainer checkpoints go to a scratch dir shared by the workers of a node; Ray copies them to storage.
    work_dir = os.path.join(tempfile.gettempdir(), "synadapt-train", f"{name}-{uuid.uuid4().hex[:8]}")
    try:
        result = fit_torch_trainer(
            train_loop,
            {"cfg": cfg, "build": build, "work_dir": work_dir,
             "deepspeed": deepspeed_config(s.deepspeed_stage) if s.deepspeed_stage else None},
            datasets={"train": ray.data.from_items(rows, override_num_blocks=1)}, split_datasets=False,
            name=name, storage_path=s.storage_path or f"{cfg.output_dir.rstrip('/')}-ray", num_workers=s.num_workers,
            use_gpu=s.use_gpu, max_failures=s.max_failures, resources_per_worker={"CPU": s.cpus_per_worker})
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # this node's copy; Ray storage holds the checkpoints
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: training reported no checkpoint; is save_steps > 0?")
    with result.checkpoint.as_directory() as ckpt:
        out = export_hf_model(hf_checkpoint(ckpt), cfg.output_dir, {"stage": stage, "metrics": result.metrics})
    log.info("%s: model written to %s (final metrics %s)", stage, out, result.metrics)
    return out


def run_sft(cfg: SftConfig) -> str:
    """Train the short-CoT model; returns its Hugging Face model directory."""
    if not cfg.model:
        raise ValueError("sft: set model to the long-CoT model directory (e.g. --model runs/tiny)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    task = replace(cfg.task, short_format=cfg.short_format or cfg.task.short_format,  # TaskConfig checks both
                   short_steps=cfg.short_steps or cfg.task.short_steps)
    rows, skipped = sft_examples(cfg.data.load(task), tok, cfg.prompt, cfg.completion_template, cfg.rehearsal_share)
    rehearsal = sum(r["kind"] == "rehearsal" for r in rows)
    log.info("sft: %d short-CoT examples and %d long-CoT rehearsals (%d problems without short_cot skipped)",
             len(rows) - rehearsal, rehearsal, skipped)
    write_jsonl(Path(cfg.output_dir) / "sft_data.jsonl", rows)
    return fit_and_export(build_sft_trainer, cfg, rows, "sft")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(run_sft(load_stage_config(SftConfig, sys.argv[1:] if argv is None else argv, "sft")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
