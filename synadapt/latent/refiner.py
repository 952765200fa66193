"""Stage 2 of SynAdapt: train the LLM to produce continuous thoughts by iterative refinement.

The refiner is the base model plus a LoRA adapter (or, for small models, a fully fine-tuned copy) and a small
projection ``P`` (LayerNorm → Linear → GELU → Linear) from last-layer hidden states back to input-embedding space.

- ``parallel`` mode (the paper): the draft ``Z⁰`` is ``m`` copies of one token's embedding; pass ``k`` runs the
  adapted model once over ``[prompt; Z^(k-1)]`` and sets ``Z^(k) = P(h_last[latent positions])``. Passes act like
  Jacobi iterations over a sequential chain, so ``n`` should be at least the chain length. The prompt's keys and
  values are computed once and reused by every pass (exactly the same result, a fraction of the cost).
  With ``slot_source: previous`` slot ``j`` is ``P`` of the hidden state one position earlier (slot ``j-1``, or
  the think marker for slot 0): a causal LM's state at position i predicts the token at i+1.
- ``sequential`` mode (Coconut-style): latent ``j`` is ``P`` of the hidden state at the previous position, one
  position at a time with the KV cache (prompt + m positions, against prompt + n·m in parallel mode).
- ``pause``: every latent is one learned vector (the trained-pause control: same training, no content).

``P``'s output can be rescaled to the token-embedding norm (``latent_norm``), where a reader reads its inputs.
The answer is read by ``reader``: the frozen base (adapter disabled) or the adapted model.
Losses (each returned by :meth:`Refiner.loss` under its own name, the total under ``loss``): ``ans`` (answer CE
through the reader) + ``λ_ce·ce`` (each slot decoded through the tied LM head, CE against its target token
``t_j``; under ``ce_schedule: jacobi`` every pass from the one where slot j's chain step can be known) +
``λ_step·step`` (per-element MSE of the final Z_j to E[t_j]) + ``λ_align·align`` (per-element MSE to Z_syn).
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

LATENT_CONTROLS = ("refined", "zeroed", "shuffled")
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
    slot_source: str = "same"
    """Parallel mode: slot j is projected from the hidden state at slot j (``same``, the paper) or at the position
    before it (``previous``: what a causal LM's state there predicts is the token at slot j)."""
    latent_norm: bool = False
    """Rescale every projected latent to the mean norm of the token-embedding table (the reader's input scale)."""
    projection: str = "mlp"
    """Hidden state → latent: ``mlp`` (P below, the paper) or ``soft_tokens`` (the probability-weighted mean of the
    token embeddings under the LM head's distribution at ``soft_temperature``, as CoT2 / soft thinking: a latent is
    a superposition of tokens the reader knows, and the adapted model starts from its own next-token prediction)
    or ``hard_tokens`` (the embedding of the LM head's top token, with the soft mixture's gradient passed straight
    through, as Altabaa et al. re-embed the argmax: each latent is then a token embedding)."""
    soft_temperature: float = 1.0
    teacher_forcing: float = 0.0
    """Sequential mode: share of training steps whose latent inputs are the target embeddings (one causal pass, as
    in LM training) instead of the refiner's own latents; the rest run free, as at inference."""
    reader: str = "base"
    """Who reads the answer after the latents: ``base`` (adapter off, the paper) or ``adapted`` (adapter on). The
    re-think route always uses the original weights."""
    pause: bool = False
    """Trained-pause control: every latent is one learned vector (no refinement passes)."""
    targets: str = "values"
    """Per-slot target text (synadapt.latent.examples.TARGET_FORMATS): ``values``, ``var_values`` or ``long_cot``;
    right-aligned in the m slots, so m must be at least its longest token count."""
    target_pad: str = ","
    """Token that fills the slots before a short target."""
    target_prefix: str = ""
    """Text put before every target (the tiny reasoner's short-CoT marker ``^``: its reader reads the compact
    chain after it); counted in m."""
    target_align: str = "right"
    """``right``: pads before the target, so it ends right before ``</think>``; ``left``: the target right after the
    think marker (as the model writes its chain) and the pads after it."""
    lambda_align: float = 1.0
    """Weight of the per-element MSE(Z^(n), Z_syn)."""
    lambda_step: float = 0.0
    """Weight of the per-element MSE(Z^(n)_j, E[t_j]) to the per-slot target embeddings (0 = the paper's recipe)."""
    lambda_ce: float = 0.0
    """Weight of the per-slot cross-entropy of lm_head(Z_j) against t_j."""
    ce_temperature: float = 0.1
    """lm_head(Z_j) is divided by this: at embedding norm the raw logits are too flat for a confident CE."""
    ce_schedule: str = "jacobi"
    """``jacobi``: slot j is scored at every pass from pass (its chain step + 1) on (pass k can have moved a result
    k steps along the chain; the last pass scores every slot); ``final``: the last pass only."""
    lr: float = 2e-4
    batch_size: int = 32
    train_seconds: float = 300.0
    max_steps: int = 100_000


class Projection(nn.Module):
    """LayerNorm → Linear → GELU → Linear, hidden space → input-embedding space (+ the pause vector, if any)."""

    def __init__(self, dim: int, pause: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.pause = nn.Parameter(torch.zeros(dim)) if pause else None

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
        for name, allowed in (("mode", ("parallel", "sequential")), ("slot_source", ("same", "previous")),
                              ("projection", ("mlp", "soft_tokens", "hard_tokens")),
                              ("reader", ("base", "adapted")), ("ce_schedule", ("jacobi", "final"))):
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"unknown refiner {name} {getattr(cfg, name)!r}; expected one of {allowed}")
        self.adapted = adapted
        self.base = base_model
        dim = base_model.config.hidden_size
        self.proj = projection or Projection(dim, cfg.pause).to(base_model.device, dtype=torch.float32)
        if projection is None and cfg.pause:
            with torch.no_grad():
                self.proj.pause.copy_(self.embed.weight[draft_id].float())
        self.embed_norm = float(self.embed.weight.detach().float().norm(dim=-1).mean())

    @property
    def embed(self):
        return self.base.get_input_embeddings()

    @contextlib.contextmanager
    def frozen_base(self):
        """The original weights: the base with any adapter switched off (re-thinking, NoThinking)."""
        if self.cfg.adapter == "lora":
            with self.adapted.disable_adapter():
                yield self.adapted
        else:
            yield self.base

    def reader(self):
        """Context giving the model that reads answers after the latents (``cfg.reader``)."""
        return contextlib.nullcontext(self.adapted) if self.cfg.reader == "adapted" else self.frozen_base()

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        if self.cfg.projection in ("soft_tokens", "hard_tokens"):
            # h is the final-norm hidden state, so the tied head gives the model's own next-token logits; they are
            # kept (per pass) for the per-slot CE, which is then the ordinary LM loss on the model's own inputs.
            logits = self.base.get_output_embeddings()(h).float() / self.cfg.soft_temperature
            self._soft_logits.append(logits)
            soft = torch.softmax(logits, dim=-1) @ self.embed.weight.float()
            if self.cfg.projection == "hard_tokens":
                soft = self.embed.weight[logits.argmax(-1)].float() + soft - soft.detach()
            return soft.to(self.embed.weight.dtype)
        z = self.proj(h.float())
        if self.cfg.latent_norm:
            z = z * (self.embed_norm / z.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return z.to(self.embed.weight.dtype)

    def refine(self, prompts: list[list[int]], control: str = "refined") -> tuple[torch.Tensor, torch.Tensor, int]:
        """Latents for ``prompts`` (each ending with the think marker).

        Returns ``(Z, features, forward_positions_per_question)``; ``features`` (B, 2D) are the last-layer hidden
        states of the final pass mean-pooled over question tokens and over latent positions (the classifier's input).
        ``control`` (LATENT_CONTROLS): ``zeroed`` replaces the latents by zeros, ``shuffled`` gives each question the
        latents of the next question of the batch (the controls that show whether the latents carry content).
        """
        if control not in LATENT_CONTROLS:
            raise ValueError(f"unknown latent control {control!r}; expected one of {LATENT_CONTROLS}")
        passes, feats, cost = self.refine_passes(prompts)
        z = passes[-1]
        if control == "zeroed":
            z = torch.zeros_like(z)
        elif control == "shuffled":
            z = z.roll(1, dims=0)
        return z, feats, cost

    def refine_passes(self, prompts: list[list[int]], teacher: torch.Tensor | None = None
                      ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Like :meth:`refine`, with the latents after every parallel pass (one entry otherwise). ``teacher``
        (B, m target ids, sequential mode): slot j's input is the embedding of target j-1, not the latent made."""
        self._soft_logits = []
        if teacher is not None:
            return self._teacher_forced(prompts, teacher)
        if self.cfg.pause:
            return self._pause(prompts)
        if self.cfg.mode == "parallel":
            return self._refine_parallel(prompts)
        return self._refine_sequential(prompts)

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

    def _pause(self, prompts):
        b, m = len(prompts), self.cfg.m
        mask, positions, cache, h_prompt = self._encode_prompts(prompts)
        z = self.proj.pause.to(self.embed.weight.dtype).expand(b, m, -1)
        # One pass over the pause latents only for the classifier's features; it is not part of the method.
        latent_h = self.adapted(inputs_embeds=z, attention_mask=torch.cat([mask, mask.new_ones((b, m))], dim=1),
                                position_ids=positions[:, -1:] + 1 + torch.arange(m, device=mask.device),
                                past_key_values=cache, output_hidden_states=True).hidden_states[-1]
        return [z], self._features(h_prompt, mask, latent_h), mask.sum(1)

    def _refine_parallel(self, prompts):
        # The prompt never attends to the latents (causal), so its keys/values are the same in every pass: encode it
        # once and run each pass over the m latent columns only (P + n·m positions instead of n·(P + m)).
        b, m = len(prompts), self.cfg.m
        mask, positions, cache, h_prompt = self._encode_prompts(prompts)
        prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]
        mask = torch.cat([mask, torch.ones((b, m), dtype=mask.dtype, device=mask.device)], dim=1)
        latent_positions = positions[:, -1:] + 1 + torch.arange(m, device=mask.device)
        z = self.embed(torch.tensor([self.draft_id], device=self.base.device)).expand(b, m, -1)
        passes = []
        for _ in range(self.cfg.n_passes):
            latent_h = self.adapted(inputs_embeds=z, attention_mask=mask, position_ids=latent_positions,
                                    past_key_values=DynamicCache(prompt_kv), use_cache=True,
                                    output_hidden_states=True).hidden_states[-1]
            source = latent_h if self.cfg.slot_source == "same" else torch.cat([h_prompt[:, -1:], latent_h[:, :-1]], 1)
            z = self._project(source)
            passes.append(z)
        prompt_mask = mask[:, :-m]
        cost = prompt_mask.sum(1) + self.cfg.n_passes * m
        return passes, self._features(h_prompt, prompt_mask, latent_h), cost

    def _teacher_forced(self, prompts, teacher):
        # Slot j is projected from the state one position earlier, whose input is target j-1: one causal pass.
        b, m = len(prompts), self.cfg.m
        mask, positions, cache, h_prompt = self._encode_prompts(prompts)
        inputs = self.embed(teacher.to(mask.device))  # the last target's input feeds no slot: it is the reader's
        full = torch.cat([mask, mask.new_ones((b, m))], dim=1)
        latent_h = self.adapted(inputs_embeds=inputs, attention_mask=full,
                                position_ids=positions[:, -1:] + 1 + torch.arange(m, device=mask.device),
                                past_key_values=cache, output_hidden_states=True).hidden_states[-1]
        z = self._project(torch.cat([h_prompt[:, -1:], latent_h[:, :-1]], 1))
        return [z], self._features(h_prompt, mask, latent_h), full.sum(1)

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
        return [torch.cat(zs, dim=1)], self._features(h_prompt, mask[:, :prompt_width], latent_h), cost

    def answer_logits(self, prompts: list[list[int]], z: torch.Tensor, tails: list[list[int]]):
        """Logits of the reader over ``[prompt; Z; tail]`` and the matching labels."""
        s = splice(self.embed, prompts, z, tails, self.base.config.pad_token_id or 0)
        with self.reader() as base:
            logits = base(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                          position_ids=s.position_ids).logits
        return logits, s.labels

    def slot_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Each latent decoded through the tied LM head, sharpened by ``ce_temperature``: (..., m, vocab)."""
        return self.base.get_output_embeddings()(z.to(self.embed.weight.dtype)).float() / self.cfg.ce_temperature

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Training objective on a batch with ``prompt_ids``, ``tail_ids`` ([</think>] + answer) and optionally
        ``z_syn`` (B, m, D), ``target_ids`` and ``target_steps`` (B, m): per-slot target tokens and their chain step.

        Returns every term by name (detached, for logging) and their weighted sum under ``loss`` (with gradient).
        """
        teacher = None
        if (self.training and self.cfg.mode == "sequential" and self.cfg.teacher_forcing
                and batch.get("target_ids") is not None and torch.rand(()) < self.cfg.teacher_forcing):
            teacher = batch["target_ids"]
        passes, _, _ = self.refine_passes(batch["prompt_ids"], teacher)
        z = passes[-1]
        if self._soft_logits:  # soft/hard tokens: the slot logits are the model's own (sequential: one per slot)
            slot_logits = [torch.cat(self._soft_logits, 1)] if len(passes) == 1 else self._soft_logits
        else:
            slot_logits = [self.slot_logits(zk) for zk in passes]
        logits, labels = self.answer_logits(batch["prompt_ids"], z, batch["tail_ids"])
        total = answer_loss(logits, labels)
        terms = {"ans": total}
        targets = batch.get("target_ids")
        if targets is not None and batch.get("target_truncated") and (self.cfg.lambda_ce or self.cfg.lambda_step):
            raise ValueError(f"per-slot targets of {batch['target_truncated']} tokens do not fit m = {self.cfg.m} "
                             f"latents ({self.cfg.targets!r} format): set refiner.m to at least the longest target")
        if self.cfg.lambda_align and batch.get("z_syn") is not None:
            terms["align"] = ((z.float() - batch["z_syn"].to(z.device)) ** 2).mean()
            total = total + self.cfg.lambda_align * terms["align"]
        if self.cfg.lambda_step and targets is not None:
            target = self.embed.weight[targets.to(z.device)].detach().float()
            terms["step"] = ((z.float() - target) ** 2).mean()
            total = total + self.cfg.lambda_step * terms["step"]
        if self.cfg.lambda_ce and targets is not None and not self.cfg.pause:
            targets = targets.to(z.device)
            steps = batch["target_steps"].to(z.device)
            ce, weight = 0.0, 0.0
            for k, zk in enumerate(passes):
                last = k == len(passes) - 1
                if self.cfg.ce_schedule == "final" and not last:
                    continue
                scored = torch.ones_like(steps, dtype=torch.bool) if last else steps <= k
                per_slot = torch.nn.functional.cross_entropy(slot_logits[k].transpose(1, 2), targets,
                                                             reduction="none")
                ce = ce + (per_slot * scored).sum()
                weight = weight + scored.sum()
            terms["ce"] = ce / weight
            with torch.no_grad():
                terms["slot_acc"] = (slot_logits[-1].argmax(-1) == targets).float().mean()
            total = total + self.cfg.lambda_ce * terms["ce"]
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """The training terms (see :meth:`loss`), so a DeepSpeed engine wrapping the refiner can be called on a
        batch; backward on ``["loss"]``."""
        return self.loss(batch)

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
    def load(cls, base_model, in_dir: str | Path, trainable: bool = False) -> Refiner:
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
        proj = Projection(base_model.config.hidden_size, cfg.pause)
        proj.load_state_dict(load_file(src / "projection.safetensors"))
        proj.requires_grad_(trainable)
        return cls(base_model, cfg, meta["draft_id"], adapted=adapted.eval(), projection=proj.to(base_model.device))


def train_refiner(refiner: Refiner, examples: list[dict], cfg: RefinerConfig, start_step: int = 0,
                  start_seconds: float = 0.0, engine=None, optimizer=None, on_checkpoint=None,
                  checkpoint_every: int = 0, log_every: int = 50) -> dict:
    """Train on ``examples`` (see :mod:`synadapt.latent.examples`) until ``cfg.max_steps`` steps or
    ``cfg.train_seconds`` seconds of training; returns the stats below.

    ``engine`` runs each step's forward: None (the refiner itself), a ``DistributedDataParallel`` wrapping it, or
    a DeepSpeed engine, which also runs backward and the optimizer step (ZeRO, clipping). The first two step
    ``optimizer`` (default: a new AdamW over the trainable parameters) with gradients clipped to norm 1.
    ``start_step``/``start_seconds`` continue a resumed run: the budget counts from the run's start and the data
    order continues where it stopped, so with the optimizer state restored a resume follows the uninterrupted run.

    In a torch.distributed group, rank 0's clock decides when the time is up and every step broadcasts that
    decision: ranks that stopped on their own clocks would make different numbers of collective calls (Ray Train
    reports, checkpoints) and wait for each other forever. ``on_checkpoint(stats)`` runs every ``checkpoint_every``
    steps, on every rank at the same steps.

    Stats: ``steps``; ``seconds`` (of training, earlier attempts included); ``loss`` and ``loss_<name>`` for every
    term :meth:`Refiner.loss` returns (moving averages); ``optimizer_steps`` (the optimizer's own step count: it
    continues across a resume only if the optimizer state was restored); in a group, at the end, ``weight_spread``
    (the largest difference of any trainable weight between ranks: 0 when the ranks share one optimisation).
    """
    import itertools
    import logging
    import time

    import torch.distributed as dist

    from synadapt.latent.examples import batches, collate

    log = logging.getLogger(__name__)
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    deepspeed = engine is not None and hasattr(engine, "backward")
    refiner.train()
    device = refiner.base.device
    opt = engine.optimizer if deepspeed else optimizer or torch.optim.AdamW(refiner.trainable_parameters(), lr=cfg.lr)
    stream = itertools.islice(batches(examples, cfg.batch_size), start_step, None)
    t0, step, ema = time.time(), start_step, {}

    def seconds() -> float:
        return start_seconds + time.time() - t0

    def time_is_up() -> bool:
        up = torch.tensor([float(seconds() >= cfg.train_seconds)], device=device)
        if group:
            dist.broadcast(up, src=0)
        return bool(up.item())

    def stats() -> dict:
        terms = {("loss" if k == "loss" else f"loss_{k}"): round(v, 4) for k, v in ema.items()}
        return {"steps": step, "seconds": round(seconds(), 1), **terms, "optimizer_steps": optimizer_steps(opt)}

    while step < cfg.max_steps and not time_is_up():
        batch = collate(next(stream), device)
        terms = (refiner if engine is None else engine)(batch)
        loss = terms["loss"]
        if deepspeed:
            engine.backward(loss)
            engine.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(refiner.trainable_parameters(), 1.0)
            opt.step()
        step += 1
        values = {k: v.detach().item() for k, v in terms.items()}
        ema = {k: v if k not in ema else 0.95 * ema[k] + 0.05 * v for k, v in values.items()}
        if on_checkpoint and checkpoint_every and step % checkpoint_every == 0:
            on_checkpoint(stats())
        if step % log_every == 0 and (not group or dist.get_rank() == 0):
            log.info("refiner step %d  %s  %.1f steps/s", step, "  ".join(f"{k} {v:.3f}" for k, v in ema.items()),
                     (step - start_step) / (time.time() - t0))
    refiner.eval()
    final = stats()
    if group:
        final["weight_spread"] = weight_spread(refiner.trainable_parameters())
    return final


def optimizer_steps(optimizer) -> int:
    """The step count in a torch optimizer's state (under DeepSpeed's ZeRO optimizer, of the one it wraps)."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)


def weight_spread(params: list[nn.Parameter]) -> float:
    """Across the ranks of the torch.distributed group: the largest difference of any element of ``params``."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max())
