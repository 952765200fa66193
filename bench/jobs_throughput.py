"""Job-layer scaling on this machine: DCoT collection with 1 vs 2 Ray Data actors, training with 1 vs 2 Ray Train
workers (LoRA + DeepSpeed ZeRO-2, gloo), in one Ray session.

    python bench/jobs_throughput.py [--questions 256] [--max-new-tokens 64] [--steps 40]

Collection: ``questions_per_s`` is questions / wall time of the whole map as a user sees it (actor start and model
load included); ``steady_questions_per_s`` counts from the first finished batch to the last, so fixed start-up cost
drops out. Training: samples / time inside the loop (worker-group start excluded, ``fit_seconds`` has it). The model
is a randomly initialised tiny reasoner of the default size, so every question generates exactly
``max_new_tokens`` tokens and the work per question is constant. Writes bench/out/jobs_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.collect_dcot import DcotCollector
from jobs.common import fit_torch_trainer, init_ray, map_to_parquet, read_parquet_rows
from synadapt.data.dcot import CollectDcotConfig
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig
from synadapt.models.lm import GenerationConfig


class TimedCollector(DcotCollector):
    """DcotCollector that stamps each record with the time its batch finished."""

    def run(self, rows: list[dict]) -> list[dict]:
        records = super().run(rows)
        now = time.time()
        return [{**r, "t_done": now} for r in records]


def train_loop(config: dict) -> None:
    """LoRA + ZeRO-2 steps on the embedded task; rank 0 reports samples/s measured inside the loop."""
    import ray.train
    import torch
    from peft import LoraConfig, get_peft_model

    from jobs.common import deepspeed_config, skip_deepspeed_shm_build
    from synadapt.data.task import make_splits
    from synadapt.models.lm import load_model
    from synadapt.models.tiny import encode_batch, training_text

    torch.set_num_threads(1)
    skip_deepspeed_shm_build()
    import deepspeed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, tok = load_model(config["model"], device="cpu")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
        config=deepspeed_config(2, bf16=False, micro_batch=config["batch"], grad_accum=1))
    problems = make_splits(config["task"])["train"]
    b = config["batch"]

    def step(i: int) -> None:
        start = (i * world + rank) * b % (len(problems) - b)
        loss = engine(**encode_batch(tok, [training_text(p, direct=False) for p in problems[start:start + b]])).loss
        engine.backward(loss)
        engine.step()

    step(0)  # warm-up: first-step allocations and the first collective
    t0 = time.perf_counter()
    for i in range(1, config["steps"] + 1):
        step(i)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        Path(d, "rate.json").write_text("{}")  # Train V2 only fills Result.metrics for a checkpointed report
        ray.train.report({"samples_per_s": config["steps"] * b * world / seconds, "loop_seconds": seconds},
                         checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="questions per Ray Data batch")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per run")
    ap.add_argument("--train-batch", type=int, default=16, help="samples per worker per step")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "jobs_throughput.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch

    from synadapt.models.tiny import TinyReasonerConfig, build_model, build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="jobsbench", dir="/tmp"))
    tok = build_tokenizer()
    build_model(tok, TinyReasonerConfig()).save_pretrained(work / "model")  # default size, random weights
    tok.save_pretrained(work / "model")
    n_params = sum(p.numel() for p in build_model(tok, TinyReasonerConfig()).parameters())
    task = TaskConfig(train_per_level=max(16, args.questions // 6 + 1))
    problems = DataSource(limit=args.questions).load(task)
    rows = [{k: p[k] for k in ("id", "question", "answer", "difficulty")} for p in problems]
    cfg = CollectDcotConfig(model=str(work / "model"), task=task, generation=GenerationConfig(
        max_new_tokens=args.max_new_tokens))
    init_ray(address="local", num_cpus=2, log_to_driver=False)
    torch.set_num_threads(1)

    results = {"machine": f"{os.cpu_count()} CPUs", "load_avg_at_start": os.getloadavg(), "model_params": n_params,
               "questions": len(rows), "max_new_tokens": args.max_new_tokens, "collection": {}, "training": {}}
    for actors in (1, 2):
        counts = map_to_parquet(rows, TimedCollector, {"cfg": cfg}, str(work / f"dcot{actors}"),
                                batch_size=args.batch_size, concurrency=actors, desc=f"collect x{actors}")
        done = sorted(r["t_done"] for r in read_parquet_rows(str(work / f"dcot{actors}")))
        results["collection"][actors] = {
            "seconds": counts["seconds"], "questions_per_s": round(len(rows) / counts["seconds"], 3),
            "steady_questions_per_s": round((len(done) - args.batch_size) / (done[-1] - done[0]), 3),
            "load_avg_1min_after": round(os.getloadavg()[0], 1)}  # the machine is shared: judge each figure by it
        print(f"collection, {actors} actor(s): {results['collection'][actors]}", flush=True)
    for workers in (1, 2):
        t0 = time.perf_counter()
        res = fit_torch_trainer(train_loop, {"model": str(work / "model"), "task": task, "steps": args.steps,
                                             "batch": args.train_batch},
                                name=f"bench-{workers}", storage_path=str(work / "ray"), num_workers=workers,
                                max_failures=0)
        results["training"][workers] = {"samples_per_s": round(res.metrics["samples_per_s"], 2),
                                        "loop_seconds": round(res.metrics["loop_seconds"], 2),
                                        "fit_seconds": round(time.perf_counter() - t0, 1),
                                        "load_avg_1min_after": round(os.getloadavg()[0], 1)}
        print(f"training, {workers} worker(s): {results['training'][workers]}", flush=True)
    col, tr = results["collection"], results["training"]
    results["collection_ratio_2_vs_1"] = round(col[2]["questions_per_s"] / col[1]["questions_per_s"], 3)
    results["collection_steady_ratio_2_vs_1"] = round(
        col[2]["steady_questions_per_s"] / col[1]["steady_questions_per_s"], 3)
    results["training_ratio_2_vs_1"] = round(tr[2]["samples_per_s"] / tr[1]["samples_per_s"], 3)
    results["load_avg_at_end"] = os.getloadavg()

    print("\n| stage | 1 | 2 | ratio 2/1 |\n|---|---|---|---|")
    print(f"| DCoT collection, questions/s incl. start-up (actors) | {col[1]['questions_per_s']} | "
          f"{col[2]['questions_per_s']} | {results['collection_ratio_2_vs_1']} |")
    print(f"| DCoT collection, steady questions/s (actors) | {col[1]['steady_questions_per_s']} | "
          f"{col[2]['steady_questions_per_s']} | {results['collection_steady_ratio_2_vs_1']} |")
    print(f"| LoRA ZeRO-2 training, samples/s (workers) | {tr[1]['samples_per_s']} | {tr[2]['samples_per_s']} | "
          f"{results['training_ratio_2_vs_1']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
