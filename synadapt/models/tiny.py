"""The tiny reasoner: a word-level tokenizer and a small Qwen2 trained from scratch on the embedded task.

It plays the part DeepSeek-R1-Distill plays in the papers, the "original long-CoT model", and is saved with
``save_pretrained`` so every later stage loads it exactly as it would load a 7B checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from synadapt.data.task import TaskConfig, make_splits, stream_problems
from synadapt.models.lm import PromptFormat

log = logging.getLogger(__name__)

SPECIALS = ["<|pad|>", "<|endoftext|>", "<think>", "</think>"]
SHORT_MARKER = PromptFormat.short_prefill
"""After ``<think>``, asks the tiny reasoner for its compact chain (``short_cot``) instead of the long one: the
``short`` prompt mode's prefill, so training and prompting share one marker."""
# Byte-level symbols of printable ASCII ("Ġ" is the space): any English text tokenizes, one character per token.
CHARS = [chr(c) for c in range(33, 127)] + ["Ġ"]
# System messages (e.g. the "be concise" re-think instruction) are dropped: the toy model never saw any.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<think>{% endif %}"
)


@dataclass
class TinyReasonerConfig:
    """Architecture and training budget of the tiny reasoner (defaults: shared/TOY_NOTES.md, model 128/3)."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512
    train_seconds: float = 3000.0
    """Wall-clock budget; the cosine schedule follows whichever of time and steps runs out first."""
    max_steps: int = 8000
    """Step budget (~25 min on 2 idle cores). Copying is learned by step ~500, the arithmetic and the operator
    lookup of a step only after ~2500; at 4500 steps the operator lookup still failed on 10-20 % of level 3-4
    chains (a '+' read as '-')."""
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    direct_share: float = 0.35
    """Share of training examples in NoThinking format (empty think), so NoThinking is a fair baseline."""
    short_share: float = 0.25
    """Share of training examples in the compact format: ``<think>^`` (the SHORT_MARKER in the unscored prompt) then
    the task's ``short_cot``. The model thereby knows a compact chain (the AdaR1 short model's format and the
    latents' per-slot targets) without ever writing one after a plain ``<think>``."""
    short_pad_max: int = 24
    """Half of the compact examples put 1..short_pad_max commas before the marker (unscored), so the model reads a
    compact chain that is right-aligned in a fixed number of slots, the layout of the latents' targets."""
    anneal_steps: int = 0
    """Optional phase 2 steps: more direct answers at a lower learning rate. Off: 800 steps at share 0.5 raised no
    NoThinking level above chance and cut long-CoT accuracy to 42-75 % (the model learned to stop thinking early)."""
    anneal_direct_share: float = 0.5
    anneal_lr: float = 1e-3
    seed: int = 0
    threads: int = 2


def build_tokenizer() -> Qwen2Tokenizer:
    """Character-level Qwen2 tokenizer (byte-level BPE without merges) with <think>/</think> and a chat template.

    Being a real ``Qwen2Tokenizer`` matters: ``AutoTokenizer`` loads any directory whose config says ``qwen2`` as
    that class, so a tokenizer of another kind would silently change ids or decoding after a reload.
    """
    tok = Qwen2Tokenizer(vocab={w: i for i, w in enumerate(SPECIALS + CHARS)}, merges=[], pad_token="<|pad|>",
                         eos_token="<|endoftext|>", unk_token=None, padding_side="left",
                         extra_special_tokens=["<think>", "</think>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tok, cfg: TinyReasonerConfig) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2ForCausalLM sized by ``cfg``."""
    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def training_text(problem: dict, direct: bool, short: bool = False, pad: int = 0) -> tuple[str, str]:
    """(prompt, completion) in the long-CoT format, NoThinking format when ``direct``, compact when ``short``.

    A direct example's empty think block is part of the PROMPT (unscored), as NoThinking prefills it: scoring its
    ``</think>`` taught the model to close the think block unprompted on 40 % of starts, and greedy long-CoT decoding
    then skipped thinking on 7-15 % of level 5-6 questions."""
    if direct:
        return problem["question"] + "<think></think>", f"{problem['answer']}<|endoftext|>"
    if short:
        return (problem["question"] + "<think>" + "," * pad + SHORT_MARKER,
                f"{problem['short_cot']}</think>{problem['answer']}<|endoftext|>")
    return problem["question"] + "<think>", f"{problem['long_cot']}</think>{problem['answer']}<|endoftext|>"


def encode_batch(tok, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded input ids and labels with the prompt and padding masked out of the loss."""
    rows = [(tok.encode(p, add_special_tokens=False), tok.encode(c, add_special_tokens=False)) for p, c in pairs]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p):n] = torch.tensor(c)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_phase(model, tok, stream, rng: random.Random, steps: int, seconds: float, lr: float, direct_share: float,
              cfg: TinyReasonerConfig, name: str, short_share: float = 0.0) -> dict:
    """One training phase: AdamW, warmup then cosine to 10 % over whichever of ``steps``/``seconds`` binds first."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    start, step, ema, tokens = time.time(), 0, None, 0
    model.train()
    while step < steps and time.time() - start < seconds:
        progress = max((time.time() - start) / seconds, step / steps)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / cfg.warmup_steps) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        draws = [rng.random() for _ in range(cfg.batch_size)]
        pads = [rng.randint(1, cfg.short_pad_max) if rng.random() < 0.5 else 0 for _ in draws]
        batch = encode_batch(tok, [training_text(next(stream), u < direct_share, u > 1 - short_share, k)
                                   for u, k in zip(draws, pads)])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int(batch["attention_mask"].sum())
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            log.info("tiny reasoner %s step %d/%d  loss %.3f  %.0f tok/s  %.0fs", name, step, steps, ema,
                     tokens / (time.time() - start), time.time() - start)
    elapsed = time.time() - start
    return {"steps": step, "seconds": round(elapsed, 1), "final_loss_ema": round(ema or float("nan"), 4),
            "tokens_per_second": round(tokens / max(elapsed, 1e-9))}


def anneal_phase(model, tok, cfg: TinyReasonerConfig, task: TaskConfig) -> dict:
    """Phase 2: more direct-answer examples at a lower learning rate (shared/TOY_NOTES.md, model m3)."""
    splits = make_splits(task)
    held_out = {p["question"] for p in splits["val"] + splits["test"]}
    stream = stream_problems(cfg.seed + 54321, task, held_out)
    return run_phase(model, tok, stream, random.Random(cfg.seed + 1), cfg.anneal_steps, cfg.train_seconds,
                     cfg.anneal_lr, cfg.anneal_direct_share, cfg, "anneal")


def save_reasoner(model, tok, out_dir: str | Path, stats: dict) -> dict:
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def train_tiny_reasoner(out_dir: str | Path, cfg: TinyReasonerConfig, task: TaskConfig) -> dict:
    """Train from scratch on freshly drawn problems (never val/test ones); save model + tokenizer to ``out_dir``."""
    torch.set_num_threads(cfg.threads)
    tok = build_tokenizer()
    model = build_model(tok, cfg)
    splits = make_splits(task)
    held_out = {p["question"] for p in splits["val"] + splits["test"]}
    stream = stream_problems(cfg.seed + 12345, task, held_out)
    main = run_phase(model, tok, stream, random.Random(cfg.seed), cfg.max_steps, cfg.train_seconds, cfg.lr,
                     cfg.direct_share, cfg, "main", cfg.short_share)
    anneal = anneal_phase(model, tok, cfg, task) if cfg.anneal_steps else {}
    return save_reasoner(model, tok, out_dir, {
        "main": main, "anneal": anneal, "train_seconds": round(main["seconds"] + anneal.get("seconds", 0), 1),
        "parameters": sum(p.numel() for p in model.parameters()), "config": asdict(cfg), "task": task_key(task)})


def task_key(task: TaskConfig) -> dict:
    """The task settings a reasoner is keyed by. ``short_steps`` came after the shipped checkpoint and at 0 draws
    the same problems, so it is left out there: the checkpoint (and every cached one) stays valid. The train split's
    size is left out too: the reasoner trains on a fresh stream that excludes only val and test, which are drawn
    before train and do not move with it."""
    key = asdict(task)
    del key["train_per_level"]
    if not key["short_steps"]:
        del key["short_steps"]
    return key


def _trained_for(stats: dict, cfg: TinyReasonerConfig, task: TaskConfig) -> bool:
    """Whether a checkpoint's ``training_stats.json`` says it was trained with these configs."""
    recorded = stats.get("task")
    return (stats.get("config") == asdict(cfg) and isinstance(recorded, dict)
            and task_key(TaskConfig(**recorded)) == task_key(task))


def ensure_tiny_reasoner(out_dir: str | Path, cfg: TinyReasonerConfig, task: TaskConfig) -> dict:
    """Reuse the checkpoint in ``out_dir`` when it was trained with the same configs, else train it."""
    stats_file = Path(out_dir) / "training_stats.json"
    if stats_file.exists():
        stats = json.loads(stats_file.read_text())
        if _trained_for(stats, cfg, task):
            log.info("reusing tiny reasoner in %s", out_dir)
            return stats
    return train_tiny_reasoner(out_dir, cfg, task)


SHIPPED_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-reasoner"
"""The tiny reasoner trained with the default configs, shipped in the repository (3 MB) so a demo starts from it."""


def reasoner_dir(task: TaskConfig, cfg: TinyReasonerConfig) -> Path:
    """Where the tiny reasoner for these configs lives: the shipped checkpoint when it was trained with exactly
    these configs, else ``$SYNADAPT_CACHE`` (default ``~/.cache/synadapt``) keyed by the configs."""
    stats = SHIPPED_DIR / "training_stats.json"
    if stats.exists() and _trained_for(json.loads(stats.read_text()), cfg, task):
        return SHIPPED_DIR
    key = hashlib.sha256(json.dumps([asdict(cfg), task_key(task)], sort_keys=True).encode()).hexdigest()
    cache = Path(os.environ.get("SYNADAPT_CACHE", Path.home() / ".cache" / "synadapt"))
    return cache / f"tiny-reasoner-{key[:12]}"
