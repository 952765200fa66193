"""The tiny reasoner: a word-level tokenizer and a small Qwen2 trained from scratch on the embedded task.

It plays the part DeepSeek-R1-Distill plays in the papers, the "original long-CoT model", and is saved with
``save_pretrained`` so every later stage loads it exactly as it would load a 7B checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from synadapt.data.task import TaskConfig, make_splits, stream_problems

log = logging.getLogger(__name__)

SPECIALS = ["<|pad|>", "<|endoftext|>", "<think>", "</think>"]
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
    train_seconds: float = 290.0
    """Wall-clock budget; the cosine schedule follows whichever of time and steps runs out first."""
    max_steps: int = 100_000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    direct_share: float = 0.3
    """Share of training examples in NoThinking format (empty think), so NoThinking is a fair baseline."""
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


def training_text(problem: dict, direct: bool) -> tuple[str, str]:
    """(prompt, completion) in the long-CoT format, or NoThinking format when ``direct``."""
    return problem["question"] + "<think>", f"{'' if direct else problem['long_cot']}</think>{problem['answer']}<|endoftext|>"


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


def train_tiny_reasoner(out_dir: str | Path, cfg: TinyReasonerConfig, task: TaskConfig) -> dict:
    """Train from scratch on freshly drawn problems (never val/test ones); save model + tokenizer to ``out_dir``."""
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    tok = build_tokenizer()
    model = build_model(tok, cfg)
    splits = make_splits(task)
    held_out = {p["question"] for p in splits["val"] + splits["test"]}
    stream = stream_problems(cfg.seed + 12345, task, held_out)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    start, step, ema, tokens = time.time(), 0, None, 0
    model.train()
    while step < cfg.max_steps:
        elapsed = time.time() - start
        if elapsed >= cfg.train_seconds:
            break
        # Whichever budget binds (time on a busy machine, steps on a fast one) drives the schedule.
        progress = max(elapsed / cfg.train_seconds, step / cfg.max_steps)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = encode_batch(tok, [training_text(next(stream), rng.random() < cfg.direct_share)
                                   for _ in range(cfg.batch_size)])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int(batch["attention_mask"].sum())
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            log.info("tiny reasoner step %d  loss %.3f  %.0f tok/s  %.0fs/%.0fs", step, ema,
                     tokens / (time.time() - start), time.time() - start, cfg.train_seconds)
    seconds = time.time() - start
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    stats = {"steps": step, "train_seconds": round(seconds, 1), "final_loss_ema": round(ema or float("nan"), 4),
             "tokens_per_second": round(tokens / seconds), "parameters": sum(p.numel() for p in model.parameters()),
             "config": asdict(cfg), "task": asdict(task)}
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def ensure_tiny_reasoner(out_dir: str | Path, cfg: TinyReasonerConfig, task: TaskConfig) -> dict:
    """Reuse the checkpoint in ``out_dir`` when it was trained with the same configs, else train it."""
    stats_file = Path(out_dir) / "training_stats.json"
    if stats_file.exists():
        stats = json.loads(stats_file.read_text())
        if stats.get("config") == asdict(cfg) and stats.get("task") == asdict(task):
            log.info("reusing tiny reasoner in %s", out_dir)
            return stats
    return train_tiny_reasoner(out_dir, cfg, task)
