"""AdaR1 training stages with TRL: the short-CoT model (SFT) and the bi-level preference optimisation (DPO).

Each stage is one config dataclass plus a builder that returns a ready TRL trainer (``SFTTrainer`` / ``DPOTrainer``)
for the process it runs in. The builders know nothing about Ray: ``jobs/train_sft.py`` and ``jobs/train_dpo.py``
call them inside Ray Train workers (DeepSpeed ZeRO via ``TrainSettings.deepspeed_stage``), tests call them in a
single process. :func:`export_hf_model` turns a trainer checkpoint into a plain Hugging Face model directory.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from synadapt.adar1.merge import copy_model_files
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig
from synadapt.models.lm import PromptFormat, build_prompt, load_model

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Optimisation and Ray Train settings shared by the SFT and DPO stages (defaults fit the tiny model on CPU)."""

    learning_rate: float = 5e-4
    """Peak learning rate (AdamW)."""
    epochs: float = 3.0
    """Passes over the data."""
    max_steps: int = -1
    """Stop after this many optimizer steps (> 0 overrides ``epochs``)."""
    per_device_batch_size: int = 16
    """Examples per worker per micro-step."""
    grad_accum: int = 1
    """Effective batch = per_device_batch_size × grad_accum × num_workers (METHOD.md: 32 for AdaR1's DPO)."""
    max_length: int = 256
    """Longest tokenized prompt + completion; longer examples are truncated."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming the learning rate up linearly."""
    lr_scheduler: str = "cosine"
    """Transformers scheduler name (cosine, linear, constant, ...)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    logging_steps: int = 10
    """Log (and record in the final metrics) every this many steps."""
    save_steps: int = 200
    """A trainer checkpoint (model + optimizer state) every this many steps, and at the end; each is reported to
    Ray Train, and re-running a job with the same ``run_name`` resumes from the latest."""
    seed: int = 0
    """Seed of data order and initialisation."""
    bf16: bool = False
    """bf16 mixed precision: on for GPUs, off for the tiny model on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves GPU memory on 7B models, slows the tiny one)."""
    deepspeed_stage: int = 2
    """DeepSpeed ZeRO stage (2 or 3, from configs/deepspeed/); 0 trains without DeepSpeed (plain DDP)."""
    lora_r: int = 0
    """LoRA rank; 0 is a full fine-tune (the AdaR1 recipe). With LoRA the adapter is merged into the export."""
    lora_alpha: int = 32
    """LoRA scaling numerator (with lora_r > 0)."""
    lora_dropout: float = 0.05
    """LoRA dropout (with lora_r > 0)."""
    num_workers: int = 2
    """Ray Train workers (one process each; one GPU each when use_gpu)."""
    use_gpu: bool = False
    """One GPU per worker; never on a CPU-only machine (the fit would wait forever)."""
    cpus_per_worker: float = 1.0
    """Ray CPUs reserved per worker."""
    threads_per_worker: int = 1
    """torch threads per worker: keep num_workers × threads within the machine's cores."""
    storage_path: str = ""
    """Ray Train storage for checkpoints (shared storage on a multi-node cluster); empty = ``<output_dir>-ray``,
    beside the model, so the exported directory holds only the model."""
    run_name: str = ""
    """Ray Train run name; empty = the stage name. Same name + storage path = resume."""
    max_failures: int = 2
    """Worker-group restarts (from the latest checkpoint) before the fit fails."""


@dataclass
class SftConfig:
    """AdaR1 short-CoT model: fine-tune the long-CoT model on short-CoT solutions with the same prompt template."""

    model: str = ""
    """The long-CoT model directory or hub id (required)."""
    output_dir: str = "runs/adar1/short_cot"
    """The short-CoT model is written here as a Hugging Face model directory."""
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataSource = field(default_factory=DataSource)
    """Problems with a ``short_cot`` field (rows without one are skipped and counted)."""
    short_format: str = ""
    """The embedded task only: the ``short_cot`` format the short model learns (synadapt.data.task.SHORT_FORMATS);
    empty keeps ``task.short_format``. A field of its own because the task config also keys the shipped reasoner
    and the latent targets, which this choice must not move."""
    short_steps: int = 0
    """The embedded task only: the short chain's thinking budget (``TaskConfig.short_steps``); 0 keeps
    ``task.short_steps``."""
    completion_template: str = "{short_cot}{think_end}{answer}"
    """Target after the prompt; fields: short_cot, answer, think_end. TRL appends the tokenizer's EOS."""
    rehearsal_share: float = 0.0
    """[ours] Share of the problems that also give a rehearsal example: the long model's own chain of thought (the
    problem's ``long_cot``, ``{long_cot}{think_end}{answer}``) with its first token moved into the prompt, so the
    loss teaches the model to go on with a long chain once started but never to start one. Fine-tuned on short
    chains alone the short model forgets the long one, and every merge near it does too; DPO must then learn the
    long chains from the few questions that prefer them. 0 is AdaR1's short model."""
    prompt: PromptFormat = field(default_factory=PromptFormat)
    train: TrainSettings = field(default_factory=TrainSettings)


@dataclass
class DpoConfig:
    """AdaR1 bi-level preference optimisation of the merged model (reference = the merged model itself)."""

    model: str = ""
    """The merged model directory (required); it is also the frozen DPO reference."""
    pairs: str = ""
    """Preference data from jobs.build_preferences (``pairs.jsonl`` with prompt/chosen/rejected; required)."""
    output_dir: str = "runs/adar1/dpo"
    """The DPO-trained model is written here as a Hugging Face model directory."""
    beta: float = 0.1
    """DPO temperature β; METHOD.md: 0.1 for 7B, 0.05 for 1.5B models."""
    loss_type: str = "sigmoid"
    """TRL loss type; AdaR1 uses the standard sigmoid DPO loss, no length normalisation."""
    sft_weight: float = 0.0
    """Weight of an NLL term on the chosen response added to the DPO loss (TRL ``loss_type=[..., "sft"]``, RPO);
    0 is AdaR1's plain DPO. The toy sets 20: with DPO alone the tiny merged model pushed the long chain's first token
    down without raising the short chain's marker and wrote broken hybrids (0.537 accuracy)."""
    precompute_ref: bool = True
    """Compute the reference log-probabilities once, before training (TRL ``precompute_ref_log_probs``), rather than
    a reference forward pass in every step of every epoch: no frozen copy of the model in memory, and one pass
    over the pairs up front instead of one per epoch (the toy's 4 epochs: 263 → 180 s of training). Skipped, with
    a warning, when the ranks span nodes: TRL's rank 0 writes the log-probs to a file every rank reads back, and
    the trainer's scratch dir is on each node's own disk."""
    ref_batch_size: int = 0
    """Pairs per forward pass of the reference precompute (no gradients, so it can exceed the training batch; its
    logits are batch × length × vocabulary floats); 0 = ``train.per_device_batch_size``."""
    train: TrainSettings = field(default_factory=lambda: TrainSettings(learning_rate=5e-5, epochs=2.0,
                                                                       per_device_batch_size=8, grad_accum=2))
    """Defaults for the tiny model. The paper's lr 5e-7 barely moves an 800k-parameter model, so the toy default is
    5e-5; for a 7B model use learning_rate 5e-7, epochs 2-3 and an effective batch of 32 (METHOD.md §2)."""


def sft_examples(problems: list[dict], tok, fmt: PromptFormat | None = None,
                 template: str = SftConfig.completion_template, rehearsal_share: float = 0.0) -> tuple[list[dict], int]:
    """TRL prompt/completion rows: the long-CoT prompt of each question and its short-CoT target, plus, for a
    ``rehearsal_share`` of the problems (chosen by id), the long CoT continued from its first token
    (:attr:`SftConfig.rehearsal_share`). Each row's ``kind`` is ``short`` or ``rehearsal``.

    Returns (rows, skipped) where skipped counts problems without a ``short_cot``.
    """
    if not 0.0 <= rehearsal_share <= 1.0:
        raise ValueError(f"sft rehearsal_share must be in [0, 1], got {rehearsal_share}")
    fmt = fmt or PromptFormat()
    rows, skipped = [], 0
    for p in problems:
        if not p.get("short_cot"):
            skipped += 1
            continue
        prompt = build_prompt(tok, p["question"], "long", fmt)
        completion = template.format(short_cot=p["short_cot"], answer=p["answer"], think_end=fmt.think_end)
        rows.append({"id": p["id"], "kind": "short", "prompt": prompt, "completion": completion})
        if p.get("long_cot") and random.Random(f"rehearsal:{p['id']}").random() < rehearsal_share:
            long = f"{p['long_cot']}{fmt.think_end}{p['answer']}"
            first = tok.decode(tok(long, add_special_tokens=False).input_ids[:1])
            if long.startswith(first) and len(first) < len(long):  # a byte-level piece may not decode to a prefix
                rows.append({"id": f"{p['id']}-rehearsal", "kind": "rehearsal", "prompt": prompt + first,
                             "completion": long[len(first):]})
    if not rows:
        raise ValueError(f"none of the {len(problems)} problems has a short_cot; map the short solution column with "
                         "data.field_map (e.g. {short_cot: short_solution})")
    return rows, skipped


def training_args(args_cls, s: TrainSettings, work_dir: str, deepspeed: dict | None, **extra):
    """``SFTConfig``/``DPOConfig`` from the shared settings; ``deepspeed`` is a DeepSpeed config dict or None.
    ``extra`` adds stage-specific fields and overrides shared ones (padding-free SFT sets ``max_length=None``)."""
    return args_cls(**{
        "output_dir": work_dir, "learning_rate": s.learning_rate, "num_train_epochs": s.epochs,
        "max_steps": s.max_steps, "per_device_train_batch_size": s.per_device_batch_size,
        "gradient_accumulation_steps": s.grad_accum, "max_length": s.max_length, "warmup_steps": s.warmup_ratio,
        "lr_scheduler_type": s.lr_scheduler, "weight_decay": s.weight_decay, "logging_steps": s.logging_steps,
        "save_strategy": "steps", "save_steps": s.save_steps, "save_total_limit": 2, "seed": s.seed, "bf16": s.bf16,
        "gradient_checkpointing": s.gradient_checkpointing, "use_cpu": not s.use_gpu, "deepspeed": deepspeed,
        "report_to": [], "dataloader_num_workers": 0, "disable_tqdm": True, **extra})


def _lora(s: TrainSettings):
    if s.lora_r <= 0:
        return None
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _load_for_training(path: str):
    # float32 master weights; bf16 mixed precision (settings.bf16) is applied by the Trainer / DeepSpeed.
    model, tok = load_model(path, device="cpu", dtype=torch.float32)
    return model.train(), tok


def build_sft_trainer(cfg: SftConfig, rows: list[dict], work_dir: str, deepspeed: dict | None = None):
    """A TRL ``SFTTrainer`` on prompt/completion ``rows`` with the loss on the completion only."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = _load_for_training(cfg.model)
    # Padding-free: a batch is one row of its examples laid end to end, kept apart by position_ids (transformers
    # masks packed sequences for sdpa and flash attention alike), so no compute goes to pad tokens (a third of the
    # toy's). TRL then truncates nothing, and a truncated example would teach a chain without its end: such rows
    # are dropped and counted instead.
    n_tokens = [len(tok(r["prompt"], add_special_tokens=False).input_ids)
                + len(tok(r["completion"], add_special_tokens=False).input_ids) + 1 for r in rows]
    kept = [r for r, n in zip(rows, n_tokens) if n <= cfg.train.max_length]
    if len(kept) < len(rows):
        log.warning("sft: %d of %d examples are longer than train.max_length %d tokens and are left out",
                    len(rows) - len(kept), len(rows), cfg.train.max_length)
    if not kept:
        raise ValueError(f"sft: every example is longer than train.max_length {cfg.train.max_length}")
    args = training_args(SFTConfig, cfg.train, work_dir, deepspeed, completion_only_loss=True, packing=False,
                         padding_free=True, max_length=None)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in kept])
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=_lora(cfg.train))


def build_dpo_trainer(cfg: DpoConfig, rows: list[dict], work_dir: str, deepspeed: dict | None = None):
    """A TRL ``DPOTrainer`` on prompt/chosen/rejected ``rows``; TRL loads the reference copy of ``cfg.model``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = _load_for_training(cfg.model)
    losses = {"loss_type": [cfg.loss_type]}
    if cfg.sft_weight:
        losses = {"loss_type": [cfg.loss_type, "sft"], "loss_weights": [1.0, cfg.sft_weight]}
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    precompute = cfg.precompute_ref
    if precompute and os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        log.warning("dpo: the ranks span nodes, so the reference log-probs are computed in every step "
                    "(precompute_ref needs one disk for all ranks)")
        precompute = False
    if precompute:
        # TRL caches the log-probs beside the dataset's own file, so the rows get a file in work_dir (which the
        # ranks of a node share), one per rank: an in-memory dataset's cache is a per-process temp dir.
        os.makedirs(work_dir, exist_ok=True)
        data = data.flatten_indices(cache_file_name=os.path.join(work_dir, f"pairs-{os.environ.get('RANK', '0')}.arrow"))
    args = training_args(DPOConfig, cfg.train, work_dir, deepspeed, beta=cfg.beta, precompute_ref_log_probs=precompute,
                         precompute_ref_batch_size=cfg.ref_batch_size or None, **losses)
    return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok,
                      peft_config=_lora(cfg.train))


def hf_checkpoint(ray_checkpoint_dir: str | None) -> str | None:
    """The Hugging Face trainer checkpoint inside a checkpoint reported by ``RayTrainReportCallback``."""
    if ray_checkpoint_dir is None:
        return None
    inner = Path(ray_checkpoint_dir) / "checkpoint"
    return str(inner) if inner.is_dir() else None


def export_hf_model(checkpoint_dir: str | Path, out_dir: str | Path, info: dict | None = None) -> str:
    """Copy the model of a trainer checkpoint to ``out_dir`` as a clean Hugging Face model directory.

    Optimizer, scheduler and RNG states stay behind; a LoRA checkpoint is merged into its base model first.
    ``info`` (e.g. final metrics) is written to ``out_dir/train_info.json``.
    """
    src, out = Path(checkpoint_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (src / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(src, dtype=torch.float32).merge_and_unload()
        model.save_pretrained(out)
        copy_model_files(src, out)
    else:
        if not any(src.glob("model*.safetensors")):
            raise ValueError(f"{src} has no safetensors weights to export")
        copy_model_files(src, out, weights=True)
    (out / "train_info.json").write_text(json.dumps(info or {}, indent=2, default=str))
    return str(out)
