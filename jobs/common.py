"""The only place that knows how pipeline stages map onto Ray.

- Batch stages (DCoT collection, latent synthesis, evaluation) are resumable Ray Data actor-pool maps that write
  Parquet shards: :func:`map_to_parquet`, read back with :func:`read_parquet_rows` / :func:`iter_parquet_shards`.
- Outputs may live on any filesystem pyarrow reaches: a local path or a URI (``s3://``, ``gs://``, ``file://``);
  :func:`storage` resolves one, :func:`join_path` builds paths under one (``pathlib`` turns a URI into a local path).
- Training stages are Ray Train ``TorchTrainer`` runs that checkpoint and resume: :func:`fit_torch_trainer`, with
  :func:`latest_checkpoint_dir` inside the loop and :func:`deepspeed_config` / :func:`skip_deepspeed_shm_build`
  for DeepSpeed.

Everything here runs the same on a laptop (CPU, gloo) and on a GPU cluster; only resource counts change.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from synadapt.config import RetryConfig

log = logging.getLogger(__name__)

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
ERROR_COLUMN = "error"
"""Column an actor may fill (non-empty string) to mark a row it could not process; such rows are counted."""


def init_ray(address: str | None = None, num_cpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Connect to the cluster at ``address`` / ``$RAY_ADDRESS``, or start a local Ray instance; no-op if connected.

    Inside ``ray job submit`` Ray sets ``RAY_ADDRESS``, so the same job code attaches to the cluster. Token auth
    (Ray >= 2.5x) must be configured identically for every process of a cluster: whatever ``RAY_AUTH_MODE`` this
    process has is handed to the workers of a local instance (STACK.md §8). ``num_cpus`` only applies to a local one.
    Without an address Ray attaches to a cluster started on this machine with ``ray start`` if there is one;
    ``address="local"`` (or ``RAY_ADDRESS=local``) always starts a private instance.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"address": address, "log_to_driver": log_to_driver}
    if address in (None, "local"):  # a new local instance ("local" never attaches to a running `ray start`)
        env_vars = {"TOKENIZERS_PARALLELISM": "false"}
        if os.environ.get("RAY_AUTH_MODE"):
            env_vars["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
        # Only for a local instance: a submitted job's own runtime_env would conflict on repeated env keys.
        kwargs.update(num_cpus=num_cpus, runtime_env={"env_vars": env_vars})
    ray.init(**kwargs)


# ------------------------------------------------------------------------------------------ stage plumbing


def load_stage_config(cls, argv: list[str], section: str):
    """``cls`` from ``--config FILE`` (anywhere in ``argv``) plus ``--dotted.key value`` overrides; ``--help`` lists
    the fields and exits.

    A pipeline YAML holds one mapping per stage; when FILE has a top-level ``section`` key, that mapping is used,
    laid over FILE's other top-level keys that ``cls`` also has (shared ``model``, ``task``, ``prompt``...).
    """
    import dataclasses
    import sys

    import yaml

    from synadapt.config import deep_merge, describe, load_config, parse_overrides

    if "-h" in argv or "--help" in argv:
        print(f"usage: python -m jobs.{section} [--config FILE] [--dotted.key VALUE ...]\n\n{cls.__doc__}\n")
        print("\n".join(describe(cls)))
        sys.exit(0)
    argv, values = list(argv), {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a YAML file")
        values = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
        del argv[i:i + 2]
        if isinstance(values.get(section), dict):
            names = {f.name for f in dataclasses.fields(cls)}
            values = {**{k: v for k, v in values.items() if k in names}, **values[section]}
    cfg = load_config(cls, None, deep_merge(values, parse_overrides(argv)))
    # Ray workers do not run in the driver's directory: a relative local path (``--model checkpoints/x``) would be
    # looked up on the Hugging Face Hub there, so every top-level path that exists here is made absolute.
    local = {f.name: os.path.abspath(v) for f in dataclasses.fields(cfg)
             if isinstance(v := getattr(cfg, f.name), str) and v and not os.path.isabs(v) and os.path.exists(v)}
    return dataclasses.replace(cfg, **local)


def load_stage_problems(data, task) -> tuple[list[dict], int]:
    """A stage's input problems from a ``DataSource`` and the number of malformed rows skipped (printed, not fatal)."""
    from synadapt.data.problems import load_problems

    if not data.path:
        return data.load(task), 0
    report = load_problems(data.path, adapter=data.adapter, field_map=data.field_map or None, split=data.split,
                           limit=data.limit or None)
    print(report.summary(), flush=True)
    if not report.problems:
        raise ValueError(f"no valid problems in {data.path!r} (split {data.split!r}, adapter {data.adapter!r})")
    return report.problems, len(report.malformed)


def apply_rows(fn, batch: dict, id_field: str = "id") -> dict:
    """Body of an actor's ``__call__``: Ray Data batch → row dicts → ``fn(rows)`` → columns, with bad rows isolated.

    If ``fn`` raises on the batch, each row is retried alone; a row that still raises becomes a record with only
    its id and an ``error`` message (counted by :func:`map_to_parquet`), so one bad question never fails the job.
    Good records get ``error=""``.
    """
    import numpy as np

    rows = [dict(zip(batch, values)) for values in zip(*(col.tolist() for col in batch.values()))]
    try:
        records = fn(rows)
    except Exception:  # noqa: BLE001 - isolate the bad row(s) below
        records = []
        for row in rows:
            try:
                records += fn([row])
            except Exception as e:  # noqa: BLE001 - a bad row is data, not a crash
                log.warning("row %s failed: %s: %s", row.get(id_field), type(e).__name__, e)
                records.append({id_field: row.get(id_field), ERROR_COLUMN: f"{type(e).__name__}: {e}"[:500]})
    columns = list(dict.fromkeys(k for r in records for k in r))
    if ERROR_COLUMN not in columns:
        columns.append(ERROR_COLUMN)
    out = {}
    for k in columns:
        values = [r.get(k, "" if k == ERROR_COLUMN else None) for r in records]
        try:
            col = None if any(v is None for v in values) else np.asarray(values)
        except ValueError:  # ragged lists
            col = None
        if col is None or col.dtype == object:
            col = np.empty(len(values), dtype=object)  # 1-D even when the values are lists
            col[:] = values
        out[k] = col
    return out


# ---------------------------------------------------------------------------------------------------- storage


def is_uri(path: str) -> bool:
    """Whether ``path`` is a filesystem URI (``s3://bucket/x``, ``gs://...``, ``file:///x``), not a local path."""
    return "://" in str(path)


def join_path(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI; a URI's ``?query`` options (region, endpoint) stay at its end.

    ``pathlib`` cannot do this: ``Path("s3://b/x")`` is the local path ``s3:/b/x``.
    """
    if not is_uri(base):
        return str(Path(base, *parts))
    head, sep, query = str(base).partition("?")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


def storage(path: str):
    """``(pyarrow FileSystem, path inside it)`` for a local path or any URI pyarrow understands (s3, gs, hdfs, file).

    An object store's credentials and endpoint come from the environment of each process that resolves or
    unpickles the filesystem (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, an instance
    role) or from the URI itself (``s3://bucket/x?region=eu-west-1&endpoint_override=host:9000&scheme=http``;
    ``s3://KEY:SECRET@bucket/x`` for a test server). A local path is made absolute: workers may run elsewhere.
    """
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(str(path))
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)


def read_text(path: str) -> str | None:
    """The text of the file at a local path or URI, or None when there is none."""
    import pyarrow.fs

    fs, p = storage(path)
    if fs.get_file_info(p).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    """Write ``text`` to a local path or URI, creating its directory."""
    fs, p = storage(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


# ------------------------------------------------------------------------------------------- Ray Data stages


def _shards(fs, root: str) -> list[str]:
    from pyarrow.fs import FileSelector, FileType

    infos = fs.get_file_info(FileSelector(root, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == FileType.File and i.path.endswith(".parquet"))


def _read_shard(fs, path: str, columns: list[str] | None = None):
    """The table in ``path``, or None for a file that is not Parquet (a partial shard from a writer killed before
    shard writes were atomic, a foreign file): it is renamed to ``.bad`` and its rows are redone.

    An ``OSError`` (a network or disk hiccup, a throttled object store) propagates: the shard may be good, and
    setting it aside would redo its rows for nothing.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if columns is not None:
            names = set(pq.read_schema(path, filesystem=fs).names)
            columns = [c for c in columns if c in names]
        return pq.read_table(path, columns=columns, filesystem=fs)
    except pa.ArrowInvalid as e:
        log.warning("unreadable parquet shard %s (%s); renaming it to .bad, its rows will be redone", path, e)
        fs.move(path, path.removesuffix(".parquet") + ".bad")
        return None


def write_shard(fs, table, path: str) -> None:
    """Write ``table`` to ``path`` so that a reader sees the whole shard or none: write a ``.tmp``, then rename
    (a server-side copy on object stores, whose uploads are atomic anyway). Leftover ``.tmp`` files are ignored."""
    import pyarrow.parquet as pq

    tmp = path + ".tmp"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


def _shard_columns(fs, root: str, columns: list[str]) -> dict:
    """``columns`` (those a shard has) of every readable shard under ``root``, by shard path."""
    tables = {}
    for path in _shards(fs, root):
        table = _read_shard(fs, path, columns)
        if table is not None:
            tables[path] = table
    return tables


def _column(table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _keep_rows(fs, path: str, keep: list[bool]) -> int:
    """Rewrite shard ``path`` with the rows where ``keep`` is true (delete it when none is); returns rows removed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if all(keep):
        return 0
    table = pq.read_table(path, filesystem=fs).filter(pa.array(keep))
    if table.num_rows:
        write_shard(fs, table, path)
    else:
        fs.delete_file(path)
    return len(keep) - table.num_rows


def _dedupe(fs, root: str, id_field: str) -> int:
    """Keep the first record of every id (retried tasks may write a batch twice); returns rows removed."""
    seen, removed = set(), 0
    for path, table in _shard_columns(fs, root, [id_field]).items():
        keep = []
        for i in _column(table, id_field):
            keep.append(i not in seen)
            seen.add(i)
        removed += _keep_rows(fs, path, keep)
    return removed


class _ShardWriter:
    """Ray Data actor around a stage's actor: runs it on a batch and writes the batch's records as one Parquet shard
    itself, so a finished batch is on storage as soon as it is done and only its ids travel back."""

    def __init__(self, actor_cls: type, actor_kwargs: dict, fs, root: str, id_field: str):
        self.actor, self.fs, self.root, self.id_field = actor_cls(**actor_kwargs), fs, root, id_field

    def __call__(self, batch: dict) -> dict:
        from ray.data.block import BlockAccessor

        out = self.actor(batch)
        table = BlockAccessor.batch_to_block(out)  # the Arrow table Ray Data's own writer would write
        write_shard(self.fs, table, f"{self.root}/{uuid.uuid4().hex}.parquet")
        return {self.id_field: out[self.id_field]}


def map_to_parquet(rows: list[dict], actor_cls: type, actor_kwargs: dict, out_dir: str, *, id_field: str = "id",
                   batch_size: int = 16, concurrency: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                   retries: RetryConfig | None = None, desc: str = "") -> dict:
    """Run ``actor_cls`` over ``rows`` on a Ray Data actor pool and write the results as Parquet shards; resumable.

    ``actor_cls(**actor_kwargs)`` loads its model once per actor; ``__call__(batch: dict[str, np.ndarray])`` returns
    a dict of columns including ``id_field`` (one output row per input row; a row it cannot process gets a
    non-empty ``error`` string rather than an exception). Each batch's records become one shard, written by the
    actor atomically (write, then rename). Rows whose id already has a record in ``out_dir`` are skipped, so
    re-running after a crash only does what is left; with ``retries.retry_errors`` (the default) rows recorded with
    an error are redone too. An actor whose process dies is restarted up to ``retries.max_actor_restarts`` times
    and its batch retried up to ``retries.max_task_retries`` times, then the job fails (a batch that kills every
    actor it reaches, e.g. by host OOM, must not loop forever); what was written stays for the next run. Afterwards
    every input id must have exactly one record: duplicates from retried tasks are removed, a missing id raises.
    Returns counts ``{input, skipped, written, total, duplicates_removed, errors, errors_retried, seconds}``;
    ``errors`` counts records in ``out_dir`` with a non-empty ``error``. :func:`apply_rows` is the usual
    ``__call__`` body. ``out_dir`` is a local path or a URI (:func:`storage`); on a multi-node cluster it must be
    storage every node writes to (an object store, NFS), since actors run on any node.
    """
    import ray

    retries = retries or RetryConfig()
    t0 = time.perf_counter()
    name = desc or actor_cls.__name__
    ids = [r.get(id_field) for r in rows]
    if any(i is None for i in ids):
        raise ValueError(f"{name}: every input row needs an {id_field!r} field; row {ids.index(None)} has none")
    dup = [i for i, n in Counter(ids).items() if n > 1]
    if dup:
        raise ValueError(f"{name}: duplicate input ids (each id is written once): {dup[:10]}")
    if num_gpus and not batch_size:
        raise ValueError(f"{name}: batch_size is required when requesting GPUs")

    fs, root = storage(out_dir)
    fs.create_dir(root, recursive=True)
    retried = 0
    if retries.retry_errors:
        for path, table in _shard_columns(fs, root, [ERROR_COLUMN]).items():
            retried += _keep_rows(fs, path, [not e for e in _column(table, ERROR_COLUMN)])
    done = {i for table in _shard_columns(fs, root, [id_field]).values() for i in _column(table, id_field)}
    todo = [r for r in rows if r[id_field] not in done]
    log.info("%s: %d input rows, %d already in %s, %d to do (%d error rows redone; %d actors x %s CPU / %s GPU, "
             "batch %d)", name, len(rows), len(rows) - len(todo), out_dir, len(todo), retried, concurrency, num_cpus,
             num_gpus, batch_size)
    if todo:
        # One block per batch, so idle actors can pull work instead of waiting on a big block.
        ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / batch_size)))
        # Ray Data's default for actor pools is unbounded restarts and retries (max_restarts=-1). Ray 2.60 has no
        # named parameter for them: they go through **ray_remote_args (deprecated, with a warning, for 2.64).
        ds = ds.map_batches(_ShardWriter, fn_constructor_kwargs={"actor_cls": actor_cls, "actor_kwargs": actor_kwargs,
                                                                 "fs": fs, "root": root, "id_field": id_field},
                            compute=ray.data.ActorPoolStrategy(size=concurrency), batch_size=batch_size,
                            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=retries.max_actor_restarts,
                            max_task_retries=retries.max_task_retries)
        try:
            ds.materialize()
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(
                f"{name}: an actor process died and its batch failed after {retries.max_task_retries} retries "
                f"({retries.max_actor_restarts} actor restarts allowed): a batch that kills its actor (host OOM, a "
                f"segfault) is not retried forever. Batches already written stay in {out_dir}; a re-run resumes "
                "from them (lower batch_size, or raise retries.max_task_retries / retries.max_actor_restarts)") from e

    removed = _dedupe(fs, root, id_field)
    tables = _shard_columns(fs, root, [id_field, ERROR_COLUMN]).values()
    written = Counter(i for table in tables for i in _column(table, id_field))
    missing = [i for i in ids if i not in written]
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} input ids have no record in {out_dir}: {missing[:10]} (on a "
                           "multi-node cluster out_dir must be storage every node writes to: an object store URI "
                           "such as s3://bucket/dir, or NFS)")
    counts = {"input": len(rows), "skipped": len(rows) - len(todo), "written": len(todo),
              "total": sum(written.values()), "duplicates_removed": removed,
              "errors": sum(bool(e) for table in tables for e in _column(table, ERROR_COLUMN)),
              "errors_retried": retried, "seconds": round(time.perf_counter() - t0, 2)}
    rate = len(todo) / counts["seconds"] if counts["seconds"] else 0.0
    log.info("%s: done %s (%.2f rows/s)", name, json.dumps(counts), rate)
    return counts


def iter_parquet_shards(out_dir: str, columns: list[str] | None = None) -> Iterator[list[dict]]:
    """The records of each Parquet shard in ``out_dir`` (a local path or a URI) as dicts, one shard at a time
    (shards may differ in columns); only ``columns`` (those a shard has) when given."""
    fs, root = storage(out_dir)
    for path in _shards(fs, root):
        table = _read_shard(fs, path, columns)
        if table is not None:
            yield table.to_pylist()


def read_parquet_rows(out_dir: str, columns: list[str] | None = None) -> list[dict]:
    """Every record in ``out_dir``'s Parquet shards as dicts; pass ``columns`` to keep big ones off the driver."""
    return [row for rows in iter_parquet_shards(out_dir, columns) for row in rows]


# ------------------------------------------------------------------------------------------ Ray Train stages


def fit_torch_trainer(train_loop, loop_config: dict, *, name: str, storage_path: str, num_workers: int = 2,
                      use_gpu: bool = False, max_failures: int = 2, resources_per_worker: dict | None = None,
                      datasets: dict | None = None, split_datasets: bool = True):
    """Run ``train_loop(loop_config)`` on ``num_workers`` Ray Train workers and return the ``Result``.

    The loop reports checkpoints with ``ray.train.report(metrics, checkpoint=...)`` and resumes from
    :func:`latest_checkpoint_dir`. A worker that dies restarts the whole group from the latest checkpoint, up to
    ``max_failures`` times; re-running with the same ``name``/``storage_path`` resumes a finished or crashed run.
    The two newest checkpoints are kept. NCCL on GPU, gloo on CPU. Raises the worker's error if the fit failed.

    Training data goes in ``datasets`` (name → Ray Dataset), never in ``loop_config`` (pickled whole to every
    worker): a worker reads ``ray.train.get_dataset_shard(name)``, an equal share of the rows (Ray Data's
    ``streaming_split``) or, with ``split_datasets=False``, all of them (for trainers that split data themselves).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config, datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all" if split_datasets else []),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(name=name, storage_path=os.path.abspath(storage_path) if "://" not in storage_path
                             else storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"))
    result = trainer.fit()  # Train V2 raises TrainingFailedError itself; V1 returns it in result.error
    if result.error is not None:
        raise result.error
    return result


def latest_checkpoint_dir() -> str | None:
    """Inside a train loop: the latest reported checkpoint as a local directory (None on a fresh start)."""
    import pyarrow.fs
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        return ckpt.path
    return ckpt.to_directory()  # cloud storage: download once


def deepspeed_config(stage: int = 2, bf16: bool | str = "auto", micro_batch: int | str = "auto",
                     grad_accum: int | str = "auto", grad_clip: float | str | None = None) -> dict:
    """The ZeRO-``stage`` config from ``configs/deepspeed/zero{stage}.json`` with batch sizes and precision filled in.

    Leave everything "auto" for HF/TRL ``Trainer(deepspeed=...)``, which fills the values from its arguments; a raw
    ``deepspeed.initialize`` needs every value explicit (bf16 on GPU, fp32 on CPU), else ValueError names the rest.
    ``grad_clip`` None means "auto" for HF and 1.0 for raw DeepSpeed.
    """
    path = DEEPSPEED_DIR / f"zero{stage}.json"
    if not path.exists():
        known = sorted(p.stem for p in DEEPSPEED_DIR.glob("zero*.json"))
        raise ValueError(f"no DeepSpeed template for ZeRO stage {stage} ({path}); available: {known}")
    cfg = json.loads(path.read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
               gradient_clipping=grad_clip if grad_clip is not None else "auto" if micro_batch == "auto" else 1.0,
               bf16={"enabled": bf16},
               # Under "auto" fp16 follows TrainingArguments; with an explicit precision there is no fp16 to pick.
               fp16={"enabled": "auto" if bf16 == "auto" else False})
    auto = [k for k, v in cfg.items() if v == "auto" or v == {"enabled": "auto"}]
    if micro_batch != "auto" and auto:
        raise ValueError(f"raw DeepSpeed config (micro_batch={micro_batch}) still has 'auto' values for {auto}; "
                         "pass bf16 and grad_accum explicitly too")
    return cfg


def skip_deepspeed_shm_build() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory allreduce op (g++, ~39 s on 2 cores, every fresh
    machine) on ``init_distributed``; collectives then go through plain gloo. No effect on GPU, where that op is
    never used. Call inside the train loop before ``deepspeed.initialize``.
    """
    # import_module, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the real torch as `torch`.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
