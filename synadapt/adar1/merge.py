"""AdaR1 model merging: θ_H = α·θ_long + (1−α)·θ_short, streamed tensor by tensor (METHOD.md §2).

A 7B merge must not hold two models in memory, so nothing here loads a model. Every tensor's name, shape and dtype
is read from the safetensors headers and checked first (a bad pair of checkpoints fails before a byte is written);
then each output shard is written straight to disk, one tensor at a time, each tensor in row chunks read with
``safe_open(...).get_slice``. Peak memory is a few chunks, not a model (``bench/merge_memory.py`` measures it).
"""
from __future__ import annotations

import json
import logging
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig
from synadapt.models.lm import GenerationConfig, PromptFormat

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Config fields that must agree for a per-tensor average to mean anything.
ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
# Non-weight files of a model directory that a copy of the model needs (config, generation and tokenizer files).
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.*",
                       "merges.txt", "added_tokens.json", "chat_template.*", "preprocessor_config.json")
WEIGHT_FILE_PATTERNS = ("model*.safetensors", INDEX_NAME)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
TIED_HEAD = "lm_head.weight"


@dataclass
class MergeConfig:
    """Merge the long- and short-CoT models at one α, or sweep α on a validation split and keep the best."""

    long_model: str = ""
    """The long-CoT model directory (required); the merge takes its config and tokenizer."""
    short_model: str = ""
    """The short-CoT model directory from jobs.train_sft (required)."""
    output_dir: str = "runs/adar1/merged"
    """The merged model (the selected one after a sweep) is written here; a sweep also writes ``sweep.json``."""
    alpha: float = 0.8
    """Weight of the long model: θ = α·θ_long + (1−α)·θ_short (0.8 in the released AdaR1 recipe)."""
    sweep: list[float] = field(default_factory=list)
    """α values to compare on ``val`` (long-CoT mode); empty merges at ``alpha`` only. The winner is picked by
    ``rule``."""
    rule: str = "accuracy"
    """How the sweep picks α. ``accuracy``: the highest accuracy; values within ``acc_tolerance`` of it tie, and
    among ties the shortest mean generated length wins (then the larger α). ``rel_g``: the highest accuracy per
    generated token (the order of Rel-G against any fixed model), then the larger α: AdaR1 wants a start that is
    short and still right, and the accuracy rule keeps the long end whenever merging costs any accuracy."""
    acc_tolerance: float = 0.0
    """Accuracy gap to the best α within which α values count as tied (``rule: accuracy``)."""
    keep_sweep_models: bool = False
    """Keep every swept model under ``<output_dir>-sweep/`` (else only the selected one survives)."""
    max_shard_gb: float = 2.0
    """Output shard size in GiB."""
    task: TaskConfig = field(default_factory=TaskConfig)
    val: DataSource = field(default_factory=lambda: DataSource(split="val"))
    """Validation problems for the sweep (embedded task's val split by default)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for the sweep evaluation (greedy by default, like the evaluation of every other method)."""
    prompt: PromptFormat = field(default_factory=PromptFormat)
    eval_num_cpus: float = 1.0
    """Ray CPUs of each sweep evaluation task."""
    eval_num_gpus: float = 0.0
    """Resources of each sweep evaluation task (one GPU per task on a GPU cluster)."""
    threads: int = 1
    """torch threads per evaluation task."""

    def __post_init__(self):
        if self.rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {self.rule!r}; expected one of {tuple(MERGE_RULES)}")


MERGE_RULES = {"accuracy": "highest validation accuracy (ties within acc_tolerance), then shortest mean generated "
                          "length, then larger alpha",
               "rel_g": "highest validation accuracy per generated token, then larger alpha"}
"""The sweep rules of :func:`pick_alpha` and how ``sweep.json`` describes each."""


def pick_alpha(results: list[dict], acc_tolerance: float = 0.0, rule: str = "accuracy") -> dict:
    """The sweep winner among ``{"alpha", "accuracy", "mean_generated_tokens"}`` rows (rules in
    :attr:`MergeConfig.rule`). ``accuracy``: accuracy within ``acc_tolerance`` of the best ties; among ties the
    shortest mean length, then the larger α. ``rel_g``: the highest accuracy per generated token, then the larger α."""
    if not results:
        raise ValueError("no sweep results to pick from")
    if rule == "rel_g":
        return max(results, key=lambda r: (r["accuracy"] / max(r["mean_generated_tokens"], 1e-9), r["alpha"]))
    best = max(r["accuracy"] for r in results)
    tied = [r for r in results if r["accuracy"] >= best - acc_tolerance - 1e-12]
    return min(tied, key=lambda r: (r["mean_generated_tokens"], -r["alpha"]))


def copy_model_files(src: str | Path, dst: str | Path, weights: bool = False) -> list[str]:
    """Copy config, generation-config and tokenizer files (and the safetensors weights if ``weights``) of a model
    directory into ``dst``; optimizer states, trainer states and other files are left behind. Returns the names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    patterns = MODEL_FILE_PATTERNS + (WEIGHT_FILE_PATTERNS if weights else ())
    copied = sorted({p.name for pat in patterns for p in src.glob(pat) if p.is_file()})
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise ValueError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    return json.loads(path.read_text())


def _weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name → shard file name, from the index or the single ``model.safetensors``."""
    if (model_dir / INDEX_NAME).exists():
        return json.loads((model_dir / INDEX_NAME).read_text())["weight_map"]
    if (model_dir / SINGLE_NAME).exists():
        with safe_open(model_dir / SINGLE_NAME, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_NAME)
    raise ValueError(f"{model_dir} has neither {SINGLE_NAME} nor {INDEX_NAME}; only safetensors checkpoints can be "
                     "merged (re-save a .bin checkpoint with save_pretrained(..., safe_serialization=True))")


def _specs(model_dir: Path, weight_map: dict[str, str]) -> dict[str, tuple[str, list[int]]]:
    """Tensor name → (safetensors dtype string, shape), read from the shard headers only."""
    specs = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(model_dir / shard, framework="pt") as f:
            stored = set(f.keys())  # a method of safe_open, not a dict
            for name in [n for n, file in weight_map.items() if file == shard]:
                if name not in stored:
                    raise ValueError(f"{model_dir}: tensor {name!r} is in the index but not in {shard}")
                s = f.get_slice(name)
                specs[name] = (s.get_dtype(), list(s.get_shape()))
    return specs


def check_architectures(long_cfg: dict, short_cfg: dict) -> None:
    """Raise ValueError naming the first architecture field on which the two configs disagree."""
    for key in ARCH_FIELDS:
        if long_cfg.get(key) != short_cfg.get(key):
            raise ValueError(f"cannot merge different architectures: config field {key!r} is "
                             f"{long_cfg.get(key)!r} in the long model but {short_cfg.get(key)!r} in the short model")


class _Source:
    """One parent checkpoint: where each tensor lives, its dtype and shape, and chunked reads."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = _config(self.dir)
        self.weight_map = _weight_map(self.dir)
        self.specs = _specs(self.dir, self.weight_map)
        embeds = [n for n in self.specs if n.endswith("embed_tokens.weight")]
        # Tied checkpoints usually omit lm_head; its value is then the input embedding.
        self.aliases = {TIED_HEAD: embeds[0]} if self.config.get("tie_word_embeddings") and len(embeds) == 1 else {}

    def resolve(self, name: str) -> str | None:
        return name if name in self.specs else self.aliases.get(name)

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (the whole of a 0-d tensor), copied out of its shard.

        The shard is opened for this one read: safetensors memory-maps it, and every page touched through an open
        map counts as resident, so a handle kept open would let a whole shard (5 GB in a 7B checkpoint) pile up.
        An open costs about a millisecond, small next to reading a chunk.
        """
        name = self.resolve(name)
        with safe_open(self.dir / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name) if start is None else f.get_slice(name)[start:stop]


def _check_tensors(long: _Source, short: _Source) -> list[str]:
    """The output tensor names (the long model's); ValueError names the first tensor that does not match."""
    for name in sorted(set(short.specs) - set(long.specs)):
        if not (name == TIED_HEAD and long.aliases):
            raise ValueError(f"tensor {name!r} is in the short model but not in the long model")
    for name in sorted(long.specs):
        other = short.resolve(name)
        if other is None:
            raise ValueError(f"tensor {name!r} is in the long model but not in the short model")
        (ld, ls), (sd, ss) = long.specs[name], short.specs[other]
        if ls != ss:
            raise ValueError(f"tensor {name!r} has shape {ls} in the long model but {ss} in the short model")
        if ld != sd:
            raise ValueError(f"tensor {name!r} has dtype {ld} in the long model but {sd} in the short model")
        if ld not in DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {ld}, which this merge does not support")
    return sorted(long.specs)


def _nbytes(spec: tuple[str, list[int]]) -> int:
    dtype, shape = spec
    n = 1
    for d in shape:
        n *= d
    return n * DTYPES[dtype].itemsize


def _plan_shards(names: list[str], specs: dict, max_shard_bytes: int) -> list[list[str]]:
    """Greedy split into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for name in names:
        n = _nbytes(specs[name])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _merged_chunks(long: _Source, short: _Source, name: str, alpha: float, chunk_bytes: int):
    """The merged tensor ``name`` as a sequence of row chunks in the stored dtype.

    Floats are averaged in float32 and cast back. A weight of exactly 1 or 0 copies the parent, which keeps the
    endpoints bit-exact (float arithmetic would turn −0.0 into +0.0). Integer and bool tensors (buffers) are copied
    from the long model.
    """
    dtype, shape = long.specs[name]
    if dtype not in FLOAT_DTYPES or alpha == 1.0:
        parents = [(long, 1.0)]
    elif alpha == 0.0:
        parents = [(short, 1.0)]
    else:
        parents = [(long, alpha), (short, 1.0 - alpha)]
    if not shape:
        ranges = [(None, None)]
    else:
        row_float32_bytes = 4 * (_nbytes(long.specs[name]) // DTYPES[dtype].itemsize // max(1, shape[0]))
        step = max(1, chunk_bytes // max(1, row_float32_bytes))
        ranges = [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]
    for start, stop in ranges:
        if len(parents) == 1:
            yield parents[0][0].read(name, start, stop)
            continue
        (a, wa), (b, wb) = parents
        # In place, so a chunk costs two float32 buffers; same rounding as a.float() * wa + b.float() * wb.
        out = a.read(name, start, stop).float().mul_(wa)
        out.add_(b.read(name, start, stop).float().mul_(wb))
        yield out.to(DTYPES[dtype])


def _write_shard(path: Path, names: list[str], specs: dict, chunks_of) -> int:
    """Write one safetensors file whose tensors arrive as chunks, without holding the shard in memory.

    The header (names, dtypes, shapes, byte offsets) is known up front from ``specs``, so it is written first and
    the data streamed after it; the format is the standard one (8-byte header length, JSON header, raw data).
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        dtype, shape = specs[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + _nbytes(specs[name])]}
        offset += _nbytes(specs[name])
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            written = 0
            for chunk in chunks_of(name):
                data = chunk.contiguous().view(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise RuntimeError(f"tensor {name!r}: wrote {written} bytes, expected another size")
    return offset


def merge_checkpoints(long_dir: str | Path, short_dir: str | Path, out_dir: str | Path, alpha: float,
                      max_shard_bytes: int = 2 * 1024**3, chunk_bytes: int = 4 * 1024**2) -> dict:
    """Write the merged model ``alpha·long + (1−alpha)·short`` to ``out_dir`` as a Hugging Face model directory.

    Both parents must be safetensors checkpoints (one file or sharded with an index) of the same architecture;
    mismatched configs, tensor names, shapes or dtypes raise ValueError naming the culprit before anything is
    written. The output keeps the long model's tensor names and dtypes, is sharded at ``max_shard_bytes`` (single
    ``model.safetensors`` when it fits), and gets the long model's config, generation config and tokenizer files.
    ``chunk_bytes`` bounds the float32 working set per read. Returns a summary (also saved as ``merge_info.json``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    t0 = time.time()
    long, short = _Source(long_dir), _Source(short_dir)
    check_architectures(long.config, short.config)
    names = _check_tensors(long, short)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [p for pat in WEIGHT_FILE_PATTERNS for p in out.glob(pat)]:
        stale.unlink()
    shards = _plan_shards(names, long.specs, max_shard_bytes)
    files = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total, weight_map = 0, {}
    for i, (fname, shard) in enumerate(zip(files, shards)):
        total += _write_shard(out / fname, shard, long.specs,
                              lambda name: _merged_chunks(long, short, name, alpha, chunk_bytes))
        weight_map.update({name: fname for name in shard})
        log.info("merge α=%.3f: shard %d/%d written (%.1f MB so far, %.1fs)", alpha, i + 1, len(shards),
                 total / 2**20, time.time() - t0)
    if len(shards) > 1:
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    copy_model_files(long.dir, out)
    info = {"alpha": alpha, "long_model": str(long.dir), "short_model": str(short.dir), "tensors": len(names),
            "bytes": total, "shards": len(shards), "seconds": round(time.time() - t0, 2)}
    (out / "merge_info.json").write_text(json.dumps(info, indent=2))
    return info
