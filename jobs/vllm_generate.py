"""The vllm generation backend of the batch stages: a Ray Data LLM processor (``ray.data.llm``) over prompts.

``generation.backend: vllm`` makes a stage run its generations here instead of in HF actors: each prompt is rendered
and tokenized on the driver by the same ``build_prompt`` + tokenizer as the HF path (so the chat template and think
markers are identical and no BOS is added twice), then a ``vLLMEngineProcessorConfig`` processor runs them through
vLLM engine actors with prefix caching on, ``samples`` rows per prompt (Ray Data LLM keeps only a request's first
output, so ``SamplingParams(n=K)`` would drop samples; the K copies of a prompt share its cached KV blocks instead).
Results come back as :class:`~synadapt.models.lm.Generation` records, the fields the HF path gives.

    python -m jobs.collect_dcot --model checkpoints/tiny-reasoner --generation.backend vllm
"""
from __future__ import annotations

from collections import defaultdict

from synadapt.models.lm import Generation, GenerationConfig
from synadapt.models.vllm_engine import engine_kwargs, sampling_params


def vllm_generate(prompts: dict, model: str, gen: GenerationConfig, tok, *, samples: int = 1,
                  batch_size: int = 16, concurrency: int = 1, num_cpus: float = 1, num_gpus: float = 0) -> dict:
    """``{id: prompt text}`` → ``{id: [Generation] * samples}`` from vLLM engine actors on the running Ray cluster.

    ``tok`` is the model's tokenizer (prompts are tokenized here without special tokens, as the HF path does).
    ``num_gpus`` per engine actor: 0 on a CPU machine. Ray Data LLM's engine stage asks for one GPU per actor
    unless a placement group says otherwise, and a GPU request on a CPU-only cluster waits forever, so the bundle
    is always given explicitly. ``seconds`` is the request's engine time divided by ``batch_size`` (the requests of
    a batch run together), the HF path's batch wall time per question.
    """
    from ray.data import from_items
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
    config = vLLMEngineProcessorConfig(
        model_source=model, batch_size=batch_size, concurrency=concurrency,
        engine_kwargs=engine_kwargs(num_gpus), placement_group_config={"bundles": [bundle]},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, log_engine_metrics=False)
    params = sampling_params(gen)
    drop = (tok.eos_token, tok.pad_token)

    def record(row: dict) -> dict:
        text = row["generated_text"]
        for special in drop:
            text = text.replace(special, "") if special else text
        return {"id": row["id"], "sample": row["sample"], "text": text, "prompt_tokens": row["num_input_tokens"],
                "generated_tokens": row["num_generated_tokens"], "seconds": row["time_taken_llm"] / batch_size}

    processor = build_processor(config, preprocess=lambda row: {**row, "sampling_params": params},
                                postprocess=record)
    rows = [{"id": i, "sample": s, "tokenized_prompt": tok(p, add_special_tokens=False)["input_ids"]}
            for i, p in prompts.items() for s in range(samples)]
    out: dict = defaultdict(lambda: [None] * samples)
    for r in processor(from_items(rows)).take_all():
        n = r["prompt_tokens"]
        out[r["id"]][r["sample"]] = Generation(r["text"], n, r["generated_tokens"], n + r["generated_tokens"],
                                               r["seconds"])
    missing = [i for i in prompts if i not in out or None in out[i]]
    if missing:
        raise RuntimeError(f"vllm_generate: {len(missing)} prompts came back without all {samples} samples: "
                           f"{missing[:10]}")
    return {i: out[i] for i in prompts}


def collect_dcot_vllm(cfg, rows: list[dict]) -> dict:
    """collect_dcot's records for ``rows`` from vLLM, written as one Parquet shard in ``cfg.out_dir``; resumable like
    :func:`jobs.common.map_to_parquet` (ids already written are skipped) and returning the same counts."""
    import time
    import uuid
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from jobs.common import ERROR_COLUMN, read_parquet_rows
    from synadapt.data.dcot import dcot_record
    from synadapt.models.lm import build_prompt

    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_parquet_rows(str(out), ["id"])}
    todo = [r for r in rows if r["id"] not in done]
    if todo:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        prompts = {r["id"]: build_prompt(tok, r["question"], "long", cfg.prompt) for r in todo}
        gens = vllm_generate(prompts, cfg.model, cfg.generation, tok, batch_size=cfg.batch_size,
                             concurrency=cfg.concurrency, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        records = [{**dcot_record(r, gens[r["id"]][0], cfg.prompt), ERROR_COLUMN: ""} for r in todo]
        tmp = out / f".vllm-{uuid.uuid4().hex}.tmp"
        pq.write_table(pa.Table.from_pylist(records), tmp)
        tmp.rename(out / f"vllm-{uuid.uuid4().hex}.parquet")  # a killed run leaves no half-written shard
    total = len({r["id"] for r in read_parquet_rows(str(out), ["id"])} & {r["id"] for r in rows})
    return {"input": len(rows), "skipped": len(rows) - len(todo), "written": len(todo), "total": total,
            "duplicates_removed": 0, "errors": 0, "seconds": round(time.perf_counter() - t0, 2)}
