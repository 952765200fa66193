"""jobs.pipeline without running a stage: how it resolves every stage's config, resources and paths (--dry_run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.pipeline import PipelineConfig, describe_stages, stage_configs
from synadapt.config import load_config
from synadapt.data.source import DataSource

ROOT = Path(__file__).resolve().parents[1]
CONFIG_7B = ROOT / "configs/r1-distill-qwen-7b.yaml"
STAGES = ["collect_dcot", "synthesize", "synthesize_wrong_targets", "train_refiner", "train_classifier", "train_sft",
          "merge", "build_preferences", "train_dpo", "evaluate"]


def paths(row: dict) -> list[str]:
    return [*row["outputs"].values(), *row["storage"].values()]


def test_7b_dry_run_puts_every_output_and_checkpoint_on_shared_storage():
    cfg = load_config(PipelineConfig, CONFIG_7B)
    rows = describe_stages(cfg)
    assert [r["stage"] for r in rows] == STAGES  # a hub model: no tiny-reasoner stage
    shared = cfg.out.rstrip("/") + "/"
    assert shared.startswith("/data/")  # the ReadWriteMany volume of cluster/kuberay/, EFS on the launcher
    for row in rows:
        assert paths(row) and all(p.startswith(shared) for p in paths(row)), row
    storage = {r["stage"]: r["storage"]["storage_path"] for r in rows if r["storage"]}
    assert set(storage) == {"train_refiner", "train_classifier", "train_sft", "train_dpo"}  # every Ray Train fit
    gpu_stages = [r["stage"] for r in rows if "1 GPU" in r["resources"]]
    assert gpu_stages == [s for s in STAGES if s != "merge"]
    assert "8 workers x (1 CPU, 1 GPU), DeepSpeed ZeRO-2" in rows[STAGES.index("train_refiner")]["resources"]


def test_toy_dry_run_stays_local_and_on_cpu():
    cfg = load_config(PipelineConfig, ROOT / "configs/toy.yaml")
    rows = describe_stages(cfg)
    assert [r["stage"] for r in rows] == ["reasoner", *STAGES]
    local = os.path.abspath("runs/demo") + "/"
    for row in rows[1:]:
        assert all(p.startswith(local) for p in paths(row)), row
    assert not any("1 GPU" in r["resources"] for r in rows)


def test_a_relative_model_dir_reaches_every_stage_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    plan = stage_configs(PipelineConfig(model="ckpt"))
    assert plan["train_refiner"].model == plan["train_sft"].model == str(tmp_path / "ckpt")
    assert stage_configs(PipelineConfig(model="org/name"))["train_sft"].model == "org/name"


def test_7b_evaluation_gets_its_own_generation_limits_and_gpus():
    """The results table used to run on one CPU actor with the 96-token default: R1 long CoT needs thousands."""
    cfg = load_config(PipelineConfig, CONFIG_7B)
    plan = stage_configs(cfg)
    parts = plan["evaluate"]
    assert len(parts) == 5 and [p.model for p, _ in parts].count(cfg.model) == 2
    for ev, _ in parts:
        assert (ev.concurrency, ev.num_gpus, ev.batch_size) == (8, 1, 32)
        assert ev.generation.max_new_tokens == 8192 and ev.generation.temperature == 0.0
        assert ev.reasoner == os.path.join(cfg.out, "reasoner") and ev.data == cfg.eval_data
    for stage in ("collect_dcot", "build_preferences"):
        assert plan[stage].generation.max_new_tokens >= 4096 and plan[stage].num_gpus == 1
    merge = plan["merge"]
    assert merge.generation.max_new_tokens >= 4096 and merge.eval_num_gpus == 1  # an α sweep evaluates on GPUs too
    toy = stage_configs(load_config(PipelineConfig, ROOT / "configs/toy.yaml"))["evaluate"][0][0]
    assert (toy.num_gpus, toy.concurrency, toy.generation.max_new_tokens) == (0, 1, 96)


def test_refiner_reads_the_problems_its_zsyn_came_from(tiny_dir, tmp_path):
    """With a user's data set the refiner must match Z_syn ids against that data set, not the embedded split."""
    from transformers import AutoTokenizer

    from synadapt.latent.stages import refiner_examples

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"a={i};?a", "answer": str(i)}) + "\n"
                            for i in range(3)))
    cfg = PipelineConfig(model=tiny_dir, out=str(tmp_path / "run"))
    cfg.collect_dcot.data = DataSource(path=str(data))
    plan = stage_configs(cfg)
    refiner = plan["train_refiner"]
    assert refiner.data == plan["synthesize"].data == cfg.collect_dcot.data
    m = refiner.refiner.m
    zsyn = [{"id": f"q{i}", "converged": True, "z": [[0.0] * 4] * m, "shape": [m, 4]} for i in range(3)]
    examples = refiner_examples(zsyn, refiner.data.load(refiner.task), AutoTokenizer.from_pretrained(tiny_dir),
                                refiner)
    assert [e["id"] for e in examples] == ["q0", "q1", "q2"]


def test_plan_refuses_what_it_would_silently_override_or_cannot_write():
    cfg = PipelineConfig()
    cfg.collect_dcot.out_dir = "elsewhere/dcot"  # the pipeline puts it under out
    cfg.evaluate.methods = ["long_cot"]          # the pipeline runs every row of the table
    with pytest.raises(ValueError, match=r"collect_dcot\.out_dir is set by the pipeline"):
        stage_configs(cfg)
    cfg.collect_dcot.out_dir = PipelineConfig().collect_dcot.out_dir
    with pytest.raises(ValueError, match=r"evaluate\.methods is set by the pipeline"):
        stage_configs(cfg)
    with pytest.raises(ValueError, match="is a URI.*file system every node mounts"):
        stage_configs(PipelineConfig(out="s3://bucket/run"))


def test_dry_run_command_prints_the_plan_and_starts_nothing():
    code = ("import ray, sys\nfrom jobs.pipeline import main\n"
            f"main(['--config', {str(CONFIG_7B)!r}, '--dry_run'])\n"
            "assert not ray.is_initialized(), 'the dry run started Ray'\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a model load would fail: the 7B weights are not here
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for i, stage in enumerate(STAGES, 1):
        assert f"{i}. {stage}:" in r.stdout
    assert "out = /data/synadapt/r1-7b" in r.stdout and "storage_path: /data/synadapt/r1-7b/adar1/dpo-ray" in r.stdout
    assert "max_new_tokens: 8192" in r.stdout


def test_the_results_table_gives_the_adar1_rows_a_long_share(ray_session, tiny_dir, tmp_path):
    """evaluate_all over real Ray Data evaluations: the merged / DPO rows are judged long or short per question
    against the long_cot and short_cot rows of the same run (here: 8-token vs 3-token generations)."""
    from jobs.evaluate import EvaluateConfig
    from jobs.pipeline import evaluate_all
    from synadapt.data.task import TaskConfig
    from synadapt.models.lm import GenerationConfig

    task = TaskConfig(train_per_level=2, val_per_level=1, test_per_level=2, levels=2)

    def part(i, new_tokens, rename):
        return (EvaluateConfig(model=tiny_dir, methods=["long_cot"], task=task, out_dir=str(tmp_path / f"part{i}"),
                               generation=GenerationConfig(max_new_tokens=new_tokens, temperature=0.0)), rename)
    parts = [part(0, 8, {}), part(1, 3, {"long_cot": "short_cot"}), part(2, 3, {"long_cot": "adar1_merge"}),
             part(3, 8, {"long_cot": "adar1_dpo"})]
    results = evaluate_all(parts, str(tmp_path), tiny_dir, DataSource(split="test"), {})
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["long_cot"]["mean_generated_tokens"] > rows["short_cot"]["mean_generated_tokens"]
    assert rows["adar1_dpo"]["long_share"] == 1.0 and rows["adar1_merge"]["long_share"] == 0.0
    assert rows["adar1_dpo"]["by_difficulty"]["2"]["long_share"] == 1.0 and "long_share" not in rows["long_cot"]
    assert "Share of long responses" in (tmp_path / "results.md").read_text()
