"""Fast probe of one latent recipe: train a refiner for a step budget on the shipped reasoner, then score every control.

    python bench/latent_probe.py --name best                       # the toy config's refiner recipe
    python bench/latent_probe.py --name prev --steps 400 --refiner.slot_source previous --refiner.lambda_ce 1
    python bench/latent_probe.py --name read --steps 0             # readability of the targets only

In-process, no Ray: plain PyTorch on checkpoints/tiny-reasoner with ``train_refiner`` (the pipeline's loop) on the
embedded train split, evaluated on held-out test questions per level. Rows: long CoT and NoThinking (decoded once,
cached in bench/out/), the per-slot targets fed exactly to the reader (a target the reader cannot read can never be
reached), ccot (refined latents), ccot_zeroed, ccot_shuffled (each question gets the next question's latents),
ccot_pause (``--pause true``: the same training with every latent one learned vector) and slot_acc (share of slots
whose LM-head decoding is the target token) and chain_right (share of questions with every slot right). A step budget, not a time budget, so results do not depend on the
machine's load; steps/s and /proc/loadavg are printed beside them. Writes bench/out/latent_probe_<name>.json and
appends the table and the command to bench/latent_probe_log.md.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synadapt.config import describe, load_config
from synadapt.data.task import TaskConfig, make_splits
from synadapt.latent.examples import make_example
from synadapt.latent.refiner import LATENT_CONTROLS, Refiner, RefinerConfig, train_refiner
from synadapt.latent.sequence import answer_correct
from synadapt.models.lm import GenerationConfig, PromptFormat, load_model

OUT = ROOT / "bench" / "out"
LEVELS = range(1, 7)


@dataclass
class ProbeConfig:
    """One probe run: the refiner recipe (defaults: configs/toy.yaml) and its budget."""

    name: str = "probe"
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    steps: int = 300
    """Training steps (0: readability rows and baselines only)."""
    pause: bool = False
    """Also train the trained-pause control (same recipe and steps, latents = one learned vector)."""
    eval_per_level: int = 50
    train_per_level: int = 400
    """Training questions per level (the embedded split's size by default; the task is synthetic, so more is free)."""
    threads: int = 1
    """torch threads; on a loaded machine 2 threads oversubscribe the cores and run far slower than 1."""
    seed: int = 0
    model: str = str(ROOT / "checkpoints" / "tiny-reasoner")
    save: bool = False
    """Save the trained refiner to bench/out/refiner_<name> (PEFT adapter + projection) for inspection."""


def toy_refiner_defaults() -> dict:
    return yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())["train_refiner"]["refiner"]


def by_level(correct: torch.Tensor, levels: torch.Tensor) -> dict:
    row = {str(lv): round(correct[levels == lv].float().mean().item(), 3) for lv in LEVELS}
    row["all"] = round(correct.float().mean().item(), 3)
    return row


def baselines(model, tok, problems: list[dict], model_dir: str) -> dict:
    """long CoT, NoThinking and the reasoner's own compact chain per level, decoded once per model and eval set."""
    from synadapt.eval.evaluate import evaluate_generation

    weights = Path(model_dir) / "model.safetensors"
    stamp = int(weights.stat().st_mtime) if weights.exists() else 0
    key = f"{model_dir}@{stamp}-{len(problems)}-{problems[0]['id']}-{problems[-1]['id']}"
    cache = OUT / "latent_probe_baselines.json"
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in stored:
        levels = torch.tensor([p["difficulty"] for p in problems])
        stored[key] = {}
        for mode, name in (("long", "long_cot"), ("nothink", "nothink"), ("short", "short_cot")):
            recs = evaluate_generation(model, tok, problems, mode, GenerationConfig(max_new_tokens=96), PromptFormat())
            stored[key][name] = by_level(torch.tensor([r["correct"] for r in recs]), levels)
            stored[key][name + "_tokens"] = round(sum(r["generated_tokens"] for r in recs) / len(recs), 1)
        cache.write_text(json.dumps(stored, indent=1))
    return stored[key]


@torch.no_grad()
def latent_rows(refiner: Refiner, examples: list[dict], prefix: str = "ccot", batch: int = 100) -> dict:
    """Accuracy of the reader after each latent control, the target latents fed exactly, and slot accuracy."""
    refiner.eval()
    levels = torch.tensor([e["difficulty"] for e in examples])
    hits = {c: [] for c in LATENT_CONTROLS + ("targets", "slot_acc", "chain_right")}
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        prompts, tails = [e["prompt_ids"] for e in chunk], [e["tail_ids"] for e in chunk]
        targets = torch.tensor([e["target_ids"] for e in chunk])
        for control in LATENT_CONTROLS:
            z, _, _ = refiner.refine(prompts, control)
            hits[control].append(answer_correct(*refiner.answer_logits(prompts, z, tails)))
            if control == "refined":
                right = refiner.slot_logits(z).argmax(-1) == targets
                hits["slot_acc"].append(right.float().mean(1))
                # Every slot right: the reader then sees exactly the targets, which it reads at targets_exact.
                hits["chain_right"].append(right.all(1))
        z = refiner.embed(targets)
        hits["targets"].append(answer_correct(*refiner.answer_logits(prompts, z, tails)))
    names = {"refined": prefix, "zeroed": prefix + "_zeroed", "shuffled": prefix + "_shuffled",
             "targets": "targets_exact", "slot_acc": "slot_acc", "chain_right": "chain_right"}
    return {names[k]: by_level(torch.cat(v), levels) for k, v in hits.items()}


def train(model, tok, cfg: RefinerConfig, examples: list[dict], steps: int, seed: int) -> tuple[Refiner, dict]:
    torch.manual_seed(seed)
    refiner = Refiner(model, cfg, tok.convert_tokens_to_ids(cfg.draft_token))
    curve = []

    def on_checkpoint(stats):  # every 25 steps: the moving averages of every loss term
        curve.append(stats)
        print("  " + " ".join(f"{k} {v}" for k, v in stats.items()), flush=True)

    t0 = time.time()
    budget = RefinerConfig(**{**asdict(cfg), "max_steps": steps, "train_seconds": 1e9})
    stats = train_refiner(refiner, examples, budget, on_checkpoint=on_checkpoint, checkpoint_every=25,
                          log_every=10 ** 9)
    seconds = time.time() - t0
    return refiner, {**stats, "steps_per_s": round(steps / max(seconds, 1e-9), 2), "curve": curve}


def table(rows: dict) -> str:
    lines = ["| row | " + " | ".join(f"L{lv}" for lv in LEVELS) + " | all |",
             "|---|" + "---|" * (len(LEVELS) + 1)]
    for name, row in rows.items():
        if isinstance(row, dict):
            lines.append(f"| {name} | " + " | ".join(f"{row[str(lv)]:.2f}" for lv in LEVELS) + f" | {row['all']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(f"usage: python bench/latent_probe.py [--dotted.key VALUE ...]\n\n{ProbeConfig.__doc__}\n")
        print("\n".join(describe(ProbeConfig)))
        return 0
    cfg = load_config(ProbeConfig, overrides={"refiner": toy_refiner_defaults()})
    cfg = load_config(ProbeConfig, overrides=_merge(asdict(cfg), argv))
    torch.set_num_threads(cfg.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(cfg.model)
    task = TaskConfig(train_per_level=cfg.train_per_level)
    splits = make_splits(task)
    test = [p for lv in LEVELS for p in [q for q in splits["test"] if q["difficulty"] == lv][:cfg.eval_per_level]]
    fmt = PromptFormat()

    def ex(problems, rc):
        return [make_example(p, tok, fmt, rc.m, targets=rc.targets, target_pad=rc.target_pad,
                             target_prefix=rc.target_prefix, target_align=rc.target_align) for p in problems]

    rows = dict(baselines(model, tok, test, cfg.model))
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    print(f"probe {cfg.name}: loadavg {' '.join(load0)}", flush=True)
    train_stats = {}
    refiner, stats = train(model, tok, cfg.refiner, ex(splits["train"], cfg.refiner), cfg.steps, cfg.seed)
    train_stats["ccot"] = stats
    if cfg.save:
        refiner.save(OUT / f"refiner_{cfg.name}")
    rows.update(latent_rows(refiner, ex(test, cfg.refiner)))
    if cfg.pause:
        pause_cfg = RefinerConfig(**{**asdict(cfg.refiner), "pause": True})
        pause, stats = train(model, tok, pause_cfg, ex(splits["train"], pause_cfg), cfg.steps, cfg.seed)
        train_stats["ccot_pause"] = stats
        rows["ccot_pause"] = latent_rows(pause, ex(test, pause_cfg), prefix="ccot_pause")["ccot_pause"]
    # The reader's own view of the targets before training (the frozen base) is the readability check.
    with torch.no_grad():
        base_reader = Refiner(model, RefinerConfig(**{**asdict(cfg.refiner), "reader": "base"}), refiner.draft_id,
                              adapted=refiner.adapted, projection=refiner.proj)
        rows["targets_exact_base"] = latent_rows(base_reader, ex(test, cfg.refiner))["targets_exact"]
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    result = {"name": cfg.name, "config": asdict(cfg), "rows": rows, "train": train_stats,
              "loadavg_start": load0, "loadavg_end": load1, "command": "python bench/latent_probe.py " + " ".join(argv)}
    (OUT / f"latent_probe_{cfg.name}.json").write_text(json.dumps(result, indent=1))
    md = table(rows)
    speed = ", ".join(f"{k}: {v['steps']} steps at {v['steps_per_s']} steps/s" for k, v in train_stats.items())
    with open(ROOT / "bench" / "latent_probe_log.md", "a") as log:  # committed: every recipe tried
        log.write(f"\n## {cfg.name}\n\n`{result['command']}`\n\n{md}\n\n{speed}; loadavg {' '.join(load0)} → "
                  f"{' '.join(load1)}; long CoT {rows.get('long_cot_tokens')} tokens/question\n")
    print(md)
    print(speed, "loadavg", " ".join(load1))
    return 0


def _merge(current: dict, argv: list[str]) -> dict:
    from synadapt.config import deep_merge, parse_overrides

    return deep_merge(current, parse_overrides(argv))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
