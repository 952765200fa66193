"""Result rows, Rel-G, the results.json schema, the markdown table and accuracy-vs-cost plots.

A row summarises one method on one question set. Per-question records (dicts) carry at least ``correct``,
``generated_tokens``, ``forward_positions``, ``seconds`` and ``difficulty``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

COLUMNS = [("method", "method"), ("accuracy", "acc"), ("mean_generated_tokens", "gen tokens"),
           ("mean_forward_positions", "fwd positions"), ("seconds_per_question", "s/question"), ("rel_g", "Rel-G")]


def summarize(method: str, records: list[dict], **extra) -> dict:
    """One results row: overall means plus a per-difficulty breakdown; ``extra`` fields are copied in."""
    if not records:
        raise ValueError(f"no records to summarise for method {method!r}")
    by_level = defaultdict(list)
    for r in records:
        by_level[str(r.get("difficulty"))].append(r)
    row = {
        "method": method,
        "n": len(records),
        "accuracy": mean(float(r["correct"]) for r in records),
        "mean_generated_tokens": mean(r["generated_tokens"] for r in records),
        "mean_forward_positions": mean(r["forward_positions"] for r in records),
        "seconds_per_question": mean(r["seconds"] for r in records),
        "rel_g": None,
        "by_difficulty": {
            level: {"n": len(rs), "accuracy": mean(float(r["correct"]) for r in rs),
                    "mean_generated_tokens": mean(r["generated_tokens"] for r in rs)}
            for level, rs in sorted(by_level.items())},
    }
    row.update(extra)
    return row


def add_long_share(row: dict, records: list[dict], long_tokens: dict, short_tokens: dict) -> dict:
    """Set ``row["long_share"]`` (overall and per level): the share of ``records`` whose response is long.

    A response counts as long when its length is nearer the long-CoT model's response to the same question than
    the short-CoT model's (above the per-question midpoint of ``long_tokens[id]`` and ``short_tokens[id]``): a
    length rule, since a merged or DPO model marks no mode, and per question, since lengths grow with difficulty.
    Questions missing from either reference are left out.
    """
    flags = defaultdict(list)
    for r in records:
        q = r["question_id"] if "question_id" in r else r["id"]
        if q in long_tokens and q in short_tokens:
            flags[str(r.get("difficulty"))].append(r["generated_tokens"] > (long_tokens[q] + short_tokens[q]) / 2)
    if not flags:
        raise ValueError(f"long_share of {row['method']!r}: no question has both a long and a short reference")
    row["long_share"] = mean(f for fs in flags.values() for f in fs)
    for level, fs in flags.items():
        row["by_difficulty"].setdefault(level, {})["long_share"] = mean(fs)
    return row


def rel_g(row: dict, reference: dict) -> float | None:
    """Relative gain (Acc/Acc_ref) / (Len/Len_ref), lengths in generated tokens (METHOD.md §1)."""
    if not reference["accuracy"] or not row["mean_generated_tokens"] or not reference["mean_generated_tokens"]:
        return None
    return (row["accuracy"] / reference["accuracy"]) / (
        row["mean_generated_tokens"] / reference["mean_generated_tokens"])


def with_rel_g(rows: list[dict], reference: str = "long_cot") -> list[dict]:
    """Fill ``rel_g`` of every row against the row named ``reference`` (left None when it is absent)."""
    ref = next((r for r in rows if r["method"] == reference), None)
    for r in rows:
        r["rel_g"] = rel_g(r, ref) if ref else None
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    """The headline table, then accuracy per difficulty level."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    levels = sorted({lv for r in rows for lv in r.get("by_difficulty", {})}, key=lambda s: (len(s), s))
    if levels:
        lines += ["", "Accuracy (mean generated tokens) by difficulty:", "",
                  "| method | " + " | ".join(f"L{lv}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
        for r in rows:
            cells = []
            for lv in levels:
                d = r.get("by_difficulty", {}).get(lv)
                cells.append(f"{d['accuracy']:.2f} ({d['mean_generated_tokens']:.0f})" if d else "-")
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    shares = [r for r in rows if "long_share" in r]
    if shares:
        lines += ["", "Share of long responses by difficulty:", "",
                  "| method | all | " + " | ".join(f"L{lv}" for lv in levels) + " |", "|---|---|" + "---|" * len(levels)]
        lines += [f"| {r['method']} | {r['long_share']:.2f} | " + " | ".join(
            f"{r['by_difficulty'].get(lv, {}).get('long_share', float('nan')):.2f}" for lv in levels) + " |"
            for r in shares]
    return "\n".join(lines)


def plot_accuracy_vs_cost(rows: list[dict], path: str | Path, cost: str = "mean_generated_tokens") -> Path:
    """Scatter of accuracy against a cost column, one labelled point per row, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        ax.scatter(r[cost], r["accuracy"], s=30)
        ax.annotate(r["method"], (r[cost], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(cost.replace("_", " "))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_results(out_dir: str | Path, task: str, model: str, rows: list[dict], **extra) -> Path:
    """Write results.json, results.md and the two accuracy-vs-cost plots; return the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps({"task": task, "model": model, "rows": rows, **extra}, indent=2))
    (out / "results.md").write_text(markdown_table(rows) + "\n")
    plot_accuracy_vs_cost(rows, out / "accuracy_vs_tokens.png")
    plot_accuracy_vs_cost(rows, out / "accuracy_vs_forward_positions.png", cost="mean_forward_positions")
    return path


def write_records(out_dir: str | Path, method: str, records: list[dict]) -> Path:
    """Per-question records as ``records/<method>.jsonl``, so any row can be audited question by question."""
    path = Path(out_dir) / "records" / f"{method}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
