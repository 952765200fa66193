"""The SynAdapt stages as record-in/record-out functions with one config each; ``jobs/`` puts them on Ray.

Records are plain dicts (Parquet rows): DCoT records come from ``synadapt.data.dcot``; synthesis writes ``Z_syn``
records; the classifier stage writes feature records. Nothing here imports Ray.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from synadapt.config import RetryConfig
from synadapt.data.grading import answers_match
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig
from synadapt.latent.classifier import ClassifierConfig
from synadapt.latent.examples import make_example
from synadapt.latent.refiner import RefinerConfig
from synadapt.latent.synthesis import SynthesisConfig, synthesize_latents
from synadapt.models.lm import PromptFormat


@dataclass
class SynthesizeConfig:
    """Stage 1 as a job: one Z_syn per correct DCoT, on a Ray Data actor pool."""

    model: str = ""
    """The frozen long-CoT model (directory or hub id)."""
    dcot_dir: str = "runs/dcot"
    """DCoT records (Parquet shards from collect_dcot); only correct ones are used."""
    out_dir: str = "runs/zsyn"
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    data: DataSource = field(default_factory=DataSource)
    """The problems behind the DCoTs, for per-latent targets (``latent_targets`` / the embedded ``short_cot``)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    prompt: PromptFormat = field(default_factory=PromptFormat)
    wrong_targets: bool = False
    """Control run: optimise towards a random WRONG answer instead of the gold one (reports the L_dcot gap)."""
    batch_size: int = 64
    """Questions optimised together in one padded batch (each with its own Z)."""
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    """GPUs per actor; 0 on a CPU machine."""
    retries: RetryConfig = field(default_factory=RetryConfig)
    """Bounded actor restarts / batch retries, and whether a resume redoes rows that failed with an error."""
    threads: int = 2
    seed: int = 0


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A different answer of the same shape (another integer for integer answers), for the wrong-target control."""
    try:
        value = int(answer)
    except ValueError:
        return answer + " 1"
    return str(rng.choice([v for v in range(10) if v != value % 10]) if 0 <= value < 10 else value + rng.randint(1, 9))


def synthesize_batch(model, tok, rows: list[dict], cfg: SynthesizeConfig) -> list[dict]:
    """Z_syn records for DCoT records ``rows`` (the model's own thought and answer are the targets)."""
    rng = random.Random(cfg.seed)
    examples = []
    for r in rows:
        answer = wrong_answer(r["answer"], rng) if cfg.wrong_targets else None
        response = None if answer else r.get("response")
        ex = make_example({**r, "answer": answer or r["answer"]}, tok, cfg.prompt, cfg.synthesis.m,
                          response=response, dcot=r.get("dcot"), targets=cfg.synthesis.targets,
                          target_pad=cfg.synthesis.target_pad, target_prefix=cfg.synthesis.target_prefix)
        examples.append(ex)
    records = synthesize_latents(model, tok, examples, cfg.synthesis, cfg.prompt.think_end)
    for rec, r in zip(records, rows):
        rec["difficulty"] = r.get("difficulty")
    return records


@dataclass
class RefinerJobConfig:
    """Stage 2 as a job: train the refiner (LoRA + projection) on Z_syn records with Ray Train + DeepSpeed."""

    model: str = ""
    """The long-CoT base model the refiner adapts."""
    zsyn_dir: str = "runs/zsyn"
    """Z_syn records from synthesize (converged ones are used)."""
    data: DataSource = field(default_factory=DataSource)
    """The problems the Z_syn were made from (for per-latent targets such as the embedded task's short_cot)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    out_dir: str = "runs/refiner"
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    init_from: str = ""
    """A saved refiner directory to continue training from (e.g. a finished run's ``reasoner/refiner``); empty
    starts from a fresh adapter. The saved ``refiner.json`` sets the architecture and losses; ``refiner`` still sets
    m for the latent targets (keep it equal) and the budget (lr, batch size, seconds)."""
    prompt: PromptFormat = field(default_factory=PromptFormat)
    num_workers: int = 1
    use_gpu: bool = False
    deepspeed_stage: int = 2
    """2: DeepSpeed ZeRO-2; 0: no DeepSpeed, plain DDP. Either way the workers train one model together."""
    checkpoint_every: int = 200
    """Steps between checkpoints (adapter, projection, optimizer state); the run resumes from the latest."""
    max_failures: int = 2
    threads: int = 2
    storage_path: str = ""
    """Ray Train storage (checkpoints); empty means ``ray/`` beside ``out_dir``."""


def zsyn_array(record: dict):
    """A Z_syn record's latent as an (m, D) float32 array: Parquet may hand it back flat or nested."""
    import numpy as np

    return np.stack([np.asarray(row, np.float32) for row in record["z"]]).reshape([int(x) for x in record["shape"]])


def refiner_examples(zsyn_rows, problems: list[dict], tok, cfg: RefinerJobConfig) -> list[dict]:
    """Training examples: each Z_syn record of ``zsyn_rows`` (the converged ones; any iterable, e.g. a Ray Train
    worker's dataset shard) whose problem is known, with that problem's prompt, answer tail and per-slot targets."""
    by_id = {p["id"]: p for p in problems}
    examples = []
    for r in zsyn_rows:
        if r["id"] not in by_id:
            continue
        ex = make_example(by_id[r["id"]], tok, cfg.prompt, cfg.refiner.m, targets=cfg.refiner.targets,
                          target_pad=cfg.refiner.target_pad, target_prefix=cfg.refiner.target_prefix,
                          target_align=cfg.refiner.target_align)
        ex["z_syn"] = zsyn_array(r)
        examples.append(ex)
    return examples


@dataclass
class ClassifierJobConfig:
    """Stage 3 as a job: features + labels from the trained refiner on Ray Data, then the MLP on Ray Train."""

    run_dir: str = "runs/demo/reasoner"
    """Run directory holding reasoner.json and refiner/ (the classifier is written into it)."""
    data: DataSource = field(default_factory=lambda: DataSource(split="val"))
    """Questions to label (held out from refiner training: the embedded val split by default)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    features_dir: str = "runs/classifier_features"
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    batch_size: int = 64
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 2
    num_workers: int = 1
    storage_path: str = ""


def feature_batch(reasoner, rows: list[dict], max_new_tokens: int = 16) -> list[dict]:
    """For each problem: classifier features, the latent answer and whether it is wrong (= hard), plus the
    question-only features and the answer's mean NLL (the two baselines)."""
    th = reasoner.think([r["question"] for r in rows])
    answers = reasoner.answer_from_latents(th["prompt_ids"], th["z"], max_new_tokens)
    nll = reasoner.answer_nll(th["prompt_ids"], th["z"], answers)
    dim = th["features"].shape[1] // 2
    out = []
    for i, (r, a) in enumerate(zip(rows, answers)):
        out.append({"id": r["id"], "difficulty": r.get("difficulty"), "features": th["features"][i].tolist(),
                    "question_features": th["features"][i, :dim].tolist(), "latent_answer": a["text"],
                    "hard": not answers_match(a["text"], r["answer"]), "answer_nll": float(nll[i])})
    return out
