"""Stage 1 of SynAdapt: optimise a synthetic continuous thought ``Z_syn`` per question with the LLM frozen.

For a batch of questions, each with its own ``Z`` (B × m × D, one leaf tensor, so Adam treats every question
independently), minimise ``L_ans + λ·L_dcot``:

- ``L_ans``: cross-entropy of the answer after ``[prompt; Z; </think>]``;
- ``L_dcot``: at the ``</think>`` position, SmoothL1 between every layer's hidden state reached through ``Z`` and
  the one reached through the model's own discrete chain of thought, divided by the teacher's per-layer std;
- optionally ``λ_target·MSE(Z, E[targets])``: Z stays near the readable per-slot targets it starts from.

A question converges when greedy decoding from its ``Z`` gives the gold answer (checked after ``min_steps``, so
``L_dcot`` has time to settle: its final value is the signal that separates a right answer from a forced wrong one).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from synadapt.latent.sequence import answer_correct, answer_loss, pad_left, splice

log = logging.getLogger(__name__)


@dataclass
class SynthesisConfig:
    """Stage-1 latent synthesis (METHOD.md §1, stage 1)."""

    m: int = 8
    """Number of latent vectors per question."""
    lambda_dcot: float = 1.0
    """Weight of the end-of-thought hidden-state alignment loss."""
    lr: float = 1e-2
    max_steps: int = 200
    min_steps: int = 30
    """Keep optimising at least this long before a correct answer counts as converged."""
    init: str = "dcot"
    """``dcot``: m mean-pooled chunks of the DCoT's input embeddings; ``random``: N(0, std of the embedding table);
    ``targets``: the embeddings of the question's per-slot targets (``targets`` below), so every Z_syn starts as
    a thought the reader reads (checked in tests: fed exactly, they answer near long-CoT accuracy)."""
    targets: str = "values"
    """Per-slot target text (synadapt.latent.examples.TARGET_FORMATS), right-aligned in the m slots: the same
    readable targets the refiner is trained towards."""
    target_pad: str = ","
    """Token that fills the slots before a short target."""
    target_prefix: str = ""
    """Text put before every target (as the refiner's ``target_prefix``)."""
    lambda_target: float = 0.0
    """Weight of the per-element MSE between Z and the target embeddings: keeps Z_syn aligned with the readable
    targets (without it Z_syn drifts ~0.9 per slot into a question-specific answer-forcing code)."""
    norm_scale: float = 1.5
    """Clip every latent row to this multiple of the embedding table's mean row norm."""
    batch_size: int = 64


def chunk_mean_embeddings(embeds: torch.Tensor, m: int) -> torch.Tensor:
    """m mean-pooled, nearly equal chunks of a (T, D) sequence (chunks repeat when T < m)."""
    t = embeds.shape[0]
    bounds = torch.linspace(0, t, m + 1)
    rows = []
    for k in range(m):
        lo = int(bounds[k])
        hi = max(int(bounds[k + 1]), lo + 1)
        rows.append(embeds[min(lo, t - 1):min(hi, t)].mean(0))
    return torch.stack(rows)


@torch.no_grad()
def teacher_states(model, prompts: list[list[int]], dcots: list[list[int]], think_end_id: int,
                   pad_id: int) -> torch.Tensor:
    """Hidden states of every layer at ``</think>`` after the real DCoT: (layers, B, D)."""
    ids, mask = pad_left([p + d + [think_end_id] for p, d in zip(prompts, dcots)], pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                output_hidden_states=True)
    return torch.stack([h[:, -1] for h in out.hidden_states[1:]]).float()


def dcot_loss(student: torch.Tensor, teacher: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Mean over layers of SmoothL1(student, teacher) / std(teacher); inputs (layers, B, D)."""
    std = teacher.std(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    per = F.smooth_l1_loss(student / std, teacher / std, reduction="none").mean(-1)  # (layers, B)
    return per.mean(0) if per_row else per.mean()


def synthesize_latents(model, tok, batch: list[dict], cfg: SynthesisConfig, think_end: str = "</think>") -> list[dict]:
    """Optimise one ``Z_syn`` per question of ``batch`` (dicts with id, prompt_ids, dcot_ids, answer_ids).

    The model stays frozen (its parameters never receive gradients). Returns one record per question:
    ``{id, z (m×D float32 list), shape, dtype, loss_ans, loss_dcot, steps, converged}``.
    """
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    end_id = tok.convert_tokens_to_ids(think_end)
    prompts = [b["prompt_ids"] for b in batch]
    tails = [[end_id] + b["answer_ids"] for b in batch]
    teacher = teacher_states(model, prompts, [b["dcot_ids"] for b in batch], end_id, tok.pad_token_id)
    table = embed.weight.detach().float()
    max_norm = cfg.norm_scale * table.norm(dim=-1).mean()
    with torch.no_grad():
        target_z = None
        if cfg.init == "targets" or cfg.lambda_target:
            if any(b.get("target_ids") is None for b in batch):
                raise ValueError(f"synthesis init {cfg.init!r} / lambda_target needs per-slot targets "
                                 "(latent_targets or short_cot in the data)")
            if any(b.get("target_truncated") for b in batch):
                longest = max(b["target_truncated"] for b in batch)
                raise ValueError(f"per-slot targets of {longest} tokens do not fit m = {cfg.m} latents "
                                 f"({cfg.targets!r} format): set synthesis.m to at least the longest target")
            target_z = embed(torch.tensor([b["target_ids"] for b in batch], device=model.device)).float()
        if cfg.init == "dcot":
            z0 = torch.stack([chunk_mean_embeddings(embed(torch.tensor(b["dcot_ids"] or [end_id], device=model.device))
                                                    .float(), cfg.m) for b in batch])
        elif cfg.init == "targets":
            z0 = target_z.clone()
        elif cfg.init == "random":
            z0 = torch.randn(len(batch), cfg.m, table.shape[1], device=model.device) * table.std()
        else:
            raise ValueError(f"unknown synthesis init {cfg.init!r}; expected dcot, targets or random")
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.lr)
    done = torch.zeros(len(batch), dtype=torch.bool)
    steps = torch.zeros(len(batch), dtype=torch.long)
    loss_ans, loss_dcot = torch.zeros(len(batch)), torch.zeros(len(batch))
    final_z = z0.clone()
    t0 = time.time()
    for step in range(1, cfg.max_steps + 1):
        s = splice(embed, prompts, z, tails, tok.pad_token_id)
        out = model(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, position_ids=s.position_ids,
                    output_hidden_states=True)
        student = torch.stack([h[:, s.tail_start] for h in out.hidden_states[1:]]).float()
        l_ans = answer_loss(out.logits, s.labels, per_row=True)
        l_dcot = dcot_loss(student, teacher, per_row=True)
        objective = l_ans + cfg.lambda_dcot * l_dcot
        if cfg.lambda_target:
            objective = objective + cfg.lambda_target * ((z - target_z) ** 2).mean((1, 2))
        active = (~done).to(l_ans.device).float()
        # Summed over questions: each question's Z only sees its own loss, whatever the batch size.
        (objective * active).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            norms = z.norm(dim=-1, keepdim=True)
            z.mul_(torch.clamp(max_norm / norms.clamp(min=1e-6), max=1.0))
            live = ~done
            steps[live] = step
            loss_ans[live] = l_ans.detach().cpu()[live]
            loss_dcot[live] = l_dcot.detach().cpu()[live]
            if step == 1:
                init_dcot = l_dcot.detach().cpu()
            newly = answer_correct(out.logits, s.labels).cpu() & live & (step >= cfg.min_steps)
            # The logits above came from the Z before this step's update: that is the Z to keep.
            final_z[newly] = s.inputs_embeds[newly.to(z.device), s.latent_start:s.tail_start].float()
            done |= newly
        if done.all():
            break
    with torch.no_grad():
        final_z[~done] = z.detach()[~done.to(z.device)].float()
    log.info("synthesised %d latents in %.1fs: %d/%d converged", len(batch), time.time() - t0, int(done.sum()),
             len(batch))
    return [{"id": b["id"], "z": final_z[i].cpu().tolist(), "shape": list(final_z[i].shape), "dtype": "float32",
             "loss_ans": float(loss_ans[i]), "loss_dcot": float(loss_dcot[i]), "loss_dcot_init": float(init_dcot[i]),
             "steps": int(steps[i]), "converged": bool(done[i])}
            for i, b in enumerate(batch)]
