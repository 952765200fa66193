"""The two model deployments of the serving graph (wired together by serve/app.py).

- ``LatentReasoner``: base model + refinement adapter + classifier behind ``AdaptiveReasoner.latent_route``, one
  batch per call: latent thought, difficulty score, and the answer of every question it keeps.
- ``LongCoT``: discrete chain of thought for the questions it does not keep (the run's base model, or an AdaR1
  model via ``long_model``): batched generation, and token streaming for server-sent events.

Both batch concurrent requests with ``@serve.batch`` and run the model in a worker thread, so a replica keeps
collecting the next batch while one runs. Options (replicas, resources, queues) come from serve/config.yaml.
"""
import asyncio
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from ray import serve
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from serve.schemas import ServeConfig
from synadapt.models.lm import GenerationConfig, PromptFormat, build_prompt, count_generated, generate, load_model


def resolve_run_dir(path: str) -> str:
    """The absolute run directory (reasoner.json + refiner/): ``path`` itself, or its one subdirectory that is one
    (``synadapt demo --out runs/demo`` writes it to runs/demo/reasoner)."""
    p = Path(path).expanduser().resolve()
    if (p / "reasoner.json").is_file():
        return str(p)
    found = [d.parent for d in sorted(p.glob("*/reasoner.json")) if (d.parent / "refiner").is_dir()] \
        if p.is_dir() else []
    if len(found) == 1:
        return str(found[0])
    raise FileNotFoundError(f"run_dir {path!r}: no reasoner.json in it, nor exactly one subdirectory with "
                            f"reasoner.json and refiner/ (found {len(found)}); pass the output of a SynAdapt run")


def read_run(run_dir: str) -> tuple[str, PromptFormat]:
    """The base model path (relative paths are taken from the run dir) and prompt format of a run."""
    meta = json.loads((Path(run_dir) / "reasoner.json").read_text())
    base = Path(meta["base_model"]).expanduser()
    if not base.is_absolute() and (Path(run_dir) / base).exists():
        base = Path(run_dir) / base
    return str(base), PromptFormat(**meta.get("prompt", {}))


def _device(cfg: ServeConfig) -> str | None:
    return cfg.device or None  # None: load_model picks cuda only when the replica can see a GPU


@serve.deployment(ray_actor_options={"num_cpus": 0.4}, max_ongoing_requests=16, max_queued_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
class LatentReasoner:
    """Base model + refinement adapter + classifier: latent thought, difficulty score and easy answers."""

    def __init__(self, cfg: ServeConfig):
        from synadapt.latent.reasoner import AdaptiveReasoner  # peft is imported only where it is used

        torch.set_num_threads(cfg.torch_threads)
        self.reasoner = AdaptiveReasoner.load(cfg.run_dir, device=_device(cfg))
        self.route.set_max_batch_size(cfg.latent_batch.max_batch_size)
        self.route.set_batch_wait_timeout_s(cfg.latent_batch.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def route(self, requests: list[dict]) -> list[dict]:
        """``{question, tau, mode, max_new_tokens}`` each → AdaptiveReasoner.latent_route's record each."""
        # In a thread, so the replica keeps collecting the next batch while this one runs.
        return await asyncio.to_thread(self._route, requests)

    def _route(self, requests: list[dict]) -> list[dict]:
        out: list[dict] = [{}] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r["max_new_tokens"], []).append(i)
        for n, idx in groups.items():
            records = self.reasoner.latent_route([requests[i]["question"] for i in idx],
                                                 [requests[i]["tau"] for i in idx],
                                                 [requests[i]["mode"] for i in idx], max_new_tokens=n)
            for i, rec in zip(idx, records):
                out[i] = rec
        return out


class _QueueStreamer(BaseStreamer):
    """Hands each new token id list to ``emit`` (the first ``put`` is the prompt, which is skipped)."""

    def __init__(self, emit):
        self.emit, self.prompt_seen = emit, False

    def put(self, value):
        if self.prompt_seen:
            self.emit(value.view(-1).tolist())
        self.prompt_seen = True

    def end(self):
        pass


class _Cancelled(StoppingCriteria):
    """Stops generation once the stream's consumer has gone (client disconnect, timeout)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@serve.deployment(ray_actor_options={"num_cpus": 0.4}, max_ongoing_requests=16, max_queued_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
class LongCoT:
    """Discrete chain of thought under the concise-reasoning prompt, for questions judged hard."""

    def __init__(self, cfg: ServeConfig):
        torch.set_num_threads(cfg.torch_threads)
        base, self.fmt = read_run(cfg.run_dir)
        self.model, self.tok = load_model(cfg.long_model or base, device=_device(cfg))
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else {self.tok.eos_token_id}
        self.debug = cfg.debug_routes
        self.generate.set_max_batch_size(cfg.long_batch.max_batch_size)
        self.generate.set_batch_wait_timeout_s(cfg.long_batch.batch_wait_timeout_s)

    def _prompt(self, question: str) -> str:
        return build_prompt(self.tok, question, "concise", self.fmt)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, requests: list[dict]) -> list[dict]:
        """``{question, max_tokens, temperature, top_p, stop}`` each → ``Generation`` fields each."""
        return await asyncio.to_thread(self._generate, requests)

    def _generate(self, requests: list[dict]) -> list[dict]:
        out: list[dict] = [{}] * len(requests)
        groups: dict[tuple, list[int]] = {}  # one generate() per distinct decoding setting in the batch
        for i, r in enumerate(requests):
            groups.setdefault((r["max_tokens"], r["temperature"], r["top_p"], tuple(r["stop"])), []).append(i)
        for (n, temperature, top_p, stop), idx in groups.items():
            cfg = GenerationConfig(max_new_tokens=n, temperature=temperature, top_p=top_p, batch_size=len(idx),
                                   stop=list(stop))
            gens = generate(self.model, self.tok, [self._prompt(requests[i]["question"]) for i in idx], cfg)
            for i, g in zip(idx, gens):
                out[i] = asdict(g)
        return out

    def _text(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=False)  # keeps </think>; EOS and padding are not text
        for special in (self.tok.eos_token, self.tok.pad_token):
            text = text.replace(special, "") if special else text
        return text

    async def stream(self, r: dict):
        """Yield ``{"delta": text}`` as tokens arrive, then ``{"done": costs}`` (one request, not batched)."""
        loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        emit = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
        enc = self.tok([self._prompt(r["question"])], return_tensors="pt", add_special_tokens=False)
        kwargs = {"max_new_tokens": r["max_tokens"], "pad_token_id": self.tok.pad_token_id,
                  "streamer": _QueueStreamer(emit), "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)])}
        if r["temperature"] > 0:
            kwargs.update(do_sample=True, temperature=r["temperature"], top_p=r["top_p"])
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if r["stop"]:
            kwargs.update(stop_strings=r["stop"], tokenizer=self.tok)

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**enc.to(self.model.device), **kwargs)
            except Exception as e:  # noqa: BLE001 -- re-raised in the replica's event loop below
                emit(e)
            finally:
                emit(None)

        ids: list[int] = []
        prefix = read = 0  # ids[prefix:read] were sent already; decoding resumes from them for context

        def unsent(final: bool = False) -> str:
            nonlocal prefix, read
            before, now = self._text(ids[prefix:read]), self._text(ids[prefix:])
            # Hold back half a multi-byte character, or a re-tokenisation that would change text already sent.
            if len(now) > len(before) and now.startswith(before) and (final or not now.endswith("\ufffd")):
                prefix, read = read, len(ids)
                return now[len(before):]
            return ""

        t0 = time.perf_counter()
        threading.Thread(target=work, daemon=True).start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                ids += item
                if delta := unsent():
                    yield {"delta": delta}
        finally:
            cancel.set()
        if delta := unsent(final=True):
            yield {"delta": delta}
        n_prompt = int(enc["attention_mask"].sum())
        n_gen = count_generated(torch.tensor(ids), self.eos_ids, self.tok.pad_token_id) if ids else 0
        yield {"done": {"prompt_tokens": n_prompt, "generated_tokens": n_gen, "forward_positions": n_prompt + n_gen,
                        "seconds": time.perf_counter() - t0}}

    def fail(self) -> None:
        """Test only (debug_routes): raise inside the replica."""
        if self.debug:
            raise RuntimeError("debug failure requested")
