"""The ``synadapt`` command."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from synadapt.config import deep_merge, describe, load_config, parse_overrides
from synadapt.models.tiny import SHIPPED_DIR

QUICK = {
    "model": str(SHIPPED_DIR),  # smaller splits would otherwise key (and train) a new tiny reasoner
    "task": {"test_per_level": 10, "val_per_level": 10, "train_per_level": 20},
    "synthesize": {"synthesis": {"max_steps": 40}},
    "wrong_target_questions": 24,
    "train_refiner": {"refiner": {"train_seconds": 20.0}},
    "taus": [0.5],
    "sft": {"train": {"max_steps": 20}},
    "preferences": {"k": 4, "data": {"limit": 24}},
    "dpo": {"train": {"max_steps": 10}},
}
"""``--quick``: every stage on a few questions (a smoke run of the real code path, not real numbers)."""

CHECKOUT = Path(__file__).resolve().parents[1]
NOT_IN_CHECKOUT = (
    "synadapt {command}: runs the Ray jobs in jobs/ and serve/, which live in the repository, not in the wheel "
    f"(no jobs/pipeline.py beside {Path(__file__).resolve().parent}). Clone the repository and `pip install -e .` "
    "there, or run `python -m jobs.pipeline` from its root.")


def use_checkout() -> bool:
    """Make the repository's jobs/ and serve/ importable, here and in the Ray workers this process starts; False
    when this package is not inside a checkout (an installed wheel carries only ``synadapt``)."""
    if not (CHECKOUT / "jobs" / "pipeline.py").is_file() or not (CHECKOUT / "serve" / "launch.py").is_file():
        return False
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
        # A local Ray instance starts its workers with this environment: they unpickle jobs.* classes too.
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
    return True


def cmd_demo(args, overrides: list[str]) -> int:
    from jobs.pipeline import PipelineConfig, run_pipeline

    values = parse_overrides(overrides)
    if args.quick:  # flags given on the command line still win over the quick sizes
        values = deep_merge(QUICK, values)
    cfg = load_config(PipelineConfig, args.config, values)
    if args.out:
        cfg.out = args.out
    results = run_pipeline(cfg)
    print(f"\nwrote {cfg.out}/results.json, results.md and plots ({results['wall_seconds']:.0f} s)")
    return 0


def cmd_serve(args, overrides: list[str]) -> int:
    from serve.launch import serve_run_dir

    if overrides:
        raise SystemExit(f"synadapt serve: unknown arguments {overrides}")
    serve_run_dir(args.run_dir, host=args.host, port=args.port, config_path=args.config,
                  mode=args.serve_mode)
    return 0


def cmd_eval(args, overrides: list[str]) -> int:
    import json

    from synadapt.data.problems import load_problems
    from synadapt.eval.evaluate import evaluate_generation
    from synadapt.eval.metrics import markdown_table, summarize, write_records, write_results
    from synadapt.models.lm import GenerationConfig, PromptFormat, load_model

    if overrides:
        raise SystemExit(f"synadapt eval: unknown arguments {overrides}")
    report = load_problems(args.data, adapter=args.adapter, limit=args.limit,
                           field_map=json.loads(args.field_map) if args.field_map else None)
    print(report.summary())
    if not report.problems:
        raise SystemExit("synadapt eval: no valid problems to evaluate")
    model, tok = load_model(args.model, device=args.device)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           temperature=args.temperature)
    fmt = PromptFormat(think_start=args.think_start, think_end=args.think_end)
    records = evaluate_generation(model, tok, report.problems, args.mode, gen, fmt)
    method = {"long": "long_cot", "nothink": "nothink", "concise": "concise_cot"}[args.mode]
    row = summarize(method, records, malformed_rows=len(report.malformed))
    out = Path(args.out)
    write_records(out, method, records)
    write_results(out, task=args.data, model=args.model, rows=[row])
    print(markdown_table([row]))
    return 0


def main(argv: list[str] | None = None) -> int:
    in_checkout = use_checkout()
    demo_epilog = NOT_IN_CHECKOUT.format(command="demo")
    if in_checkout:
        from jobs.pipeline import PipelineConfig

        demo_epilog = ("config fields, each settable as --dotted.name VALUE (overrides the YAML file):\n"
                       + "\n".join(describe(PipelineConfig)))
    parser = argparse.ArgumentParser(prog="synadapt", description="Adaptive reasoning: SynAdapt + AdaR1 on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="run the end-to-end pipeline on the embedded task and print the results table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=demo_epilog)
    demo.add_argument("--config", help="YAML file with PipelineConfig fields (see configs/toy.yaml)")
    demo.add_argument("--out", help="run directory (same as --out in the config)")
    demo.add_argument("--quick", action="store_true",
                      help="smoke run: every stage on a few questions (the code path, not the real numbers)")
    ev = sub.add_parser("eval", help="evaluate any causal LM on a dataset in one generation mode")
    ev.add_argument("--model", required=True, help="model path or hub id")
    ev.add_argument("--data", required=True, help="JSONL, Parquet, a saved HF dataset dir, or a hub dataset name")
    ev.add_argument("--adapter", default="generic",
                    help="row format: generic, gsm8k, math, math500, aime, amc23, olympiadbench, minerva")
    ev.add_argument("--field-map", help='JSON mapping schema field → column, e.g. \'{"question": "problem"}\'')
    ev.add_argument("--mode", default="long", choices=["long", "nothink", "concise"],
                    help="long: think freely; nothink: empty think block; concise: long under a be-concise prompt")
    ev.add_argument("--limit", type=int, help="evaluate only the first N problems")
    ev.add_argument("--out", default="runs/eval", help="output dir for results.json, records and plots")
    ev.add_argument("--max-new-tokens", type=int, default=96, help="generation budget per question")
    ev.add_argument("--batch-size", type=int, default=64, help="questions per generate() call")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ev.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    ev.add_argument("--think-start", default="<think>", help="opening think marker of the model")
    ev.add_argument("--think-end", default="</think>", help="closing think marker of the model")
    sv = sub.add_parser("serve", help="serve a `synadapt demo` run directory with Ray Serve (OpenAI-compatible API)")
    sv.add_argument("--run-dir", required=True, help="output directory of `synadapt demo` (or a reasoner run dir)")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (loopback unless told otherwise)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--config", help="Serve config YAML (default serve/config.yaml)")
    sv.add_argument("--serve-mode", choices=("throughput", "default"), default="throughput",
                    help="throughput: Ray Serve's high-throughput mode (HAProxy ingress, gRPC between deployments); "
                         "default: Serve's Python proxy (README, Serving)")
    args, overrides = parser.parse_known_args(argv)
    if args.command in ("demo", "serve") and not in_checkout:
        print(NOT_IN_CHECKOUT.format(command=args.command), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return {"demo": cmd_demo, "eval": cmd_eval, "serve": cmd_serve}[args.command](args, overrides)
    except ValueError as e:  # bad config keys/values: one clear line, not a traceback
        print(f"synadapt {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
