"""AdaR1 preference data: Ray Data samples K responses per question from the long and the short model, grades them
and builds the bi-level pairs.

    python -m jobs.build_preferences --config configs/adar1/preferences.yaml \
        --long_model runs/tiny --short_model runs/adar1/short_cot

Recipe: load the training questions and drop those that also appear in an evaluation set (normalised text) →
Ray Data actor pool (each actor loads both models once) samples and grades K responses per model per question into
``samples/`` (resumable Parquet) → group- and instance-level pairs on the driver → ``pairs.jsonl`` and
``pairs.parquet`` (prompt/chosen/rejected, plus metadata columns) and ``stats.json``.
"""
from __future__ import annotations

import json
import logging
import sys
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from jobs.common import init_ray, load_stage_config, map_to_parquet, read_parquet_rows
from synadapt.adar1.preferences import PreferenceConfig, dedupe_against, pairs_for_questions, sample_groups
from synadapt.data.problems import write_jsonl
from synadapt.data.source import parse_source
from synadapt.data.task import make_splits
from synadapt.models.lm import build_prompt

log = logging.getLogger(__name__)


class PreferenceSampler:
    """Ray Data actor: both models loaded once; per batch of questions, K graded samples from each."""

    def __init__(self, cfg: PreferenceConfig):
        import torch

        from synadapt.models.lm import load_model

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.models = {"long": load_model(cfg.long_model), "short": load_model(cfg.short_model)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        problems = [{"question": q, "answer": a} for q, a in zip(batch["question"], batch["answer"])]
        ids = [str(i) for i in batch["id"]]
        # Seeded by the batch's ids, so a retried batch samples the same responses on any actor.
        torch.manual_seed(zlib.crc32(f"{self.cfg.seed}:{','.join(ids)}".encode()))
        out: dict[str, list] = {"id": ids}
        for name, (model, tok) in self.models.items():
            groups = sample_groups(model, tok, problems, self.cfg.k, self.cfg.generation, self.cfg.prompt)
            for field in ("text", "correct", "tokens"):
                out[f"{name}_{field}"] = [[r[field] for r in g] for g in groups]
        return out


def training_questions(cfg: PreferenceConfig) -> tuple[list[dict], int]:
    """The training problems minus those whose normalised question is in an evaluation set; (kept, removed)."""
    problems = cfg.data.load(cfg.task)
    held = [p for spec in cfg.dedupe_sources for p in parse_source(spec).load(cfg.task)]
    if not cfg.data.path:
        splits = make_splits(cfg.task)
        held += splits["val"] + splits["test"]
    kept, removed = dedupe_against(problems, held)
    return kept, len(removed)


def check_sampling_settings(cfg: PreferenceConfig, samples_dir: Path) -> None:
    """Record the settings the samples in ``samples_dir`` come from; refuse to resume under different ones
    (the map is resumable by question id, so new settings would silently mix with old samples)."""
    settings = {"long_model": cfg.long_model, "short_model": cfg.short_model, "k": cfg.k, "seed": cfg.seed,
                "generation": asdict(cfg.generation), "prompt": asdict(cfg.prompt)}
    path = samples_dir / "settings.json"
    if path.exists() and json.loads(path.read_text()) != settings:
        raise ValueError(f"{samples_dir} holds samples drawn with other settings ({path}); use another output_dir "
                         "or delete it")
    samples_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def run_build_preferences(cfg: PreferenceConfig) -> dict:
    """Sample, grade and pair; returns the statistics (also written to ``stats.json``)."""
    if not cfg.long_model or not cfg.short_model:
        raise ValueError("build_preferences: set long_model and short_model")
    from transformers import AutoTokenizer

    out = Path(cfg.output_dir)
    problems, removed = training_questions(cfg)
    log.info("build_preferences: %d training questions (%d removed as duplicates of evaluation questions)",
             len(problems), removed)
    if not problems:
        raise ValueError("build_preferences: no training questions left after removing evaluation duplicates")
    check_sampling_settings(cfg, out / "samples")
    init_ray()
    rows = [{"id": p["id"], "question": p["question"], "answer": p["answer"]} for p in problems]
    counts = map_to_parquet(rows, PreferenceSampler, {"cfg": cfg}, str(out / "samples"), batch_size=cfg.batch_size,
                            concurrency=cfg.concurrency, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                            desc="PreferenceSampler")
    wanted = {p["id"] for p in problems}
    samples = [s for s in read_parquet_rows(str(out / "samples")) if s["id"] in wanted]
    tok = AutoTokenizer.from_pretrained(cfg.long_model)
    questions = {p["id"]: {"prompt": build_prompt(tok, p["question"], "long", cfg.prompt),
                           "difficulty": p.get("difficulty")} for p in problems}
    pairs, stats = pairs_for_questions(samples, cfg, questions)
    stats.update(dedupe_removed=removed, sampling=counts,
                 accuracy_long=float(np.mean([c for s in samples for c in s["long_correct"]])),
                 accuracy_short=float(np.mean([c for s in samples for c in s["short_correct"]])),
                 mean_tokens_long=float(np.mean([n for s in samples for n in s["long_tokens"]])),
                 mean_tokens_short=float(np.mean([n for s in samples for n in s["short_tokens"]])))
    write_jsonl(out / "pairs.jsonl", pairs)
    if pairs:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(pairs), out / "pairs.parquet")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    share = stats["share_prefer_long"]
    print(f"questions {stats['questions']}: prefer long {stats['prefer_long']}, prefer short {stats['prefer_short']}"
          f" (long share {share if share is None else f'{share:.1%}'}), dropped (both 0) {stats['dropped_both_zero']}")
    for level, c in stats["by_difficulty"].items():
        s = c["share_prefer_long"]
        print(f"  level {level}: prefer long {c.get('long', 0)}, short {c.get('short', 0)}, dropped "
              f"{c.get('dropped', 0)}" + ("" if s is None else f" (long share {s:.1%})"))
    print(f"pairs {stats['pairs']}: {stats['pairs_by_level']} -> {out / 'pairs.jsonl'}")
    return stats


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_build_preferences(load_stage_config(PreferenceConfig, sys.argv[1:] if argv is None else argv,
                                            "preferences"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
