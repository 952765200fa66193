"""Short-model probe (AdaR1's short-CoT model, #11): SFT the reasoner on one ``short_cot`` format in-process, then
print per level the accuracy and generated tokens of the short model against long CoT on the same test questions.

    python bench/short_probe.py --short_format ops --max_steps 300 --threads 1 --name ops_s300
    python bench/short_probe.py --short_format ops_only --short_steps 4 --max_steps 600 --train_part 0/2 \
        --eval_per_level 100 --train_per_level 400   # session 12's toy short model: 6 slips, long chains 0.57 if started
    python bench/short_probe.py --short_format ops_only --short_steps 4 --max_steps 600 --train_part 0/2 \
        --eval_per_level 100 --lr 1e-3 --rehearsal_share 0.25    # the toy short model (configs/toy.yaml)

The same TRL SFTTrainer as jobs.train_sft, without Ray Train, so a format is judged in minutes; writes
bench/out/short_probe_<name>.json. Besides accuracy and tokens per level it counts the short model's errors by the
number of operations in the question: with a thinking budget, the questions whose chain fits it (its "slips",
which no router can predict) and those whose chain overflows it (which fail, predictably). The ``long_started`` row
is the short model given the first token of the long chain: whether it still writes the long chain it was
fine-tuned away from (``--rehearsal_share``, SftConfig.rehearsal_share).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from adar1_routing import operations

from synadapt.adar1.train import SftConfig, TrainSettings, build_sft_trainer, sft_examples
from synadapt.data.source import DataSource
from synadapt.data.task import SHORT_FORMATS, TaskConfig
from synadapt.eval.evaluate import evaluate_generation, generation_record
from synadapt.eval.metrics import summarize
from synadapt.models.lm import GenerationConfig, build_prompt, generate, load_model
from synadapt.models.tiny import TinyReasonerConfig, reasoner_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short_format", default="var_values", choices=SHORT_FORMATS)
    p.add_argument("--short_steps", type=int, default=0, help="thinking budget of the short chain (0: none)")
    p.add_argument("--template", default="^{short_cot}{think_end}{answer}", help="SFT completion template")
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--rehearsal_share", type=float, default=0.0, help="SftConfig.rehearsal_share")
    p.add_argument("--eval_per_level", type=int, default=30)
    p.add_argument("--train_part", default="", help="'k/n': SFT on that part of the train split (the toy: 0/2)")
    p.add_argument("--train_per_level", type=int, default=600, help="training questions per level (the toy: 600)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = TaskConfig(short_format=args.short_format, short_steps=args.short_steps,
                      train_per_level=args.train_per_level)
    model_dir = str(reasoner_dir(TaskConfig(), TinyReasonerConfig()))  # the shipped reasoner, whatever the format
    cfg = SftConfig(model=model_dir, task=task, completion_template=args.template, rehearsal_share=args.rehearsal_share,
                    train=TrainSettings(learning_rate=args.lr, max_steps=args.max_steps))
    base, tok = load_model(model_dir)
    train = DataSource(split="train", part=args.train_part).load(task)
    rows, _ = sft_examples(train, tok, cfg.prompt, cfg.completion_template, cfg.rehearsal_share)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:
        trainer = build_sft_trainer(cfg, rows, work)
        trainer.train()
        train_seconds = time.time() - t0
        short = trainer.model.eval()
    all_test = DataSource(split="test").load(task)
    test = [p for lv in range(1, task.levels + 1)
            for p in [q for q in all_test if q["difficulty"] == lv][:args.eval_per_level]]
    gen = GenerationConfig(max_new_tokens=96, temperature=0.0, batch_size=128)
    records = {name: evaluate_generation(m, tok, test, "long", gen) for name, m in (("long_cot", base),
                                                                                   ("short_cot", short))}
    # The long chain's first token given: does the short model still go on with the long chain?
    started = [build_prompt(tok, q["question"], "long", cfg.prompt) + q["long_cot"][0] for q in test]
    records["long_started"] = [generation_record(q, g, "long", cfg.prompt)
                               for q, g in zip(test, generate(short, tok, started, gen))]
    rows_out = {name: summarize(name, recs) for name, recs in records.items()}
    lv = sorted(rows_out["long_cot"]["by_difficulty"], key=int)
    print(f"short_format {args.short_format} (budget {args.short_steps or 'none'}), {args.max_steps} steps at lr "
          f"{args.lr:g}, rehearsal share {args.rehearsal_share:g}, SFT {train_seconds:.0f}s")
    print("| row | all | " + " | ".join(f"L{k}" for k in lv) + " |")
    for name, r in rows_out.items():
        d = r["by_difficulty"]
        print(f"| {name} acc | {r['accuracy']:.3f} | " + " | ".join(f"{d[k]['accuracy']:.2f}" for k in lv) + " |")
        print(f"| {name} tokens | {r['mean_generated_tokens']:.1f} | "
              + " | ".join(f"{d[k]['mean_generated_tokens']:.1f}" for k in lv) + " |")
    ratio = rows_out["short_cot"]["mean_generated_tokens"] / rows_out["long_cot"]["mean_generated_tokens"]
    print(f"short/long tokens {ratio:.2f}")
    fits = {p["id"]: operations(p["question"]) <= (args.short_steps or task.levels) for p in test}
    errors = {kind: sum(not r["correct"] and fits[r["id"]] == kind for r in records["short_cot"])
              for kind in (True, False)}
    counts = {kind: sum(f == kind for f in fits.values()) for kind in (True, False)}
    print(f"short model wrong on {errors[True]} of the {counts[True]} questions whose operations fit the budget "
          f"(slips), on {errors[False]} of the {counts[False]} that overflow it")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    name = args.name or f"{args.short_format}_s{args.max_steps}"
    (out / f"short_probe_{name}.json").write_text(json.dumps(
        {"args": vars(args), "train_seconds": train_seconds, "rows": rows_out,
         "errors": {"fit_budget": [errors[True], counts[True]], "overflow": [errors[False], counts[False]]}},
        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
