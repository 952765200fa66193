"""Evaluation: any results.json row (method) over a data set, as Ray Data batch inference on an actor pool.

    python -m jobs.evaluate --config configs/r1-distill-qwen-7b.yaml --model runs/tiny --methods '[long_cot, nothink]'
    ray job submit --working-dir . -- python -m jobs.evaluate --model <path> --data.path data/math500.jsonl ...

Recipe: load problems (malformed rows counted) → one Ray Data pass over (method, question) pairs; each actor loads
the model once and runs :data:`METHODS` on its batch (with ``generation.backend: vllm`` the plain generation rows,
long_cot, nothink and concise_cot, run in vLLM engine actors instead: jobs/vllm_generate.py) → per-question records
as Parquet under ``out_dir/records`` (resumable: finished pairs are skipped) → one summary row per method with Rel-G
against ``long_cot`` → ``out_dir/results.json``, ``results.md`` and plots
(:func:`synadapt.eval.metrics.write_results`).
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jobs.common import apply_rows, init_ray, load_stage_config, load_stage_problems, map_to_parquet, read_parquet_rows
from jobs.vllm_generate import evaluate_vllm
from synadapt.config import RetryConfig
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig
from synadapt.eval.evaluate import evaluate_generation
from synadapt.eval.metrics import markdown_table, summarize, with_rel_g, write_results
from synadapt.models.lm import GenerationConfig, PromptFormat
from synadapt.models.vllm_engine import check_backend

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """Evaluation of one model with several methods on one question set."""

    model: str = ""
    """Model directory or hub id (required)."""
    methods: list[str] = field(default_factory=lambda: ["long_cot", "nothink"])
    """Rows of the results table: names in METHODS, optionally with an argument after '@' (``synadapt@0.5``)."""
    data: DataSource = field(default_factory=lambda: DataSource(split="test"))
    """Questions: the embedded task's ``data.split`` (default test) or a file/data set at ``data.path``."""
    task: TaskConfig = field(default_factory=TaskConfig)
    out_dir: str = "runs/eval"
    """results.json, results.md, plots, and per-question records under ``records/`` (Parquet)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    prompt: PromptFormat = field(default_factory=PromptFormat)
    batch_size: int = 32
    """(method, question) pairs per Ray Data batch."""
    concurrency: int = 1
    """Ray Data actors, each holding one copy of the model."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    """GPUs per actor (1 for a 7B model); 0 on a CPU machine, where any request for a GPU waits forever."""
    retries: RetryConfig = field(default_factory=RetryConfig)
    """Bounded actor restarts / batch retries, and whether a resume redoes rows that failed with an error."""
    threads: int = 1
    """torch threads per actor."""
    reasoner: str = ""
    """SynAdapt run directory (reasoner.json, refiner/, classifier/) for the latent rows (ccot, synadapt@τ, ...)."""
    long_model: str = ""
    """Re-thinking model for ``synadapt+adar1@τ`` (the AdaR1 DPO model directory)."""


def _generation(mode: str) -> Callable:
    def settings(cfg: EvaluateConfig, arg: str | None) -> None:
        if arg is not None:
            raise ValueError(f"generation mode {mode!r} takes no '@' argument (got {arg!r})")

    def run(bundle: dict, problems: list[dict], cfg: EvaluateConfig, arg: str | None = None) -> list[dict]:
        settings(cfg, arg)
        return evaluate_generation(bundle["model"], bundle["tok"], problems, mode, cfg.generation, cfg.prompt)

    run.settings, run.mode = settings, mode  # the mode lets generation.backend vllm run this row in vLLM
    return run


def _adaptive(mode: str, default_tau: float | None, latents: str = "refined", easy_route: str = "latent",
              long_model: bool = False, refiner: str = "refiner") -> Callable:
    """A latent row: the SynAdapt reasoner of ``cfg.reasoner`` (loaded once per actor) in one routing setting;
    ``latents`` is a latent control (zeroed, shuffled), ``refiner`` the run's refiner folder."""
    def settings(cfg: EvaluateConfig, arg: str | None) -> float:
        """τ for this row; ValueError when the row cannot run (no reasoner run dir, or no threshold)."""
        if not cfg.reasoner:
            raise ValueError("needs reasoner: the SynAdapt run directory (--reasoner DIR)")
        if not (Path(cfg.reasoner) / "reasoner.json").exists():
            raise ValueError(f"no reasoner.json in {cfg.reasoner!r}")
        if not (Path(cfg.reasoner) / refiner / "refiner.json").exists():
            raise ValueError(f"no {refiner}/refiner.json in {cfg.reasoner!r} (ccot_pause needs a refiner trained with "
                             f"--refiner.pause true saved there)")
        tau = float(arg) if arg is not None else default_tau
        if tau is None:
            raise ValueError("needs a threshold: write it as name@tau, e.g. synadapt@0.5")
        return tau

    def run_adaptive(bundle: dict, problems: list[dict], cfg: EvaluateConfig, arg: str | None = None) -> list[dict]:
        from synadapt.eval.evaluate import evaluate_adaptive
        from synadapt.latent.reasoner import AdaptiveReasoner

        tau = settings(cfg, arg)
        key = ("reasoner+long" if long_model else "reasoner") + ("" if refiner == "refiner" else "+" + refiner)
        if key not in bundle:
            bundle[key] = AdaptiveReasoner.load(cfg.reasoner, long_model=cfg.long_model if long_model else None,
                                                refiner=refiner)
        return evaluate_adaptive(bundle[key], problems, mode, tau, cfg.generation, latents, easy_route)

    run_adaptive.settings = settings  # run_evaluate checks every row before any Ray work
    return run_adaptive


METHODS: dict[str, Callable] = {
    "long_cot": _generation("long"),
    "nothink": _generation("nothink"),
    "concise_cot": _generation("concise"),
    "ccot": _adaptive("latent", 1.0),
    "ccot_zeroed": _adaptive("latent", 1.0, latents="zeroed"),
    "ccot_shuffled": _adaptive("latent", 1.0, latents="shuffled"),
    "ccot_pause": _adaptive("latent", 1.0, refiner="refiner_pause"),
    "synadapt": _adaptive("auto", None),
    "nothink+classifier": _adaptive("auto", None, easy_route="nothink"),
    "synadapt+adar1": _adaptive("auto", None, long_model=True),
}
"""Method name → ``fn(bundle, problems, cfg, arg=None) -> per-question records`` (the evaluate_generation record
schema: id, difficulty, correct, generated_tokens, forward_positions, seconds, ...). ``bundle`` is the actor's dict
with the loaded ``model``, ``tok`` and ``path``; a method that needs more (adapter, classifier) loads it on first use
and keeps it in the bundle. For ``name@arg`` the function registered under ``name`` gets ``arg`` as a string."""


def resolve(method: str) -> tuple[Callable, str | None]:
    """The METHODS function and '@' argument for ``method``; ValueError lists the known names."""
    name, _, arg = method.partition("@")
    if name not in METHODS:
        raise ValueError(f"unknown evaluation method {method!r}; known: {sorted(METHODS)}")
    return METHODS[name], (arg or None)


class Evaluator:
    """Ray Data actor: one copy of the model; a batch of (method, question) rows in, per-question records out."""

    def __init__(self, cfg: EvaluateConfig):
        import torch

        from synadapt.models.lm import load_model

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        model, tok = load_model(cfg.model)
        self.bundle = {"model": model, "tok": tok, "path": cfg.model}

    def run(self, rows: list[dict]) -> list[dict]:
        records = []
        for method in dict.fromkeys(r["method"] for r in rows):  # batch order, one call per method
            group = [r for r in rows if r["method"] == method]
            fn, arg = resolve(method)
            problems = [{**r, "id": r["question_id"]} for r in group]
            for row, rec in zip(group, fn(self.bundle, problems, self.cfg, arg)):
                records.append({**rec, "id": row["id"], "question_id": row["question_id"], "method": method})
        return records

    def __call__(self, batch: dict) -> dict:
        return apply_rows(self.run, batch)


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate every method of ``cfg``; returns the results dict written to ``out_dir/results.json``."""
    if not cfg.model:
        raise ValueError("evaluate: set model to the model directory or hub id (--model PATH)")
    for method in cfg.methods:  # fail before any Ray work, not once per question
        fn, arg = resolve(method)
        if hasattr(fn, "settings"):
            try:
                fn.settings(cfg, arg)
            except ValueError as e:
                raise ValueError(f"evaluate: {method!r} {e}") from None
    problems, malformed = load_stage_problems(cfg.data, cfg.task)
    rows = [{"id": f"{m}/{p['id']}", "question_id": p["id"], "method": m, "question": p["question"],
             "answer": p["answer"], "difficulty": p.get("difficulty")} for m in cfg.methods for p in problems]
    check_backend(cfg.generation.backend)  # a missing vLLM extra fails here, before Ray starts
    init_ray()
    out = Path(cfg.out_dir)
    # generation.backend vllm: the plain generation rows run in vLLM, the latent rows stay on the HF actors.
    modes = {m: getattr(resolve(m)[0], "mode", None) for m in cfg.methods} if cfg.generation.backend == "vllm" else {}
    on_vllm = [r for r in rows if modes.get(r["method"])]
    on_hf = [r for r in rows if not modes.get(r["method"])]
    parts = []
    if on_vllm:
        parts.append(evaluate_vllm(cfg, on_vllm, str(out / "records"), modes))
    if on_hf or not rows:
        parts.append(map_to_parquet(on_hf, Evaluator, {"cfg": cfg}, str(out / "records"), batch_size=cfg.batch_size,
                                    concurrency=cfg.concurrency, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                    retries=cfg.retries, desc="evaluate"))
    counts = {k: sum(c[k] for c in parts) for k in parts[0]}
    wanted = {r["id"] for r in rows}
    records = [r for r in read_parquet_rows(str(out / "records")) if r["id"] in wanted]
    table = []
    for method in cfg.methods:
        mine = [r for r in records if r["id"].startswith(method + "/")]  # error records carry only id and error
        good = [r for r in mine if not r.get("error")]
        if good:  # a method whose every question errored has no row, only its error count below
            table.append(summarize(method, good, errors=len(mine) - len(good)))
    with_rel_g(table)
    path = write_results(out, task=cfg.data.path or f"embedded-{cfg.data.split}", model=cfg.model, rows=table,
                         malformed_rows=malformed, job_counts=counts)
    print(markdown_table(table), flush=True)
    log.info("evaluate: wrote %s", path)
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_evaluate(load_stage_config(EvaluateConfig, sys.argv[1:] if argv is None else argv, "evaluate"))
    return 0


if __name__ == "__main__":
    # Run as the importable module, not __main__: Ray workers then unpickle Evaluator by reference and see the same
    # METHODS registry as a caller that registered methods into jobs.evaluate.
    from jobs.evaluate import main as _main

    sys.exit(_main())
