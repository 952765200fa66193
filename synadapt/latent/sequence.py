"""Splicing continuous thoughts into a model's input: ``[prompt; Z; </think>; answer]`` as ``inputs_embeds``.

Every latent stage builds the same layout, so it lives here once. Prompts are left-padded so the ``m`` latent
columns line up across the batch; answers are right-padded after ``</think>``; position ids skip the padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Spliced:
    """A batch laid out as ``[pad… prompt | Z (m) | tail… pad]`` (tail = ``</think>`` + answer, may be empty)."""

    inputs_embeds: torch.Tensor  # (B, T, D)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    latent_start: int  # column of the first latent
    m: int
    labels: torch.Tensor | None  # (B, T) next-token targets aligned to logits, -100 where unscored

    @property
    def tail_start(self) -> int:
        return self.latent_start + self.m


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded id matrix and mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


def splice(embed: torch.nn.Module, prompts: list[list[int]], z: torch.Tensor, tails: list[list[int]] | None,
           pad_id: int, score_tail_from: int = 1) -> Spliced:
    """Build inputs for ``[prompt; z; tail]``.

    ``tails[i]`` usually is ``[</think>] + answer ids``; its tokens from index ``score_tail_from`` on are the
    labels (so the answer is scored, not the marker). ``z`` is (B, m, D) and may require grad.
    """
    b, m, _ = z.shape
    p_ids, p_mask = pad_left(prompts, pad_id)
    tails = tails or [[] for _ in range(b)]
    t_width = max(len(t) for t in tails)
    t_ids = torch.full((b, t_width), pad_id, dtype=torch.long)
    t_mask = torch.zeros((b, t_width), dtype=torch.long)
    for i, t in enumerate(tails):
        if t:
            t_ids[i, :len(t)] = torch.tensor(t)
            t_mask[i, :len(t)] = 1
    device = z.device
    p_ids, p_mask, t_ids, t_mask = (x.to(device) for x in (p_ids, p_mask, t_ids, t_mask))
    embeds = torch.cat([embed(p_ids), z.to(embed.weight.dtype), embed(t_ids)], dim=1)
    mask = torch.cat([p_mask, torch.ones((b, m), dtype=torch.long, device=device), t_mask], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    labels = None
    if t_width:
        labels = torch.full(mask.shape, -100, dtype=torch.long, device=device)
        start = p_ids.shape[1] + m
        for i, t in enumerate(tails):
            # logits at column c predict the token at c+1
            for j in range(score_tail_from, len(t)):
                labels[i, start + j - 1] = t[j]
    return Spliced(embeds, mask, positions, p_ids.shape[1], m, labels)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Cross-entropy of the scored tail tokens; mean over tokens, or one mean per row."""
    flat = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                             reduction="none")
    counts = (labels != -100).sum(1).clamp(min=1)
    rows = flat.sum(1) / counts
    return rows if per_row else rows.mean()


def answer_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: does greedy (teacher-forced argmax) reproduce every scored tail token? Equals greedy decoding."""
    hit = (logits.argmax(-1) == labels) | (labels == -100)
    return hit.all(1)
