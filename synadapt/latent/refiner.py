"""Stage 2 of SynAdapt: train the LLM to produce continuous thoughts by iterative refinement.

The refiner is the base model plus a LoRA adapter (or, for small models, a fully fine-tuned copy) and a small
projection ``P`` (LayerNorm → Linear → GELU → Linear) from last-layer hidden states back to input-embedding space.

- ``parallel`` mode (the paper): the draft ``Z⁰`` is ``m`` copies of one token's embedding; pass ``k`` runs the
  adapted model once over ``[prompt; Z^(k-1)]`` and sets ``Z^(k) = P(h_last[latent positions])``. Passes act like
  Jacobi iterations over a sequential chain, so ``n`` should be at least the chain length. The prompt's keys and
  values are computed once and reused by every pass (exactly the same result, a fraction of the cost).
- ``sequential`` mode (Coconut-style): latent ``j`` is ``P`` of the hidden state at the previous position, one
  position at a time with the KV cache (prompt + m positions, against prompt + n·m in parallel mode).

The answer is always read by the frozen base model (adapter disabled), so one set of base weights serves both roles.
Losses: ``L'_ans`` (answer CE through the frozen base) + ``λ_align·MSE(Z, Z_syn)`` + ``λ_step·MSE(Z_j, E[t_j])``
where ``t_j`` are optional per-latent target tokens (intermediate results; our extension for dense supervision).
"""
from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from synadapt.latent.sequence import answer_loss, pad_left, splice

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class RefinerConfig:
    """Stage-2 refinement (METHOD.md §1, stage 2)."""

    m: int = 8
    """Latent length (must match the Z_syn it is aligned to)."""
    n_passes: int = 4
    """Parallel refinement passes (ignored in sequential mode)."""
    mode: str = "parallel"
    """``parallel`` (paper) or ``sequential`` (one latent per position, Coconut-style)."""
    draft_token: str = "."
    """Token whose embedding, repeated m times, is the draft Z⁰."""
    adapter: str = "lora"
    """``lora`` (paper) or ``full`` (fine-tune a copy of the model; sensible only for small models)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lambda_align: float = 1.0
    """Weight of MSE(Z^(n), Z_syn)."""
    lambda_step: float = 0.0
    """Weight of the per-latent target loss (0 = the paper's recipe)."""
    lr: float = 2e-4
    batch_size: int = 32
    train_seconds: float = 300.0
    max_steps: int = 100_000


class Projection(nn.Module):
    """LayerNorm → Linear → GELU → Linear, hidden space → input-embedding space."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class Refiner(nn.Module):
    """Produces ``Z`` for a batch of prompts and reads answers from it with the frozen base model."""

    def __init__(self, base_model, cfg: RefinerConfig, draft_id: int, adapted=None, projection=None):
        super().__init__()
        self.cfg = cfg
        self.draft_id = draft_id
        if adapted is None:
            # Before the adapter exists: freezing later would also freeze LoRA weights injected into the base.
            base_model.requires_grad_(False)
            if cfg.adapter == "lora":
                from peft import LoraConfig, get_peft_model

                adapted = get_peft_model(base_model, LoraConfig(
                    r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=cfg.target_modules, task_type="CAUSAL_LM"))
            elif cfg.adapter == "full":
                adapted = copy.deepcopy(base_model).requires_grad_(True)
            else:
                raise ValueError(f"unknown refiner adapter {cfg.adapter!r}; expected lora or full")
        self.adapted = adapted
        self.base = base_model
        dim = base_model.config.hidden_size
        self.proj = projection or Projection(dim).to(base_model.device, dtype=torch.float32)

    @property
    def embed(self):
        return self.base.get_input_embeddings()

    @contextlib.contextmanager
    def frozen_base(self):
        """The model that reads answers: the base weights with any adapter switched off."""
        if self.cfg.adapter == "lora":
            with self.adapted.disable_adapter():
                yield self.adapted
        else:
            yield self.base

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h.float()).to(self.embed.weight.dtype)

    def refine(self, prompts: list[list[int]], zero: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Latents for ``prompts`` (each ending with the think marker).

        Returns ``(Z, features, forward_positions_per_question)``; ``features`` (B, 2D) are the last-layer hidden
        states of the final pass mean-pooled over question tokens and over latent positions (the classifier's input).
        ``zero`` replaces the latents by zeros (the control that shows whether they carry content).
        """
        if self.cfg.mode == "parallel":
            z, feats, cost = self._refine_parallel(prompts)
        elif self.cfg.mode == "sequential":
            z, feats, cost = self._refine_sequential(prompts)
        else:
            raise ValueError(f"unknown refiner mode {self.cfg.mode!r}; expected parallel or sequential")
        return (torch.zeros_like(z) if zero else z), feats, cost

    def _features(self, h: torch.Tensor, prompt_mask: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        mask = prompt_mask.unsqueeze(-1).to(h.dtype)
        question = (h[:, :prompt_mask.shape[1]] * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.cat([question, latent.mean(1)], dim=-1).float()

    def _encode_prompts(self, prompts):
        """One adapted pass over the left-padded prompts: (mask, positions, KV cache, last hidden states)."""
        ids, mask = pad_left(prompts, self.base.config.pad_token_id or 0)
        ids, mask = ids.to(self.base.device), mask.to(self.base.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.adapted(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           output_hidden_states=True)
        return mask, positions, out.past_key_values, out.hidden_states[-1]

    def _refine_parallel(self, prompts):
        # The prompt never attends to the latents (causal), so its keys/values are the same in every pass: encode it
        # once and run each pass over the m latent columns only (P + n·m positions instead of n·(P + m)).
        b, m = len(prompts), self.cfg.m
        mask, positions, cache, h_prompt = self._encode_prompts(prompts)
        prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]
        mask = torch.cat([mask, torch.ones((b, m), dtype=mask.dtype, device=mask.device)], dim=1)
        latent_positions = positions[:, -1:] + 1 + torch.arange(m, device=mask.device)
        z = self.embed(torch.tensor([self.draft_id], device=self.base.device)).expand(b, m, -1)
        for _ in range(self.cfg.n_passes):
            latent_h = self.adapted(inputs_embeds=z, attention_mask=mask, position_ids=latent_positions,
                                    past_key_values=DynamicCache(prompt_kv), use_cache=True,
                                    output_hidden_states=True).hidden_states[-1]
            z = self._project(latent_h)
        prompt_mask = mask[:, :-m]
        cost = prompt_mask.sum(1) + self.cfg.n_passes * m
        return z, self._features(h_prompt, prompt_mask, latent_h), cost

    def _refine_sequential(self, prompts):
        mask, positions, cache, h_prompt = self._encode_prompts(prompts)
        prompt_width = mask.shape[1]
        last, zs, hs = h_prompt[:, -1:], [], []
        for j in range(self.cfg.m):
            z = self._project(last)
            zs.append(z)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.adapted(inputs_embeds=z, attention_mask=mask, position_ids=positions, past_key_values=cache,
                               use_cache=True, output_hidden_states=True)
            cache, last = out.past_key_values, out.hidden_states[-1]
            hs.append(last)
        cost = mask.sum(1)
        latent_h = torch.cat(hs, dim=1)
        return torch.cat(zs, dim=1), self._features(h_prompt, mask[:, :prompt_width], latent_h), cost

    def answer_logits(self, prompts: list[list[int]], z: torch.Tensor, tails: list[list[int]]):
        """Logits of the frozen base over ``[prompt; Z; tail]`` and the matching labels."""
        s = splice(self.embed, prompts, z, tails, self.base.config.pad_token_id or 0)
        with self.frozen_base() as base:
            logits = base(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                          position_ids=s.position_ids).logits
        return logits, s.labels

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Training objective on a batch with ``prompt_ids``, ``tail_ids`` ([</think>] + answer) and optionally
        ``z_syn`` (B, m, D) and ``target_ids`` (B, m) per-latent target tokens."""
        z, _, _ = self.refine(batch["prompt_ids"])
        logits, labels = self.answer_logits(batch["prompt_ids"], z, batch["tail_ids"])
        l_ans = answer_loss(logits, labels)
        total, parts = l_ans, {"ans": l_ans.item()}
        if self.cfg.lambda_align and batch.get("z_syn") is not None:
            l_align = ((z.float() - batch["z_syn"].to(z.device)) ** 2).sum(-1).mean()
            total = total + self.cfg.lambda_align * l_align
            parts["align"] = l_align.item()
        if self.cfg.lambda_step and batch.get("target_ids") is not None:
            target = self.embed.weight[batch["target_ids"].to(z.device)].detach().float()
            l_step = ((z.float() - target) ** 2).sum(-1).mean()
            total = total + self.cfg.lambda_step * l_step
            parts["step"] = l_step.item()
        return total, parts

    def forward(self, batch: dict) -> torch.Tensor:
        """The training loss, so a DeepSpeed engine wrapping the refiner can be called on a batch."""
        return self.loss(batch)[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in list(self.adapted.parameters()) + list(self.proj.parameters()) if p.requires_grad]

    def save(self, out_dir: str | Path) -> None:
        """Adapter (PEFT dir, or a full HF model dir) + projection.safetensors + refiner.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.adapted.save_pretrained(out / ("adapter" if self.cfg.adapter == "lora" else "model"))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.proj.state_dict().items()},
                  out / "projection.safetensors")
        (out / "refiner.json").write_text(json.dumps({"config": asdict(self.cfg), "draft_id": self.draft_id},
                                                     indent=2))

    @classmethod
    def load(cls, base_model, in_dir: str | Path, trainable: bool = False) -> "Refiner":
        """Rebuild a saved refiner on top of ``base_model`` (weights only: safetensors, no pickles);
        ``trainable`` re-enables gradients on the adapter and projection (resuming training)."""
        src = Path(in_dir)
        meta = json.loads((src / "refiner.json").read_text())
        cfg = RefinerConfig(**meta["config"])
        if cfg.adapter == "lora":
            from peft import PeftModel

            adapted = PeftModel.from_pretrained(base_model, src / "adapter", is_trainable=trainable)
        else:
            from transformers import AutoModelForCausalLM

            adapted = AutoModelForCausalLM.from_pretrained(src / "model", dtype=base_model.dtype).to(base_model.device)
            adapted.requires_grad_(trainable)
            base_model.requires_grad_(False)
        proj = Projection(base_model.config.hidden_size)
        proj.load_state_dict(load_file(src / "projection.safetensors"))
        proj.requires_grad_(trainable)
        return cls(base_model, cfg, meta["draft_id"], adapted=adapted.eval(), projection=proj.to(base_model.device))


def train_refiner(refiner: Refiner, examples: list[dict], cfg: RefinerConfig, start_step: int = 0,
                  engine=None, on_step=None, log_every: int = 50) -> dict:
    """Train for ``cfg.train_seconds`` (or ``cfg.max_steps``) on ``examples`` (see :mod:`synadapt.latent.examples`).

    Without ``engine`` a plain AdamW over the trainable parameters is used; with a DeepSpeed engine wrapping the
    refiner, its backward/step are. ``on_step(step, parts)`` is called after every step (checkpointing hooks).
    """
    import logging
    import time

    from synadapt.latent.examples import batches, collate

    log = logging.getLogger(__name__)
    refiner.train()
    device = refiner.base.device
    opt = None if engine else torch.optim.AdamW(refiner.trainable_parameters(), lr=cfg.lr)
    stream = batches(examples, cfg.batch_size, seed=start_step)
    t0, step, ema = time.time(), start_step, {}
    while step < cfg.max_steps and time.time() - t0 < cfg.train_seconds:
        batch = collate(next(stream), device)
        if engine:
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
            parts = {"total": loss.item()}
        else:
            loss, parts = refiner.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(refiner.trainable_parameters(), 1.0)
            opt.step()
        step += 1
        ema = {k: v if k not in ema else 0.95 * ema[k] + 0.05 * v for k, v in parts.items()}
        if on_step:
            on_step(step, parts)
        if step % log_every == 0:
            log.info("refiner step %d  %s  %.1f steps/s", step, "  ".join(f"{k} {v:.3f}" for k, v in ema.items()),
                     (step - start_step) / (time.time() - t0))
    refiner.eval()
    return {"steps": step, "seconds": round(time.time() - t0, 1), **{f"loss_{k}": round(v, 4) for k, v in ema.items()}}
