"""The Ray job layer on real local Ray with the tiny model: resumable actor-pool maps that survive actor deaths,
malformed input, evaluation, and a Ray Train + DeepSpeed run that survives a worker death via its checkpoint.

Classes and train loops that must reach Ray workers are defined inside the tests: cloudpickle ships local
definitions by value, while a module-level one would need ``tests/`` importable on the workers.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.collect_dcot import DcotCollector, run_collect_dcot
from jobs.common import deepspeed_config, fit_torch_trainer, load_stage_config, map_to_parquet, read_parquet_rows
from jobs.evaluate import EvaluateConfig, run_evaluate
from synadapt.config import RetryConfig, build
from synadapt.data.dcot import COLUMNS, CollectDcotConfig
from synadapt.data.problems import write_jsonl
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig, make_splits
from synadapt.models.lm import GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
TASK = TaskConfig(train_per_level=4, val_per_level=1, test_per_level=2)  # 24 training questions


def dcot_config(model: str, out_dir: Path, **kw) -> CollectDcotConfig:
    return CollectDcotConfig(**{"model": model, "task": TASK, "out_dir": str(out_dir), "batch_size": 6,
                                "concurrency": 2, "generation": GenerationConfig(max_new_tokens=8), **kw})


def shard_state(out_dir: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out_dir.glob("*.parquet"))}


# ------------------------------------------------------------------------------------------------ no Ray needed


def test_deepspeed_config_templates():
    hf = deepspeed_config(2)
    assert hf["zero_optimization"]["stage"] == 2 and hf["bf16"] == {"enabled": "auto"}
    assert hf["train_micro_batch_size_per_gpu"] == "auto" and hf["gradient_clipping"] == "auto"
    raw = deepspeed_config(3, bf16=False, micro_batch=4, grad_accum=1)
    assert raw["zero_optimization"]["stage"] == 3 and raw["fp16"] == {"enabled": False}
    assert "auto" not in json.dumps(raw)
    with pytest.raises(ValueError, match="'auto' values for"):
        deepspeed_config(2, micro_batch=4)
    with pytest.raises(ValueError, match="no DeepSpeed template for ZeRO stage 1"):
        deepspeed_config(1)


def test_duplicates_from_retried_writes_are_removed_and_broken_shards_set_aside(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "c"], "v": [1, 2, 3]}), tmp_path / "s0.parquet")
    pq.write_table(pa.table({"id": ["c", "d"], "v": [30, 4]}), tmp_path / "s1.parquet")
    pq.write_table(pa.table({"id": ["b"], "v": [20]}), tmp_path / "s2.parquet")
    (tmp_path / "s3.parquet").write_bytes(b"half a file from a killed writer")
    rows = [{"id": i} for i in "abcd"]
    counts = map_to_parquet(rows, object, {}, str(tmp_path))  # everything is done: no Ray execution at all
    assert counts["skipped"] == 4 and counts["written"] == 0 and counts["duplicates_removed"] == 2
    records = read_parquet_rows(str(tmp_path))
    assert sorted(r["id"] for r in records) == list("abcd")
    assert {r["id"]: r["v"] for r in records} == {"a": 1, "b": 2, "c": 3, "d": 4}  # the first record is kept
    assert not (tmp_path / "s2.parquet").exists() and (tmp_path / "s3.bad").exists()
    with pytest.raises(ValueError, match="duplicate input ids"):
        map_to_parquet(rows + [{"id": "a"}], object, {}, str(tmp_path))


def test_stage_config_makes_existing_relative_paths_absolute(tmp_path, monkeypatch):
    # Ray Train workers run elsewhere: a relative model dir left as is would be looked up on the Hub there.
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    from synadapt.adar1.train import SftConfig

    cfg = load_stage_config(SftConfig, ["--model", "ckpt", "--output_dir", "not/yet/there"], "sft")
    assert cfg.model == str(tmp_path / "ckpt") and cfg.output_dir == "not/yet/there"
    hub = load_stage_config(SftConfig, ["--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"], "sft")
    assert hub.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"


def test_7b_config_and_cluster_manifests_are_well_formed():
    cfg = load_stage_config(CollectDcotConfig, ["--config", str(ROOT / "configs/r1-distill-qwen-7b.yaml")],
                            "collect_dcot")
    assert cfg.num_gpus == 1 and cfg.model.startswith("deepseek-ai/") and cfg.generation.max_new_tokens >= 4096
    from jobs.pipeline import PipelineConfig
    from synadapt.config import load_config
    from synadapt.latent.stages import RefinerJobConfig

    pipe = load_config(PipelineConfig, ROOT / "configs/r1-distill-qwen-7b.yaml")  # every section is a real field
    assert pipe.synthesize.synthesis.m == 16 and pipe.train_refiner.refiner.n_passes == 4
    assert pipe.eval_data.adapter == "math500" and pipe.dpo.train.learning_rate == 5e-7
    ref = load_stage_config(RefinerJobConfig, ["--config", str(ROOT / "configs/r1-distill-qwen-7b.yaml"),
                                               "--num_workers", "3"], "train_refiner")
    assert ref.num_workers == 3 and ref.use_gpu and ref.deepspeed_stage == 2 and ref.model == cfg.model

    launcher = yaml.safe_load((ROOT / "cluster/launcher-gpu.yaml").read_text())
    workers = {k: v for k, v in launcher["available_node_types"].items() if k != launcher["head_node_type"]}
    assert launcher["head_node_type"] in launcher["available_node_types"] and workers
    assert all(v["resources"].get("GPU", 0) >= 1 and v["min_workers"] <= v["max_workers"] for v in workers.values())
    assert any("pip install" in c for c in launcher["setup_commands"])

    rc = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    assert rc["kind"] == "RayCluster" and rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    group = rc["spec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= 1 and group["minReplicas"] <= group["maxReplicas"]
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob-pipeline.yaml").read_text())
    assert job["kind"] == "RayJob" and "jobs.pipeline --config configs/r1-distill-qwen-7b.yaml" in job["spec"][
        "entrypoint"] and job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    svc = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    assert svc["kind"] == "RayService" and svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    from serve.app import ServeConfig

    build(ServeConfig, app["args"])  # the manifest's args are fields serve/app.py accepts (raises on unknown keys)


# ---------------------------------------------------------------------------------------------- Ray Data stages


def test_collect_dcot_writes_one_record_per_id_and_rerun_writes_nothing(ray_session, tiny_dir, tmp_path):
    cfg = dcot_config(tiny_dir, tmp_path / "dcot")
    counts = run_collect_dcot(cfg)
    ids = [p["id"] for p in make_splits(TASK)["train"]]
    assert len(ids) == 24 and counts["input"] == 24 and counts["written"] == 24 and counts["skipped"] == 0
    records = read_parquet_rows(cfg.out_dir)
    assert Counter(r["id"] for r in records) == Counter(ids)
    for r in records:
        assert set(COLUMNS) <= set(r) and r["error"] == "" and 0 < r["generated_tokens"] <= 8
        assert r["dcot"] == r["response"].split("</think>", 1)[0] and isinstance(r["correct"], bool)
    before = shard_state(tmp_path / "dcot")
    again = run_collect_dcot(cfg)
    assert again["skipped"] == 24 and again["written"] == 0 and again["total"] == 24
    assert shard_state(tmp_path / "dcot") == before  # nothing rewritten either


def test_collect_dcot_survives_an_actor_killed_mid_job(ray_session, tiny_dir, tmp_path):
    marker, victim = tmp_path / "died-once", make_splits(TASK)["train"][9]["id"]

    class DiesOnce(DcotCollector):
        """Kills its own process (no exception, no cleanup) the first time it is handed ``victim``."""

        def __call__(self, batch):
            if victim in batch["id"].tolist() and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    counts = run_collect_dcot(dcot_config(tiny_dir, tmp_path / "dcot"), actor_cls=DiesOnce)
    assert marker.exists(), "the actor never died: the test proves nothing"
    ids = Counter(r["id"] for r in read_parquet_rows(str(tmp_path / "dcot")))
    assert ids == Counter(p["id"] for p in make_splits(TASK)["train"])  # every id, exactly once
    assert counts["total"] == 24 and counts["errors"] == 0


def test_collect_dcot_counts_malformed_rows_and_failing_rows(ray_session, tiny_dir, tmp_path):
    good = [{"id": f"g{i}", "question": f"a={i};b=a+1;?b", "answer": str((i + 1) % 10)} for i in range(5)]
    path = tmp_path / "problems.jsonl"
    write_jsonl(path, good[:2] + [{"id": "no-answer", "question": "a=1;?a"}] + good[2:])
    with path.open("a") as f:
        f.write("{not json\n")
    poison = good[3]["question"]

    class FailsOnPoison(DcotCollector):
        """A real exception for one question, as a tokenizer or a too-long prompt might raise."""

        def run(self, rows):
            if any(r["question"] == poison for r in rows):
                raise RuntimeError("poisoned question")
            return super().run(rows)

    counts = run_collect_dcot(dcot_config(tiny_dir, tmp_path / "dcot", data=DataSource(path=str(path)),
                                          batch_size=2), actor_cls=FailsOnPoison)
    assert counts["malformed"] == 2 and counts["problems"] == 5 and counts["errors"] == 1
    records = {r["id"]: r for r in read_parquet_rows(str(tmp_path / "dcot"))}
    assert sorted(records) == [g["id"] for g in good]
    assert records["g3"]["error"] == "RuntimeError: poisoned question"
    assert all(records[g]["error"] == "" and records[g]["response"] is not None for g in ("g0", "g1", "g2", "g4"))


def test_evaluate_writes_records_and_results(ray_session, tiny_dir, tmp_path):
    cfg = EvaluateConfig(model=tiny_dir, methods=["long_cot", "nothink"], task=TASK, out_dir=str(tmp_path / "ev"),
                         generation=GenerationConfig(max_new_tokens=8), batch_size=8, concurrency=2)
    with pytest.raises(ValueError, match="unknown evaluation method 'no_such_method'"):
        run_evaluate(EvaluateConfig(model=tiny_dir, methods=["long_cot", "no_such_method"]))
    with pytest.raises(ValueError, match="'ccot' needs reasoner"):
        run_evaluate(EvaluateConfig(model=tiny_dir, methods=["ccot"]))
    with pytest.raises(ValueError, match="no reasoner.json"):
        run_evaluate(EvaluateConfig(model=tiny_dir, methods=["ccot"], reasoner=str(tmp_path)))
    results = run_evaluate(cfg)
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["long_cot", "nothink"] and all(r["n"] == 12 and r["errors"] == 0 for r in rows.values())
    assert rows["long_cot"]["rel_g"] is None or rows["long_cot"]["rel_g"] == pytest.approx(1.0)
    assert results["job_counts"]["written"] == 24 and results["malformed_rows"] == 0
    records = read_parquet_rows(str(tmp_path / "ev" / "records"))
    assert Counter(r["method"] for r in records) == {"long_cot": 12, "nothink": 12}
    assert (tmp_path / "ev" / "results.md").exists()


def test_a_transient_read_error_leaves_a_good_shard_alone(tmp_path):
    import errno

    from fsspec.implementations.local import LocalFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from jobs.common import _shard_columns

    class FlakyDisk(LocalFileSystem):
        """The local disk, except that the first file read fails with EIO, as NFS or an object store can."""

        failures = 1

        def _open(self, path, mode="rb", **kwargs):
            if "r" in mode and FlakyDisk.failures:
                FlakyDisk.failures -= 1
                raise OSError(errno.EIO, "Input/output error", path)
            return super()._open(path, mode, **kwargs)

    pq.write_table(pa.table({"id": ["a", "b"], "error": ["", ""]}), tmp_path / "s0.parquet")
    with pytest.raises(OSError, match="Input/output error"):
        _shard_columns(PyFileSystem(FSSpecHandler(FlakyDisk(skip_instance_cache=True))), str(tmp_path), ["id"])
    assert [p.name for p in tmp_path.iterdir()] == ["s0.parquet"]  # not renamed to .bad: its rows stay done
    assert read_parquet_rows(str(tmp_path)) == [{"id": "a", "error": ""}, {"id": "b", "error": ""}]


def test_a_batch_that_kills_every_actor_fails_the_job_in_bounded_time(ray_session, tiny_dir, tmp_path):
    deaths, victim = tmp_path / "deaths", make_splits(TASK)["train"][9]["id"]

    class KilledByItsBatch(DcotCollector):
        """Its process dies (no exception, no cleanup: a host OOM kill, a segfault) whenever it is handed ``victim``."""

        def __call__(self, batch):
            if victim in batch["id"].tolist():
                with deaths.open("a") as f:
                    f.write(f"{os.getpid()}\n")
                os._exit(1)
            return super().__call__(batch)

    cfg = dcot_config(tiny_dir, tmp_path / "dcot", retries=RetryConfig(max_actor_restarts=1, max_task_retries=1))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"collect_dcot: an actor process died and its batch failed after 1 "):
        run_collect_dcot(cfg, actor_cls=KilledByItsBatch)  # Ray Data's defaults retry this batch forever
    assert len(deaths.read_text().split()) == 2 and time.monotonic() - t0 < 300  # one try, one retry, no more
    written = {r["id"] for r in read_parquet_rows(cfg.out_dir, ["id"])}
    assert victim not in written
    counts = run_collect_dcot(cfg)  # the batches that finished before the failure are kept
    assert counts["skipped"] == len(written) and counts["total"] == 24 and counts["errors"] == 0


def test_rows_that_failed_with_an_error_are_redone_on_resume(ray_session, tiny_dir, tmp_path):
    victim = make_splits(TASK)["train"][3]["id"]

    class CudaOutOfMemory(DcotCollector):
        """A transient failure on one question, as a CUDA OOM under a big batch is."""

        def run(self, rows):
            if any(r["id"] == victim for r in rows):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().run(rows)

    cfg = dcot_config(tiny_dir, tmp_path / "dcot")
    first = run_collect_dcot(cfg, actor_cls=CudaOutOfMemory)
    assert first["errors"] == 1 and first["total"] == 24
    kept = run_collect_dcot(replace(cfg, retries=RetryConfig(retry_errors=False)))
    assert kept["written"] == 0 and kept["errors"] == 1 and kept["errors_retried"] == 0
    before = shard_state(tmp_path / "dcot")
    again = run_collect_dcot(cfg)
    assert again["errors_retried"] == 1 and again["written"] == 1 and again["errors"] == 0 and again["total"] == 24
    records = read_parquet_rows(cfg.out_dir)
    assert Counter(r["id"] for r in records) == Counter(p["id"] for p in make_splits(TASK)["train"])
    redone = next(r for r in records if r["id"] == victim)
    assert redone["error"] == "" and redone["response"]
    after = shard_state(tmp_path / "dcot")
    assert sum(after.get(name) != t for name, t in before.items()) == 1  # only the victim's shard was rewritten
    assert len(after) == len(before) + 1


# ---------------------------------------------------------------------------------------------- Ray Train stage


def test_train_worker_killed_mid_run_resumes_from_its_checkpoint(ray_session, tiny_dir, tmp_path):
    """LoRA + DeepSpeed ZeRO-2 on 2 gloo workers; rank 1 dies after step 3, after the step-2 checkpoint."""
    marker, starts = tmp_path / "died-once", tmp_path / "starts.txt"

    def loop(config):
        import tempfile

        import ray.train
        import torch
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        from jobs.common import deepspeed_config, latest_checkpoint_dir, skip_deepspeed_shm_build
        from synadapt.data.task import make_splits
        from synadapt.models.lm import load_model
        from synadapt.models.tiny import encode_batch, training_text

        torch.set_num_threads(1)
        skip_deepspeed_shm_build()
        import deepspeed

        rank = ray.train.get_context().get_world_rank()
        model, tok = load_model(config["model"], device="cpu")
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
        start, ckpt = 0, latest_checkpoint_dir()
        if ckpt:
            set_peft_model_state_dict(model, load_file(os.path.join(ckpt, "adapter.safetensors")))
            start = json.loads(Path(ckpt, "state.json").read_text())["step"]
        if rank == 0:
            with open(config["starts"], "a") as f:
                f.write(f"{start}\n")
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
            config=deepspeed_config(2, bf16=False, micro_batch=4, grad_accum=1))
        problems = make_splits(config["task"])["train"]
        for step in range(start, config["steps"]):
            chunk = problems[(step * 8 + rank * 4) % 24:][:4]  # each rank its own 4 questions
            loss = engine(**encode_batch(tok, [training_text(p, direct=False) for p in chunk])).loss
            engine.backward(loss)
            engine.step()
            done = step + 1
            if done == config["die_after"] and rank == 1 and not os.path.exists(config["marker"]):
                # The controller registers reports on its ~2 s health poll; dying sooner could lose the step-2
                # checkpoint, and the test wants to see a resume from it, not from scratch.
                assert ray.train.get_all_reported_checkpoints(timeout_s=60)
                Path(config["marker"]).write_text(str(os.getpid()))
                os._exit(1)
            if done % config["every"] == 0:
                with tempfile.TemporaryDirectory() as d:
                    if rank == 0:
                        save_file(get_peft_model_state_dict(engine.module), os.path.join(d, "adapter.safetensors"))
                        Path(d, "state.json").write_text(json.dumps({"step": done}))
                    ray.train.report({"step": done, "start": start, "loss": loss.item()},
                                     checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)

    result = fit_torch_trainer(loop, {"model": tiny_dir, "task": TASK, "steps": 6, "every": 2, "die_after": 3,
                                      "marker": str(marker), "starts": str(starts)},
                               name="resume", storage_path=str(tmp_path / "ray"), num_workers=2, max_failures=1)
    assert marker.exists(), "the worker never died: the test proves nothing"
    assert starts.read_text().split() == ["0", "2"]  # second attempt continued from the step-2 checkpoint
    assert result.metrics["step"] == 6 and result.metrics["start"] == 2
    with result.checkpoint.as_directory() as d:
        assert json.loads(Path(d, "state.json").read_text()) == {"step": 6}
        assert Path(d, "adapter.safetensors").exists()


def test_train_refiner_job_continues_from_a_saved_refiner(ray_session, tiny_dir, tmp_path):
    """``init_from`` (how a demo starts from a shipped refiner): the job loads it instead of a fresh adapter."""
    import torch
    from safetensors.torch import load_file

    from jobs.train_refiner import run_train_refiner
    from synadapt.latent.refiner import Refiner, RefinerConfig
    from synadapt.latent.stages import RefinerJobConfig
    from synadapt.models.lm import load_model

    model, tok = load_model(tiny_dir)
    cfg = RefinerConfig(m=3, n_passes=2, batch_size=4, max_steps=0)
    saved = Refiner(model, cfg, tok.convert_tokens_to_ids("."))
    with torch.no_grad():
        for p in saved.proj.parameters():
            p.normal_(0, 0.5)
    saved.save(tmp_path / "init")
    problems = make_splits(TASK)["train"][:8]
    (tmp_path / "zsyn").mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": p["id"], "converged": True, "shape": [3, model.config.hidden_size],
                                          "z": [[0.0] * model.config.hidden_size] * 3} for p in problems]),
                   tmp_path / "zsyn" / "part-0.parquet")
    run_train_refiner(RefinerJobConfig(model=tiny_dir, zsyn_dir=str(tmp_path / "zsyn"), task=TASK, refiner=cfg,
                                       init_from=str(tmp_path / "init"), out_dir=str(tmp_path / "out"),
                                       deepspeed_stage=0, threads=1))
    before = load_file(tmp_path / "init" / "projection.safetensors")
    after = load_file(tmp_path / "out" / "projection.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def write_zsyn_shards(out: Path, problems: list[dict], m: int, dim: int) -> None:
    """Z_syn shards as synthesize leaves them: converged records, one that did not converge, one error record."""
    out.mkdir()
    rows = [{"id": p["id"], "converged": True, "shape": [m, dim], "z": [[0.1 * (i % 3)] * dim] * m, "error": ""}
            for i, p in enumerate(problems)]
    rows[-1]["converged"] = False
    pq.write_table(pa.Table.from_pylist(rows[:len(rows) // 2]), out / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[len(rows) // 2:]), out / "part-1.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "broken", "error": "RuntimeError: boom"}]), out / "part-2.parquet")


def two_worker_refiner_config(tiny_dir, tmp_path, **kw):
    from synadapt.latent.refiner import RefinerConfig
    from synadapt.latent.stages import RefinerJobConfig

    problems = [p for p in make_splits(TASK)["train"] if p["difficulty"] <= 2]  # 8: their targets fit in m = 5
    write_zsyn_shards(tmp_path / "zsyn", problems, 5, 32)  # 7 usable records: an equal split gives 3 per worker
    return RefinerJobConfig(model=tiny_dir, zsyn_dir=str(tmp_path / "zsyn"), task=TASK, out_dir=str(tmp_path / "out"),
                            refiner=RefinerConfig(m=5, n_passes=2, lambda_step=1.0, batch_size=2, **kw),
                            num_workers=2, checkpoint_every=2, threads=2)


def test_refiner_on_two_deepspeed_workers_stops_together_stays_in_sync_and_resumes(ray_session, tiny_dir, tmp_path):
    """ZeRO-2 on 2 workers under a time budget: each rank deciding on its own clock made them report a different
    number of times and wait for each other forever. Then a re-run continues with the optimizer state restored."""
    import torch

    from jobs.train_refiner import run_train_refiner

    cfg = two_worker_refiner_config(tiny_dir, tmp_path, train_seconds=8.0, max_steps=10**6)
    first = run_train_refiner(cfg)
    assert first["steps"] >= 1 and first["resumed_from_step"] == 0 and first["examples"] == 3
    assert first["optimizer_steps"] == first["steps"]
    assert first["weight_spread"] == 0.0  # ZeRO-2 really shares one optimisation between the ranks
    assert {"loss", "loss_ans", "loss_align", "loss_step"} <= set(first)
    latest = max(p for p in (tmp_path / "ray" / "train_refiner").glob("checkpoint_*") if p.is_dir())
    tree = sorted(str(p.relative_to(latest)) for p in latest.rglob("*"))
    tag = (latest / "deepspeed" / "latest").read_text()
    assert tag == f"global_step{first['steps']}", tree
    assert {f"deepspeed/{tag}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(tree), tree
    saved = torch.load(latest / "deepspeed" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved and all("lora_" in k or k.startswith("proj.") for k in saved)  # not the frozen base model

    more = run_train_refiner(replace(cfg, refiner=replace(cfg.refiner, train_seconds=1e9,
                                                          max_steps=first["steps"] + 2)))
    assert more["resumed_from_step"] == first["steps"] and more["steps"] == first["steps"] + 2
    assert more["optimizer_steps"] == more["steps"]  # a fresh optimizer would count 2: Adam's state was restored
    assert more["weight_spread"] == 0.0 and (tmp_path / "out" / "projection.safetensors").exists()


def test_refiner_on_two_ddp_workers_stays_in_sync_and_resumes(ray_session, tiny_dir, tmp_path):
    """deepspeed_stage 0 = DDP: without wrapping the model each worker trained its own copy on its own shard."""
    from jobs.train_refiner import run_train_refiner

    cfg = replace(two_worker_refiner_config(tiny_dir, tmp_path, train_seconds=1e9, max_steps=3), deepspeed_stage=0)
    first = run_train_refiner(cfg)
    assert first["steps"] == 3 and first["optimizer_steps"] == 3 and first["weight_spread"] == 0.0
    more = run_train_refiner(replace(cfg, refiner=replace(cfg.refiner, max_steps=5)))
    assert more["resumed_from_step"] == 3 and more["optimizer_steps"] == 5 and more["weight_spread"] == 0.0
