"""Adaptive inference: build latents, score difficulty, answer easy questions from the latents, re-think hard ones.

A run directory holds everything needed::

    reasoner.json   {"base_model": path, "prompt": PromptFormat fields}
    refiner/        PEFT adapter (or full model dir) + projection.safetensors + refiner.json
    classifier/     classifier.safetensors + classifier.json
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from synadapt.latent.classifier import DifficultyClassifier
from synadapt.latent.refiner import Refiner, RefinerConfig
from synadapt.latent.sequence import splice
from synadapt.models.lm import GenerationConfig, PromptFormat, build_prompt, generate, load_model, sampling_kwargs

ROUTES = ("auto", "latent", "long")


class AdaptiveReasoner:
    """Base model + refiner + difficulty classifier, with both routes batched."""

    def __init__(self, model, tok, refiner: Refiner, classifier: DifficultyClassifier, fmt: PromptFormat,
                 long_model=None, long_tok=None):
        self.model, self.tok, self.refiner, self.classifier, self.fmt = model, tok, refiner, classifier, fmt
        self.long_model, self.long_tok = long_model or model, long_tok or tok
        self.end_id = tok.convert_tokens_to_ids(fmt.think_end)

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None, long_model: str | None = None,
             refiner: str = "refiner") -> AdaptiveReasoner:
        """Load a run directory; ``long_model`` (e.g. an AdaR1 model dir) re-thinks hard questions instead of the base;
        ``refiner`` names the refiner's folder in the run (``refiner_pause`` for the trained-pause control)."""
        run = Path(run_dir)
        meta = json.loads((run / "reasoner.json").read_text())
        model, tok = load_model(meta["base_model"], device=device)
        refiner = Refiner.load(model, run / refiner).eval()
        # A run without a classifier yet (stage 3 labels its questions with the refiner alone) scores nothing.
        classifier = DifficultyClassifier.load(run / "classifier").to(model.device) \
            if (run / "classifier" / "classifier.json").exists() else None
        long = load_model(long_model, device=device) if long_model else (None, None)
        return cls(model, tok, refiner, classifier, PromptFormat(**meta.get("prompt", {})), *long)

    @staticmethod
    def save_run(run_dir: str | Path, base_model: str, refiner: Refiner | None,
                 classifier: DifficultyClassifier | None, fmt: PromptFormat = PromptFormat(), **meta) -> str:
        """Write a run directory that :meth:`load` reads (parts given as None are left as they are)."""
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        if refiner is not None:
            refiner.save(run / "refiner")
        if classifier is not None:
            classifier.save(run / "classifier")
        (run / "reasoner.json").write_text(json.dumps({"base_model": str(base_model), "prompt": asdict(fmt),
                                                       **meta}, indent=2))
        return str(run)

    @staticmethod
    def init_untrained(base_model_dir: str, out_dir: str, cfg: RefinerConfig = RefinerConfig(m=4, n_passes=2)) -> str:
        """An untrained run directory (random refiner and classifier) on ``base_model_dir``, for tests and smoke runs."""
        model, tok = load_model(base_model_dir)
        refiner = Refiner(model, cfg, tok.convert_tokens_to_ids(cfg.draft_token))
        classifier = DifficultyClassifier(2 * model.config.hidden_size)
        return AdaptiveReasoner.save_run(out_dir, base_model_dir, refiner, classifier)

    def prompt_ids(self, questions: list[str]) -> list[list[int]]:
        return [self.tok.encode(build_prompt(self.tok, q, "long", self.fmt), add_special_tokens=False)
                for q in questions]

    @torch.no_grad()
    def think(self, questions: list[str], latents: str = "refined") -> dict:
        """Latents and difficulty scores for a batch: ``{prompt_ids, z, scores, refine_positions, seconds}``;
        ``latents`` ``zeroed``/``shuffled`` are the controls of :meth:`Refiner.refine`."""
        t0 = time.perf_counter()
        prompts = self.prompt_ids(questions)
        z, feats, cost = self.refiner.refine(prompts, latents)
        t1 = time.perf_counter()
        scores = self.classifier.score(feats.to(self.model.device)).cpu() if self.classifier else None
        t2 = time.perf_counter()
        return {"prompt_ids": prompts, "z": z, "features": feats.cpu(), "scores": scores,
                "refine_positions": cost.cpu().tolist(),
                "seconds": {"refine": (t1 - t0) / len(questions), "classify": (t2 - t1) / len(questions)}}

    @torch.no_grad()
    def answer_nll(self, prompts: list[list[int]], z: torch.Tensor, answers: list[dict]) -> torch.Tensor:
        """Mean negative log-likelihood of each latent answer under the reader (the perplexity baseline)."""
        tails = [[self.end_id] + self.tok.encode(a["text"], add_special_tokens=False) + [self.tok.eos_token_id]
                 for a in answers]
        logits, labels = self.refiner.answer_logits(prompts, z, tails)
        from synadapt.latent.sequence import answer_loss

        return answer_loss(logits, labels, per_row=True).cpu()

    @torch.no_grad()
    def answer_from_latents(self, prompts: list[list[int]], z: torch.Tensor, max_new_tokens: int = 16,
                            temperature: float = 0.0, top_p: float = 1.0) -> list[dict]:
        """Answers read by the refiner's reader (frozen base or adapted model) after ``[prompt; Z; </think>]``:
        greedy at ``temperature`` 0, else sampled with ``temperature`` and ``top_p``."""
        t0 = time.perf_counter()
        s = splice(self.refiner.embed, prompts, z, [[self.end_id]] * len(prompts), self.tok.pad_token_id)
        with self.refiner.reader() as base:
            new = base.generate(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                                max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id,
                                **sampling_kwargs(temperature, top_p))
        seconds = (time.perf_counter() - t0) / len(prompts)
        out = []
        for i, row in enumerate(new):
            ids = row.tolist()
            n = next((k + 1 for k, t in enumerate(ids) if t == self.tok.eos_token_id), len(ids))
            text = self.tok.decode(ids[:n], skip_special_tokens=True)
            out.append({"text": text, "generated_tokens": n,
                        "forward_positions": int(s.attention_mask[i].sum()) + n, "seconds": seconds})
        return out

    def _route(self, th: dict, taus: list[float], modes: list[str]) -> list[dict]:
        """Per question: the score, the route (latent = easy, long = re-think) and the cost spent so far."""
        if th["scores"] is None and "auto" in modes:
            raise ValueError("reasoning mode auto needs a difficulty classifier; this run has no classifier/ "
                             "(run jobs.train_classifier, or use mode latent or long)")
        results = []
        for i, (mode, tau) in enumerate(zip(modes, taus)):
            score = float(th["scores"][i]) if th["scores"] is not None else None
            easy = mode == "latent" or (mode == "auto" and score < tau)
            results.append({"score": score, "route": "latent" if easy else "long", "text": None,
                            "latent_steps": self.refiner.cfg.m, "generated_tokens": 0,
                            "forward_positions": th["refine_positions"][i], "seconds": dict(th["seconds"])})
        return results

    def _answer_easy_from_latents(self, th: dict, results: list[dict], max_new_tokens: int, temperature: float = 0.0,
                                  top_p: float = 1.0) -> None:
        idx = [i for i, r in enumerate(results) if r["route"] == "latent"]
        if not idx:
            return
        for i, a in zip(idx, self.answer_from_latents([th["prompt_ids"][i] for i in idx], th["z"][idx],
                                                       max_new_tokens, temperature, top_p)):
            r = results[i]
            r.update(text=a["text"], generated_tokens=a["generated_tokens"])
            r["forward_positions"] += a["forward_positions"]
            r["seconds"]["answer"] = a["seconds"]

    def latent_route(self, questions: list[str], taus: list[float], modes: list[str], max_new_tokens: int = 16,
                     latents: str = "refined", temperature: float = 0.0, top_p: float = 1.0) -> list[dict]:
        """Score every question; answer from the latents those with mode ``latent`` or (``auto`` and score < τ),
        decoding with ``temperature``/``top_p`` (greedy at 0).

        Questions routed ``long`` come back with ``text=None``; the caller (the serving graph) re-thinks them.
        """
        for mode in modes:
            if mode not in ("auto", "latent"):
                raise ValueError(f"latent_route takes modes auto|latent, got {mode!r}")
        th = self.think(questions, latents)
        results = self._route(th, taus, modes)
        self._answer_easy_from_latents(th, results, max_new_tokens, temperature, top_p)
        return results

    def answer(self, questions: list[str], mode: str = "auto", tau: float = 0.5, gen: GenerationConfig | None = None,
               latents: str = "refined", easy_route: str = "latent") -> list[dict]:
        """The whole adaptive pipeline for a batch, both routes batched.

        ``easy_route="nothink"`` answers easy questions with an empty think block instead of the latents (the
        ``nothink+classifier`` control: same router, no latent content); ``latents`` picks a latent control.
        """
        if mode not in ROUTES:
            raise ValueError(f"unknown reasoning mode {mode!r}; expected one of {ROUTES}")
        if easy_route not in ("latent", "nothink"):
            raise ValueError(f"unknown easy route {easy_route!r}; expected latent or nothink")
        gen = gen or GenerationConfig()
        if mode == "long":
            results = [{"score": None, "route": "long", "text": None, "latent_steps": 0, "generated_tokens": 0,
                        "forward_positions": 0, "seconds": {}} for _ in questions]
        else:
            th = self.think(questions, latents)
            results = self._route(th, [tau] * len(questions), [mode] * len(questions))
            if easy_route == "latent":
                self._answer_easy_from_latents(th, results, gen.max_new_tokens)
            else:
                self._generate_into(results, "latent", questions, "nothink", gen, self.model, self.tok)
        self._generate_into(results, "long", questions, "concise", gen, self.long_model, self.long_tok)
        return results

    def _generate_into(self, results, route, questions, prompt_mode, gen, model, tok) -> None:
        """Generate for every question on ``route`` with a plain prompt and add the cost to its record."""
        idx = [i for i, r in enumerate(results) if r["route"] == route]
        if not idx:
            return
        prompts = [build_prompt(tok, questions[i], prompt_mode, self.fmt) for i in idx]
        # The LoRA adapter lives inside the base model's modules: plain generation must switch it off.
        with self.refiner.frozen_base() if model is self.model else contextlib.nullcontext():
            generations = generate(model, tok, prompts, gen)
        for i, g in zip(idx, generations):
            r = results[i]
            # A NoThinking prompt already closed the think block; put the marker back so grading finds the answer.
            r["text"] = self.fmt.think_end + g.text if prompt_mode == "nothink" else g.text
            r["generated_tokens"] = g.generated_tokens
            r["forward_positions"] += g.forward_positions
            r["seconds"] = {**r["seconds"], "generate": g.seconds}
