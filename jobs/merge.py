"""AdaR1 merge: θ = α·θ_long + (1−α)·θ_short streamed from safetensors shards; optionally an α sweep.

    python -m jobs.merge --config configs/adar1/merge.yaml --long_model runs/tiny --short_model runs/adar1/short_cot
    python -m jobs.merge ... --sweep '[0.5, 0.6, 0.7, 0.8, 0.9]'

A single merge needs no Ray. A sweep merges each α on the driver (one at a time, streaming) while Ray tasks
evaluate the merged models on the validation split in long-CoT mode; the winner (``MergeConfig.rule``)
is moved to ``output_dir`` and every α's accuracy and length is written to ``sweep.json``.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from jobs.common import init_ray, load_stage_config
from synadapt.adar1.merge import MERGE_RULES, MergeConfig, merge_checkpoints, pick_alpha

log = logging.getLogger(__name__)


def evaluate_model(model_dir: str, problems: list[dict], cfg: MergeConfig) -> list[dict]:
    """Long-CoT evaluation of one merged model (runs as a Ray task)."""
    import torch

    from synadapt.eval.evaluate import evaluate_generation
    from synadapt.models.lm import load_model

    torch.set_num_threads(cfg.threads)
    model, tok = load_model(model_dir)
    return evaluate_generation(model, tok, problems, "long", cfg.generation, cfg.prompt)


def _clear(path: Path) -> None:
    """Remove a previous merge output; refuse to delete a directory that is not one."""
    if path.exists():
        if not (path / "merge_info.json").exists() and any(path.iterdir()):
            raise ValueError(f"{path} exists and is not a merge output; choose another output_dir")
        shutil.rmtree(path)


def run_merge(cfg: MergeConfig) -> str:
    """Merge at ``cfg.alpha``, or run the sweep when ``cfg.sweep`` is set; returns the merged model directory."""
    if not cfg.long_model or not cfg.short_model:
        raise ValueError("merge: set long_model and short_model")
    shard_bytes = int(cfg.max_shard_gb * 1024**3)
    out = Path(cfg.output_dir)
    if not cfg.sweep:
        info = merge_checkpoints(cfg.long_model, cfg.short_model, out, cfg.alpha, max_shard_bytes=shard_bytes)
        print(f"merged at alpha {cfg.alpha}: {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB, "
              f"{info['shards']} shard(s), {info['seconds']} s -> {out}")
        return str(out)

    import ray

    from synadapt.eval.metrics import summarize

    init_ray()
    problems = cfg.val.load(cfg.task)
    sweep_dir = Path(f"{cfg.output_dir.rstrip('/')}-sweep")
    evaluate = ray.remote(num_cpus=cfg.eval_num_cpus, num_gpus=cfg.eval_num_gpus)(evaluate_model)
    futures = {}
    for alpha in cfg.sweep:
        model_dir = sweep_dir / f"alpha-{alpha:.3f}"
        merge_checkpoints(cfg.long_model, cfg.short_model, model_dir, alpha, max_shard_bytes=shard_bytes)
        futures[alpha] = evaluate.remote(str(model_dir), problems, cfg)  # evaluates while the next α merges
    results = []
    for alpha, future in futures.items():
        row = summarize(f"adar1_merge_a{alpha:g}", ray.get(future), alpha=alpha)
        results.append(row)
        log.info("alpha %.3f: accuracy %.3f, mean generated tokens %.1f", alpha, row["accuracy"],
                 row["mean_generated_tokens"])
    best = pick_alpha(results, cfg.acc_tolerance, cfg.rule)
    _clear(out)
    best_dir = sweep_dir / f"alpha-{best['alpha']:.3f}"
    (shutil.copytree if cfg.keep_sweep_models else shutil.move)(str(best_dir), str(out))
    if not cfg.keep_sweep_models:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    sweep = {"rule": cfg.rule, "rule_text": MERGE_RULES[cfg.rule],
             "acc_tolerance": cfg.acc_tolerance, "best_alpha": best["alpha"], "model_dir": str(out),
             "validation_questions": len(problems), "results": results, "config": asdict(cfg)}
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2, default=str))
    print("alpha  accuracy  mean_tokens")
    for r in results:
        print(f"{r['alpha']:<6g} {r['accuracy']:<9.3f} {r['mean_generated_tokens']:.1f}"
              + ("  <- selected" if r is best else ""))
    return str(out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(run_merge(load_stage_config(MergeConfig, sys.argv[1:] if argv is None else argv, "merge")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
