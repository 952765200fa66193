"""The embedded reasoning task: chains of modular assignments with a difficulty knob.

A level-L question defines L+1 variables in dependency order; the first is a digit, every later one either applies
one operation to the previous variable or copies it. All values are taken mod ``modulus``. Example (level 3)::

    question : m=4;y=m+7;n=y;b=n-5;?b
    long_cot : m=4,y=4+7=1,n=1,b=1-5=6
    short_cot: y=1,n=1,b=6         (short_format "var_values"; "ops" gives y=1,b=6, "values" 4,1,1,6)
    answer   : 6

One character is one token (the tiny reasoner's tokenizer is a character-level Qwen2 byte-level BPE), so there are
no spaces: a space would cost a token of its own in front of every digit.

The long chain of thought restates each operand before its result, so every step is one local operation (the
values-only format fails to train, see shared/TOY_NOTES.md). The short chain drops the restated operands: about
half the tokens, the long/short trade-off AdaR1 needs. It keeps the variable names: they are the keys by which
each step finds its statement in the question (a values-only chain must find "the j-th statement" by counting,
which a 3-layer model does not learn; bench/latent_probe_log.md).

Copies are what make answering without thinking degrade GRADUALLY. A small model answers a chain with at most one
real operation directly (find the one operator, apply it to the first digit), but not two composed ones. A level-L
chain holds Binomial(L, 1 - copy_share) operations, so the share of directly answerable questions falls smoothly
with L (share 0.4: 100, 64, 35, 18, 9, 4 % at levels 1..6) instead of falling off a cliff after level 1, while the
chain of thought still grows by one step per level. Everything is a pure function of the seed.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

SHORT_FORMATS = ("var_values", "ops", "ops_only", "ops_packed", "values")


@dataclass
class TaskConfig:
    """Shape of the embedded task."""

    levels: int = 6
    """Difficulty levels 1..levels; level L has L dependent operations."""
    ops: str = "+-"
    """Operations to draw from; '*' makes the direct answer much harder (no gradual slope)."""
    modulus: int = 10
    copy_share: float = 0.4
    """Probability that a step copies the previous variable (``y=m``) instead of applying an operation."""
    short_format: str = "var_values"
    """The ``short_cot`` written with each problem: ``var_values`` (``y=1,n=1,b=6``: every computed variable with its
    value; the first, given in the question, is not repeated), ``ops`` (``y=1,b=6``: only the variables an operation
    sets, plus the asked one; copies are followed silently), ``ops_only`` (``y=1,b=6`` as well, but ``y=1`` for
    ``m=4;y=m+7;n=y;?n``: an asked variable that only copies is left out, its value being the last one written,
    unless nothing else would be written; a token less per question than ``ops`` on average, and as accurate),
    ``ops_packed`` (``y=1b=6``: ``ops`` without the commas, a token less per entry; names and values are one
    character each, so nothing is ambiguous) or ``values`` (``4,1,1,6``, v1). Dropping ``=`` as well (``y1b6``) is
    not learnable by the reasoner: 0.09 at 600 steps, because its long chains compute each value right after an
    ``=``."""
    short_steps: int = 0
    """A thinking budget for ``short_cot``: at most this many entries of the chosen format, the rest of the chain left
    to the answer (0: no budget). With ``ops`` and 2, a chain of up to three operations stays answerable (the last
    one is done directly, like answering without thinking), a longer one is not: a short model that is right on easy
    questions and degrades on hard ones, as AdaR1 assumes."""
    seed: int = 0
    train_per_level: int = 400
    val_per_level: int = 50
    test_per_level: int = 100

    def __post_init__(self):
        # Checked when the config is built (YAML, CLI or dataclasses.replace), not when the first problem is drawn.
        if self.short_format not in SHORT_FORMATS:
            raise ValueError(f"unknown task short_format {self.short_format!r}; expected one of {SHORT_FORMATS}")
        if self.short_steps < 0:
            raise ValueError(f"task short_steps must be >= 0 (0: no budget), got {self.short_steps}")


def make_problem(rng: random.Random, level: int, cfg: TaskConfig) -> dict:
    """One problem record of the given level, drawn from ``rng``."""
    names = rng.sample(string.ascii_lowercase, level + 1)
    value = rng.randrange(cfg.modulus)
    statements = [f"{names[0]}={value}"]
    steps = [f"{names[0]}={value}"]
    values, kept, set_by_op = [value], [], []
    for i in range(1, level + 1):
        kept.append(i == level)  # the asked variable is always written, so no short chain is empty
        if rng.random() < cfg.copy_share:
            statements.append(f"{names[i]}={names[i - 1]}")
            steps.append(f"{names[i]}={value}")
        else:
            op, operand = rng.choice(cfg.ops), rng.randrange(cfg.modulus)
            value = {"+": value + operand, "-": value - operand, "*": value * operand}[op] % cfg.modulus
            statements.append(f"{names[i]}={names[i - 1]}{op}{operand}")
            steps.append(f"{names[i]}={values[-1]}{op}{operand}={value}")
            set_by_op.append(f"{names[i]}={value}")
            kept[-1] = True
        values.append(value)
    ops = [f"{n}={v}" for n, v, c in zip(names[1:], values[1:], kept) if c]
    short = {"var_values": [f"{n}={v}" for n, v in zip(names[1:], values[1:])], "ops": ops, "ops_packed": ops,
             "ops_only": set_by_op or ops, "values": [str(v) for v in values]}[cfg.short_format]
    if cfg.short_steps:
        short = short[:cfg.short_steps]
    question = ";".join(statements) + f";?{names[-1]}"
    return {
        "question": question,
        "answer": str(value),
        "long_cot": ",".join(steps),
        "short_cot": ("" if cfg.short_format == "ops_packed" else ",").join(short),
        "difficulty": level,
    }


def sample_problems(seed: int, n_per_level: int, cfg: TaskConfig, exclude: set[str] = frozenset(),
                    prefix: str = "q") -> list[dict]:
    """``n_per_level`` distinct problems per level, none of whose questions is in ``exclude``."""
    rng = random.Random(seed)
    records, seen = [], set(exclude)
    for level in range(1, cfg.levels + 1):
        made = 0
        while made < n_per_level:
            p = make_problem(rng, level, cfg)
            if p["question"] in seen:
                continue
            seen.add(p["question"])
            records.append({"id": f"{prefix}-L{level}-{made:05d}", **p})
            made += 1
    return records


def make_splits(cfg: TaskConfig) -> dict[str, list[dict]]:
    """Disjoint train/val/test splits, deterministic in ``cfg.seed``; test is drawn first so it never moves."""
    test = sample_problems(cfg.seed * 1000 + 1, cfg.test_per_level, cfg, prefix="test")
    val = sample_problems(cfg.seed * 1000 + 2, cfg.val_per_level, cfg, {p["question"] for p in test}, prefix="val")
    held = {p["question"] for p in test + val}
    train = sample_problems(cfg.seed * 1000 + 3, cfg.train_per_level, cfg, held, prefix="train")
    return {"train": train, "val": val, "test": test}


def stream_problems(seed: int, cfg: TaskConfig, exclude: set[str]):
    """Endless stream of fresh problems (uniform over levels) for training, skipping held-out questions."""
    rng = random.Random(seed)
    while True:
        p = make_problem(rng, rng.randint(1, cfg.levels), cfg)
        if p["question"] not in exclude:
            yield p
