"""AdaR1 bi-level preference optimisation: TRL DPOTrainer on the merged model inside Ray Train with DeepSpeed.

    python -m jobs.train_dpo --config configs/adar1/dpo.yaml --model runs/adar1/merged --pairs runs/adar1/prefs/pairs.jsonl

The policy starts from the merged model and the reference is the same merged model (TRL loads the frozen copy
itself for a full fine-tune). Sigmoid loss, β / lr / epochs / max length from the config. Trainer checkpoints are
reported to Ray Train, so re-running with the same ``train.run_name`` resumes; the last one is exported as a
Hugging Face model directory to ``output_dir``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from jobs.common import load_stage_config
from jobs.train_sft import fit_and_export
from synadapt.adar1.train import DpoConfig, build_dpo_trainer

log = logging.getLogger(__name__)


def read_pairs(path: str) -> list[dict]:
    """Preference rows from a JSONL file; each needs non-empty ``prompt``, ``chosen`` and ``rejected`` strings."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(key), str) or not row[key]:
                    raise ValueError(f"{path} line {number}: field {key!r} must be a non-empty string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no preference pairs")
    return rows


def run_dpo(cfg: DpoConfig) -> str:
    """DPO-train the merged model on the preference pairs; returns the output model directory."""
    if not cfg.model or not cfg.pairs:
        raise ValueError("dpo: set model (the merged model directory) and pairs (pairs.jsonl from "
                         "jobs.build_preferences)")
    if not Path(cfg.pairs).exists():
        raise ValueError(f"dpo: preference file {cfg.pairs!r} does not exist")
    if not (Path(cfg.model) / "merge_info.json").exists():
        log.warning("dpo: %s is not a merge output (no merge_info.json); AdaR1 trains the merged model", cfg.model)
    rows = read_pairs(cfg.pairs)
    log.info("dpo: %d preference pairs from %s, beta %.3g, lr %.3g", len(rows), cfg.pairs, cfg.beta,
             cfg.train.learning_rate)
    # Only the trainer's fields: extra ones (level, question id) may differ in type between rows.
    return fit_and_export(build_dpo_trainer, cfg, [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows],
                          "dpo")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(run_dpo(load_stage_config(DpoConfig, sys.argv[1:] if argv is None else argv, "dpo")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
