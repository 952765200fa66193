"""The vllm generation backend of the batch stages: a Ray Data LLM processor (``ray.data.llm``) over prompts.

``generation.backend: vllm`` makes a stage run its generations here instead of in HF actors: each prompt is rendered
and tokenized on the driver by the same ``build_prompt`` + tokenizer as the HF path (so the chat template and think
markers are identical and no BOS is added twice), then a ``vLLMEngineProcessorConfig`` processor runs them through
vLLM engine actors with prefix caching on, ``samples`` rows per prompt (Ray Data LLM keeps only a request's first
output, so ``SamplingParams(n=K)`` would drop samples; the K copies of a prompt share its cached KV blocks instead).
Results come back as :class:`~synadapt.models.lm.Generation` records, the fields the HF path gives.

    python -m jobs.collect_dcot --model checkpoints/tiny-reasoner --generation.backend vllm
    python -m jobs.build_preferences --long_model A --short_model B --generation.backend vllm
    python -m jobs.evaluate --model A --methods '[long_cot, nothink]' --generation.backend vllm

Each stage's vLLM records go to the same resumable Parquet directory as its HF actors' (:func:`vllm_map_to_parquet`);
the latent rows of an evaluation stay on the HF actors (they need ``inputs_embeds`` and hidden states).
"""
from __future__ import annotations

import time
import uuid
import zlib
from collections import defaultdict

from synadapt.models.lm import Generation, GenerationConfig
from synadapt.models.vllm_engine import engine_kwargs, sampling_params


def vllm_generate(prompts: dict, model: str, gen: GenerationConfig, tok, *, samples: int = 1,
                  batch_size: int = 16, concurrency: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                  seed: int | None = None) -> dict:
    """``{id: prompt text}`` → ``{id: [Generation] * samples}`` from vLLM engine actors on the running Ray cluster.

    ``tok`` is the model's tokenizer (prompts are tokenized here without special tokens, as the HF path does).
    ``num_gpus`` per engine actor: 0 on a CPU machine. Ray Data LLM's engine stage asks for one GPU per actor
    unless a placement group says otherwise, and a GPU request on a CPU-only cluster waits forever, so the bundle
    is always given explicitly. ``seconds`` is the request's engine time divided by ``batch_size`` (the requests of
    a batch run together), the HF path's batch wall time per question. With ``seed`` each (prompt id, sample)
    request draws from its own seeded generator, so a rerun or a retried batch samples the same text.
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

    def request(row: dict) -> dict:
        seeded = {} if seed is None else {"seed": zlib.crc32(f"{seed}:{row['id']}:{row['sample']}".encode())}
        return {**row, "sampling_params": {**params, **seeded}}

    processor = build_processor(config, preprocess=request, postprocess=record)
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


def vllm_map_to_parquet(rows: list[dict], out_dir: str, make_records) -> dict:
    """``make_records(todo) -> records`` for the ``rows`` whose ``id`` is not yet in ``out_dir``, written there as one
    Parquet shard; the resume and counts of :func:`jobs.common.map_to_parquet`, so a stage reads either backend's
    output alike. The shard is written atomically: a run killed during generation leaves nothing half-written, and
    its rerun generates those rows again."""
    from jobs.common import ERROR_COLUMN, read_parquet_rows, storage, write_shard

    t0 = time.perf_counter()
    done = {r["id"] for r in read_parquet_rows(out_dir, ["id"])}
    todo = [r for r in rows if r["id"] not in done]
    if todo:
        import pyarrow as pa

        records = [{**rec, ERROR_COLUMN: ""} for rec in make_records(todo)]
        fs, root = storage(out_dir)
        fs.create_dir(root, recursive=True)
        write_shard(fs, pa.Table.from_pylist(records), f"{root}/vllm-{uuid.uuid4().hex}.parquet")
    total = len({r["id"] for r in read_parquet_rows(out_dir, ["id"])} & {r["id"] for r in rows})
    return {"input": len(rows), "skipped": len(rows) - len(todo), "written": len(todo), "total": total,
            "duplicates_removed": 0, "errors": 0, "errors_retried": 0, "seconds": round(time.perf_counter() - t0, 2)}


def _engine(cfg) -> dict:
    """The engine-actor settings a stage config carries."""
    return {"batch_size": cfg.batch_size, "concurrency": cfg.concurrency, "num_cpus": cfg.num_cpus,
            "num_gpus": cfg.num_gpus}


def collect_dcot_vllm(cfg, rows: list[dict]) -> dict:
    """collect_dcot's records for ``rows`` from vLLM into ``cfg.out_dir``."""
    from transformers import AutoTokenizer

    from synadapt.data.dcot import dcot_record
    from synadapt.models.lm import build_prompt

    def records(todo: list[dict]) -> list[dict]:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        prompts = {r["id"]: build_prompt(tok, r["question"], "long", cfg.prompt) for r in todo}
        gens = vllm_generate(prompts, cfg.model, cfg.generation, tok, **_engine(cfg))
        return [dcot_record(r, gens[r["id"]][0], cfg.prompt) for r in todo]

    return vllm_map_to_parquet(rows, cfg.out_dir, records)


def sample_preferences_vllm(cfg, rows: list[dict], samples_dir: str) -> dict:
    """build_preferences' samples for ``rows`` (K graded responses per question from the long and the short model,
    the columns of ``jobs.build_preferences.PreferenceSampler``) from vLLM, the K copies of a prompt sharing its
    cached prefix; each (question, sample) seeded from ``cfg.seed``."""
    from transformers import AutoTokenizer

    from synadapt.adar1.preferences import graded_group
    from synadapt.models.lm import build_prompt

    def records(todo: list[dict]) -> list[dict]:
        out = [{"id": r["id"]} for r in todo]
        for name, model in (("long", cfg.long_model), ("short", cfg.short_model)):
            tok = AutoTokenizer.from_pretrained(model)
            prompts = {r["id"]: build_prompt(tok, r["question"], "long", cfg.prompt) for r in todo}
            gens = vllm_generate(prompts, model, cfg.generation, tok, samples=cfg.k, seed=cfg.seed, **_engine(cfg))
            for rec, r in zip(out, todo):
                group = graded_group(gens[r["id"]], r["answer"], cfg.prompt)
                rec.update({f"{name}_{field}": [g[field] for g in group] for field in ("text", "correct", "tokens")})
        return out

    return vllm_map_to_parquet(rows, samples_dir, records)


def evaluate_vllm(cfg, rows: list[dict], records_dir: str, modes: dict[str, str]) -> dict:
    """jobs.evaluate's records for its plain generation rows (``modes``: method → generation mode) from vLLM."""
    from transformers import AutoTokenizer

    from synadapt.eval.evaluate import generation_record
    from synadapt.models.lm import build_prompt

    def records(todo: list[dict]) -> list[dict]:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        prompts = {r["id"]: build_prompt(tok, r["question"], modes[r["method"]], cfg.prompt) for r in todo}
        gens = vllm_generate(prompts, cfg.model, cfg.generation, tok, **_engine(cfg))
        return [{**generation_record({**r, "id": r["question_id"]}, gens[r["id"]][0], modes[r["method"]],
                                     cfg.prompt),
                 "id": r["id"], "question_id": r["question_id"], "method": r["method"]} for r in todo]

    return vllm_map_to_parquet(rows, records_dir, records)
