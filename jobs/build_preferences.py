"""AdaR1 preference data: Ray Data samples K responses per question from the long and the short model, grades them
and builds the bi-level pairs.

    python -m jobs.build_preferences --config configs/adar1/preferences.yaml \
        --long_model runs/tiny --short_model runs/adar1/short_cot

Recipe (``generation.backend: hf``; ``vllm`` samples in vLLM engine actors instead, jobs/vllm_generate.py): load the
training questions and drop those that also appear in an evaluation set (normalised text) →
Ray Data actor pool (each actor loads both models once) samples and grades K responses per model per question into
``samples/`` (resumable Parquet) → group- and instance-level pairs on the driver, one shard of samples at a time →
``pairs.jsonl`` and ``pairs.parquet`` (prompt/chosen/rejected, plus metadata columns) and ``stats.json``.
``output_dir`` may be a URI (``s3://bucket/prefs``).
"""
from __future__ import annotations

import json
import logging
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict

import numpy as np

from jobs.common import (
    init_ray,
    iter_parquet_shards,
    join_path,
    load_stage_config,
    map_to_parquet,
    read_text,
    storage,
    write_text,
)
from jobs.vllm_generate import sample_preferences_vllm
from synadapt.adar1.preferences import PreferenceConfig, dedupe_against, pairs_for_questions, sample_groups
from synadapt.data.source import parse_source
from synadapt.data.task import make_splits
from synadapt.models.lm import build_prompt
from synadapt.models.vllm_engine import check_backend

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


def check_sampling_settings(cfg: PreferenceConfig, samples_dir: str) -> None:
    """Record the settings the samples in ``samples_dir`` come from; refuse to resume under different ones
    (the map is resumable by question id, so new settings would silently mix with old samples)."""
    settings = {"long_model": cfg.long_model, "short_model": cfg.short_model, "k": cfg.k, "seed": cfg.seed,
                "generation": asdict(cfg.generation), "prompt": asdict(cfg.prompt)}
    path = join_path(samples_dir, "settings.json")
    old = read_text(path)
    if old is not None and json.loads(old) != settings:
        raise ValueError(f"{samples_dir} holds samples drawn with other settings ({path}); use another output_dir "
                         "or delete it")
    write_text(path, json.dumps(settings, indent=2))


def merge_pair_stats(parts: list[dict]) -> dict:
    """One statistics dict from the :func:`pairs_for_questions` statistics of disjoint sets of questions."""
    total, pairs_by_level, by_level = Counter(), Counter(), defaultdict(Counter)
    for part in parts:
        total.update({k: part[k] for k in ("questions", "dropped_both_zero", "prefer_long", "prefer_short", "pairs")})
        pairs_by_level.update(part["pairs_by_level"])
        for level, c in part["by_difficulty"].items():
            by_level[level].update({k: v for k, v in c.items() if k != "share_prefer_long"})

    def share(long: int, short: int) -> float | None:
        return long / (long + short) if long + short else None

    return {"questions": total["questions"], "dropped_both_zero": total["dropped_both_zero"],
            "prefer_long": total["prefer_long"], "prefer_short": total["prefer_short"],
            "share_prefer_long": share(total["prefer_long"], total["prefer_short"]), "pairs": total["pairs"],
            "pairs_by_level": dict(pairs_by_level),
            "by_difficulty": {lv: {**c, "share_prefer_long": share(c["long"], c["short"])}
                              for lv, c in sorted(by_level.items())}}


def write_pairs(cfg: PreferenceConfig, samples_dir: str, questions: dict[str, dict]) -> dict:
    """Pair the samples shard by shard into ``pairs.jsonl`` and ``pairs.parquet``; returns the statistics.

    Only one shard's samples (K responses per model per question) and pairs are on the driver at a time.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, out = storage(cfg.output_dir)
    parts, sums = [], Counter()
    parquet = None
    with fs.open_output_stream(f"{out}/pairs.jsonl") as jsonl:
        for samples in iter_parquet_shards(samples_dir):
            samples = [s for s in samples if s["id"] in questions]
            if not samples:
                continue
            pairs, stats = pairs_for_questions(samples, cfg, questions)
            parts.append(stats)
            for m in ("long", "short"):
                for f in ("correct", "tokens"):
                    sums[f"{m}_{f}"] += sum(int(v) for s in samples for v in s[f"{m}_{f}"])
                sums[f"{m}_n"] += sum(len(s[f"{m}_correct"]) for s in samples)
            jsonl.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs).encode())
            if pairs:
                table = pa.Table.from_pylist(pairs)
                parquet = parquet or pq.ParquetWriter(f"{out}/pairs.parquet", table.schema, filesystem=fs)
                parquet.write_table(table.cast(parquet.schema))
    if parquet is not None:
        parquet.close()
    stats = merge_pair_stats(parts)
    for m in ("long", "short"):
        n = sums[f"{m}_n"]
        stats[f"accuracy_{m}"] = sums[f"{m}_correct"] / n if n else float("nan")
        stats[f"mean_tokens_{m}"] = sums[f"{m}_tokens"] / n if n else float("nan")
    return stats


def run_build_preferences(cfg: PreferenceConfig) -> dict:
    """Sample, grade and pair; returns the statistics (also written to ``stats.json``)."""
    if not cfg.long_model or not cfg.short_model:
        raise ValueError("build_preferences: set long_model and short_model")
    from transformers import AutoTokenizer

    problems, removed = training_questions(cfg)
    log.info("build_preferences: %d training questions (%d removed as duplicates of evaluation questions)",
             len(problems), removed)
    if not problems:
        raise ValueError("build_preferences: no training questions left after removing evaluation duplicates")
    samples_dir = join_path(cfg.output_dir, "samples")
    check_backend(cfg.generation.backend)  # a missing vLLM extra fails here, before Ray starts
    check_sampling_settings(cfg, samples_dir)
    init_ray()
    rows = [{"id": p["id"], "question": p["question"], "answer": p["answer"]} for p in problems]
    if cfg.generation.backend == "vllm":
        counts = sample_preferences_vllm(cfg, rows, samples_dir)
    else:
        counts = map_to_parquet(rows, PreferenceSampler, {"cfg": cfg}, samples_dir, batch_size=cfg.batch_size,
                                concurrency=cfg.concurrency, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                retries=cfg.retries, desc="PreferenceSampler")
    tok = AutoTokenizer.from_pretrained(cfg.long_model)
    questions = {p["id"]: {"prompt": build_prompt(tok, p["question"], "long", cfg.prompt),
                           "difficulty": p.get("difficulty")} for p in problems}
    stats = write_pairs(cfg, samples_dir, questions)
    stats.update(dedupe_removed=removed, sampling=counts)
    write_text(join_path(cfg.output_dir, "stats.json"), json.dumps(stats, indent=2))
    share = stats["share_prefer_long"]
    print(f"questions {stats['questions']}: prefer long {stats['prefer_long']}, prefer short {stats['prefer_short']}"
          f" (long share {share if share is None else f'{share:.1%}'}), dropped (both 0) {stats['dropped_both_zero']}")
    for level, c in stats["by_difficulty"].items():
        s = c["share_prefer_long"]
        print(f"  level {level}: prefer long {c.get('long', 0)}, short {c.get('short', 0)}, dropped "
              f"{c.get('dropped', 0)}" + ("" if s is None else f" (long share {s:.1%})"))
    print(f"pairs {stats['pairs']}: {stats['pairs_by_level']} -> {join_path(cfg.output_dir, 'pairs.jsonl')}")
    return stats


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_build_preferences(load_stage_config(PreferenceConfig, sys.argv[1:] if argv is None else argv,
                                            "preferences"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
