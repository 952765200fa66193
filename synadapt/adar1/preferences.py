"""AdaR1 bi-level preference data (METHOD.md §2): sampling, pairs, train/eval dedupe. No Ray here.

Pair construction and dedupe are pure functions; :func:`sample_groups` is the only one that runs a model.

Per question, K sampled responses from the long model and K from the short model, each ``{"text", "correct",
"tokens"}``:

- **Group level** — the long group is preferred when ``acc_long − acc_short > eps`` (eps = 1/(2K)), otherwise the
  short one. Candidate pairs are (chosen from the preferred group, rejected from the other); chosen is restricted to
  correct responses and rejected to wrong ones whenever such exist. M1 of them are kept at random.
- **Instance level** — inside the preferred group, its shortest correct response is chosen against its M2 longest
  responses (its longest wrong ones when it has wrong ones).
- Questions where both groups score 0 are dropped.

[ours] Pairs are of distinct texts: a pair whose chosen and rejected texts are identical is skipped (it carries no
DPO signal), so a group of identical correct answers yields no instance pair, and the M1 group-level pairs are drawn
from the distinct (chosen, rejected) text pairs, so a model that samples one text many times (the tiny reasoner's
twelve long samples of a question are nearly always one chain) gives one pair, not M1 copies of it. Length ties
break by sampling order, so results are deterministic given ``rng``.
"""
from __future__ import annotations

import itertools
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from synadapt.config import RetryConfig
from synadapt.data.grading import grade
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig
from synadapt.models.lm import GenerationConfig, PromptFormat, build_prompt, generate


@dataclass
class PreferenceConfig:
    """Sample K responses per training question from the long and the short model, grade them, build pairs."""

    long_model: str = ""
    """The long-CoT model directory (required)."""
    short_model: str = ""
    """The short-CoT model directory from jobs.train_sft (required)."""
    output_dir: str = "runs/adar1/preferences"
    """``samples/`` (Parquet, resumable), ``pairs.jsonl`` + ``pairs.parquet`` (TRL prompt/chosen/rejected plus
    metadata columns) and ``stats.json`` go here."""
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataSource = field(default_factory=lambda: DataSource(split="train", limit=600))
    """Training questions; the toy default takes 600 of the embedded train split (100 per level)."""
    dedupe_sources: list[str] = field(default_factory=list)
    """Evaluation sets (``adapter:path`` or a path) whose questions are removed from the training questions after
    normalisation; with the embedded task its val and test splits are always included."""
    k: int = 12
    """Responses sampled per question from each model."""
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=96, temperature=0.6, top_p=0.95, batch_size=192))
    """Sampling settings (METHOD.md: temperature 0.6, top_p 0.95); batch_size counts prompts (question × k)."""
    eps: float | None = None
    """Group-level margin: prefer long when acc_long − acc_short > eps; None = 1/(2K) as in the released code."""
    m1: int = 4
    """Group-level pairs kept per question."""
    m2: int = 2
    """Instance-level pairs per question (shortest correct vs the M2 longest)."""
    seed: int = 0
    """Seeds sampling (per batch of ids) and the choice of the M1 group-level pairs (per question id)."""
    prompt: PromptFormat = field(default_factory=PromptFormat)
    batch_size: int = 8
    """Questions per Ray Data batch."""
    concurrency: int = 2
    """Sampling actors; each loads both models once."""
    num_cpus: float = 1.0
    """Ray CPUs per sampling actor."""
    num_gpus: float = 0.0
    """GPUs per sampling actor (0 on a CPU-only machine)."""
    retries: RetryConfig = field(default_factory=RetryConfig)
    """Bounded actor restarts / batch retries, and whether a resume redoes rows that failed with an error."""
    threads: int = 1
    """torch threads per actor."""


def prefers_long(acc_long: float, acc_short: float, k: int, eps: float | None = None) -> bool:
    """The group-level rule: prefer long when its accuracy beats short's by more than ``eps`` (default 1/(2K))."""
    return acc_long - acc_short > (1.0 / (2 * k) if eps is None else eps)


def _accuracy(group: list[dict]) -> float:
    return sum(bool(r["correct"]) for r in group) / len(group)


def _pair(chosen: dict, rejected: dict, level: str) -> dict:
    return {"chosen": chosen["text"], "rejected": rejected["text"], "level": level,
            "chosen_tokens": chosen["tokens"], "rejected_tokens": rejected["tokens"],
            "chosen_correct": bool(chosen["correct"]), "rejected_correct": bool(rejected["correct"])}


def build_pairs(long_group: list[dict], short_group: list[dict], k: int | None = None, eps: float | None = None,
                m1: int = 4, m2: int = 2, rng: random.Random | None = None) -> dict:
    """Group- and instance-level preference pairs for one question.

    Returns ``{"preferred": "long" | "short" | None, "acc_long", "acc_short", "pairs": [...]}`` where each pair is
    ``{"chosen", "rejected", "level": "group" | "instance", "chosen_tokens", "rejected_tokens", "chosen_correct",
    "rejected_correct"}``. ``preferred`` is None (and ``pairs`` empty) when both groups score 0. ``k`` defaults to
    the size of the long group; it only sets the default ``eps``.
    """
    if not long_group or not short_group:
        raise ValueError(f"both groups need responses; got {len(long_group)} long and {len(short_group)} short")
    for r in itertools.chain(long_group, short_group):
        missing = {"text", "correct", "tokens"} - set(r)
        if missing:
            raise ValueError(f"response is missing field(s) {sorted(missing)}: {r!r}")
    rng = rng or random.Random(0)
    acc_long, acc_short = _accuracy(long_group), _accuracy(short_group)
    result = {"preferred": None, "acc_long": acc_long, "acc_short": acc_short, "pairs": []}
    if acc_long == 0 and acc_short == 0:
        return result
    long_wins = prefers_long(acc_long, acc_short, k or len(long_group), eps)
    preferred, other = (long_group, short_group) if long_wins else (short_group, long_group)
    result["preferred"] = "long" if long_wins else "short"

    chosen_pool = [r for r in preferred if r["correct"]] or preferred
    rejected_pool = [r for r in other if not r["correct"]] or other
    candidates = list({(c["text"], r["text"]): (c, r) for c in chosen_pool for r in rejected_pool
                       if c["text"] != r["text"]}.values())  # the first sample of each text pair, in sampling order
    for c, r in rng.sample(candidates, min(m1, len(candidates))):
        result["pairs"].append(_pair(c, r, "group"))

    correct = [r for r in preferred if r["correct"]]
    if correct:
        shortest = min(correct, key=lambda r: r["tokens"])  # min keeps the first of equal lengths
        wrong = [r for r in preferred if not r["correct"]]
        distinct: dict[str, dict] = {}
        for r in wrong or preferred:
            if r["text"] != shortest["text"]:
                distinct.setdefault(r["text"], r)  # the first sample of each text, in sampling order
        longest = sorted(distinct.values(), key=lambda r: -r["tokens"])[:m2]  # stable: ties keep sampling order
        result["pairs"] += [_pair(shortest, r, "instance") for r in longest]
    return result


def normalize_question(text: str) -> str:
    """Lowercase, spaces around punctuation removed, runs of whitespace collapsed: ``"X = 3 ;  ?x"`` → ``"x=3;?x"``."""
    text = re.sub(r"\s*([^\w\s])\s*", r"\1", text.lower())
    return re.sub(r"\s+", " ", text).strip()


def dedupe_against(train_problems: list[dict], eval_problems: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split training problems into (kept, removed): removed ones have a question that, normalised by
    :func:`normalize_question`, also appears among the evaluation problems."""
    held = {normalize_question(p["question"]) for p in eval_problems}
    kept, removed = [], []
    for p in train_problems:
        (removed if normalize_question(p["question"]) in held else kept).append(p)
    return kept, removed


def sample_groups(model, tok, problems: list[dict], k: int, gen: GenerationConfig,
                  fmt: PromptFormat | None = None) -> list[list[dict]]:
    """``k`` graded samples per problem from ``model`` under the long-CoT prompt: ``{"text", "correct", "tokens"}``."""
    fmt = fmt or PromptFormat()
    prompts = [build_prompt(tok, p["question"], "long", fmt) for p in problems for _ in range(k)]
    gens = generate(model, tok, prompts, gen)
    return [graded_group(gens[i * k:(i + 1) * k], p["answer"], fmt) for i, p in enumerate(problems)]


def graded_group(gens: list, answer: str, fmt: PromptFormat) -> list[dict]:
    """One question's sampled generations (either backend's) as graded responses ``{"text", "correct", "tokens"}``."""
    return [{"text": g.text, "correct": grade(g.text, answer, fmt.think_end)[0], "tokens": g.generated_tokens}
            for g in gens]


def pairs_for_questions(samples: list[dict], cfg: PreferenceConfig,
                        questions: dict[str, dict]) -> tuple[list[dict], dict]:
    """Preference rows for sampled questions, and statistics.

    ``samples`` rows carry ``id`` and per-model columns ``{long,short}_{text,correct,tokens}`` (lists of length
    K); ``questions`` maps id → ``{"prompt", "difficulty"}``. Each question's pairs use an RNG seeded by
    (cfg.seed, id), so the output does not depend on the order samples arrive in.
    """
    rows, preferred, by_level = [], Counter(), defaultdict(Counter)
    for s in sorted(samples, key=lambda r: r["id"]):
        groups = {m: [{"text": t, "correct": c, "tokens": n} for t, c, n in
                      zip(s[f"{m}_text"], s[f"{m}_correct"], s[f"{m}_tokens"])] for m in ("long", "short")}
        out = build_pairs(groups["long"], groups["short"], cfg.k, cfg.eps, cfg.m1, cfg.m2,
                          random.Random(f"{cfg.seed}:{s['id']}"))
        choice = out["preferred"] or "dropped"
        preferred[choice] += 1
        q = questions[s["id"]]
        by_level[str(q["difficulty"])][choice] += 1
        for j, pair in enumerate(out["pairs"]):
            rows.append({"id": f"{s['id']}-{j}", "question_id": s["id"], "difficulty": q["difficulty"],
                         "prompt": q["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
                         "preferred": out["preferred"], **{key: v for key, v in pair.items()
                                                           if key not in ("chosen", "rejected")}})
    kept = preferred["long"] + preferred["short"]
    stats = {
        "questions": len(samples), "dropped_both_zero": preferred["dropped"],
        "prefer_long": preferred["long"], "prefer_short": preferred["short"],
        "share_prefer_long": preferred["long"] / kept if kept else None,
        "pairs": len(rows), "pairs_by_level": dict(Counter(r["level"] for r in rows)),
        "by_difficulty": {lv: {**c, "share_prefer_long": c["long"] / (c["long"] + c["short"])
                               if c["long"] + c["short"] else None} for lv, c in sorted(by_level.items())},
    }
    return rows, stats
