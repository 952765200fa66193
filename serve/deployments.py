"""The two model deployments of the serving graph (wired together by serve/app.py).

- ``LatentReasoner``: base model + refinement adapter + classifier behind ``AdaptiveReasoner.latent_route``, one
  batch per call: latent thought, difficulty score, and the answer of every question it keeps.
- ``LongCoT``: discrete chain of thought for the questions it does not keep (the run's base model, or an AdaR1
  model via ``long_model``): one batched ``generate`` for whole and streamed requests alike.

Both batch concurrent requests with :class:`Batcher` and run the model in a worker thread, so a replica keeps
accepting requests while a batch runs, and both answer Serve's ``check_health`` with a forward pass of their model.
Options (replicas, resources, queues, health checks) come from serve/config.yaml.
"""
import asyncio
import functools
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
from synadapt.models.lm import GenerationConfig, PromptFormat, build_prompt, generate, load_model


@functools.cache
def local_run_dir(run_dir: str) -> str:
    """``run_dir`` itself, or for a URI (``s3://bucket/runs/demo/reasoner``) a local copy made once per process with
    pyarrow.fs: a run's own files (reasoner.json, refiner adapter, classifier) are small; the base model they name
    is loaded from its own path or hub id."""
    if "://" not in run_dir:
        return run_dir
    import tempfile

    import pyarrow.fs

    local = tempfile.mkdtemp(prefix="synadapt-run-")
    pyarrow.fs.copy_files(run_dir, local)
    return local


def resolve_run_dir(path: str) -> str:
    """The absolute run directory (reasoner.json + refiner/): ``path`` itself, or its one subdirectory that is one
    (``synadapt demo --out runs/demo`` writes it to runs/demo/reasoner). A URI must name the run directory itself;
    it is returned as is, and every replica reads it through :func:`local_run_dir`."""
    if "://" in path:
        import pyarrow.fs

        fs, p = pyarrow.fs.FileSystem.from_uri(path)
        if fs.get_file_info(f"{p}/reasoner.json").type != pyarrow.fs.FileType.File:
            raise FileNotFoundError(f"run_dir {path!r}: no reasoner.json in it; a URI must name the run directory")
        return path
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
    run_dir = local_run_dir(run_dir)
    meta = json.loads((Path(run_dir) / "reasoner.json").read_text())
    base = Path(meta["base_model"]).expanduser()
    if not base.is_absolute() and (Path(run_dir) / base).exists():
        base = Path(run_dir) / base
    return str(base), PromptFormat(**meta.get("prompt", {}))


def _device(cfg: ServeConfig) -> str | None:
    return cfg.device or None  # None: load_model picks cuda only when the replica can see a GPU


class Batcher:
    """Runs ``work(items)`` in a worker thread on batches of waiting items, one batch at a time.

    A batch starts as soon as the model is free and takes every waiting item that shares the oldest one's ``key``
    (up to ``max_batch_size``): a lone request starts at once, and the requests that arrive while a batch runs form
    the next one. Ray's ``@serve.batch`` closes a batch on a timer instead: a lone request waits the whole
    ``batch_wait_timeout_s`` at every batched hop, and the next batch closes while the previous one still runs, so
    with no wait a busy replica runs batches of one.
    """

    def __init__(self, work, max_batch_size: int, key=lambda item: None):
        self.work, self.max_batch_size, self.key = work, max_batch_size, key
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None
        self.batch_started: float | None = None
        """When the running batch began (monotonic), None while idle: check_health reads it."""

    async def submit(self, item):
        """``work``'s result for ``item``, once a batch holding it has run (its error if the batch failed)."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((item, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while waiting := [w for w in self.waiting if not w[1].done()]:  # callers that gave up are dropped
            key = self.key(waiting[0][0])
            batch = [w for w in waiting if self.key(w[0]) == key][:self.max_batch_size]
            self.waiting = [w for w in waiting if not any(w is b for b in batch)]
            self.batch_started = time.monotonic()
            try:
                results = await asyncio.to_thread(self.work, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 -- the batch's callers get the error; the replica keeps serving
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            finally:
                self.batch_started = None
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


def check_model(model, probe: torch.Tensor, batcher: Batcher, stuck_after_s: float) -> None:
    """Raise when the replica cannot serve: a batch has run for more than ``stuck_after_s``, or a forward pass of
    ``probe`` (prompt ids) fails or gives non-finite logits. Serve replaces a replica whose ``check_health`` raises."""
    if batcher.batch_started is not None and time.monotonic() - batcher.batch_started > stuck_after_s:
        raise RuntimeError(f"a batch has been running for more than {stuck_after_s:.0f} s")
    with torch.no_grad():
        logits = model(input_ids=probe.to(model.device)).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("the model gives non-finite logits")


def _probe_ids(tok, fmt: PromptFormat) -> torch.Tensor:
    return tok(build_prompt(tok, "1+1", "long", fmt), return_tensors="pt", add_special_tokens=False)["input_ids"]


@serve.deployment(ray_actor_options={"num_cpus": 0.4}, max_ongoing_requests=16, max_queued_requests=64,
                  graceful_shutdown_timeout_s=130,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
class LatentReasoner:
    """Base model + refinement adapter + classifier: latent thought, difficulty score and easy answers."""

    def __init__(self, cfg: ServeConfig):
        from synadapt.latent.reasoner import AdaptiveReasoner  # peft is imported only where it is used

        torch.set_num_threads(cfg.torch_threads)
        self.reasoner = AdaptiveReasoner.load(local_run_dir(cfg.run_dir), device=_device(cfg))
        self.batcher = Batcher(self._route, cfg.latent_batch.max_batch_size)
        self.probe, self.stuck_after_s = _probe_ids(self.reasoner.tok, self.reasoner.fmt), cfg.request_timeout_s

    async def route(self, request: dict) -> dict:
        """``{question, tau, mode, max_new_tokens, temperature, top_p}`` → AdaptiveReasoner.latent_route's record."""
        return await self.batcher.submit(request)

    def _route(self, requests: list[dict]) -> list[dict]:
        out: list[dict] = [{}] * len(requests)
        groups: dict[tuple, list[int]] = {}  # one latent_route per distinct decoding setting in the batch
        for i, r in enumerate(requests):
            groups.setdefault((r["max_new_tokens"], r["temperature"], r["top_p"]), []).append(i)
        for (n, temperature, top_p), idx in groups.items():
            records = self.reasoner.latent_route([requests[i]["question"] for i in idx],
                                                 [requests[i]["tau"] for i in idx],
                                                 [requests[i]["mode"] for i in idx], max_new_tokens=n,
                                                 temperature=temperature, top_p=top_p)
            for i, rec in zip(idx, records):
                out[i] = rec
        return out

    async def check_health(self) -> None:
        await asyncio.to_thread(check_model, self.reasoner.model, self.probe, self.batcher, self.stuck_after_s)


class _RowStreamer(BaseStreamer):
    """Hands each row's new token id to that row's ``emit`` (rows without one are not streamed). The first
    ``put`` is the prompt, which is skipped; a row that has ended (EOS) gets nothing more."""

    def __init__(self, rows: list[dict], eos_ids: set[int]):
        self.emits, self.eos_ids, self.prompt_seen = [r.get("emit") for r in rows], eos_ids, False
        self.ended = [False] * len(rows)

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i, token in enumerate(value.view(-1).tolist()):
            if self.emits[i] is not None and not self.ended[i]:
                self.emits[i]([token])
            self.ended[i] = self.ended[i] or token in self.eos_ids

    def end(self):
        pass


class _Cancelled(StoppingCriteria):
    """Ends a row once its stream's consumer has gone (client disconnect, timeout); the other rows go on."""

    def __init__(self, events: list[threading.Event | None]):
        self.events = events

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([e is not None and e.is_set() for e in self.events], device=input_ids.device)


@serve.deployment(ray_actor_options={"num_cpus": 0.4}, max_ongoing_requests=16, max_queued_requests=64,
                  graceful_shutdown_timeout_s=130,
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
        # A batch shares one generate() call, so its requests share every decoding setting.
        self.batcher = Batcher(self._generate, cfg.long_batch.max_batch_size,
                               key=lambda r: (r["max_tokens"], r["temperature"], r["top_p"], tuple(r["stop"])))
        self.probe, self.stuck_after_s = _probe_ids(self.tok, self.fmt), cfg.request_timeout_s

    def _prompt(self, question: str) -> str:
        return build_prompt(self.tok, question, "concise", self.fmt)

    async def generate(self, request: dict) -> dict:
        """``{question, max_tokens, temperature, top_p, stop}`` → ``Generation`` fields."""
        return await self.batcher.submit(request)

    def _generate(self, rows: list[dict]) -> list[dict]:
        r = rows[0]
        cfg = GenerationConfig(max_new_tokens=r["max_tokens"], temperature=r["temperature"], top_p=r["top_p"],
                               batch_size=len(rows), stop=list(r["stop"]))
        gens = generate(self.model, self.tok, [self._prompt(row["question"]) for row in rows], cfg,
                        streamer=_RowStreamer(rows, self.eos_ids),
                        stopping_criteria=StoppingCriteriaList([_Cancelled([row.get("cancel") for row in rows])]))
        return [asdict(g) for g in gens]

    def _text(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=False)  # keeps </think>; EOS and padding are not text
        for special in (self.tok.eos_token, self.tok.pad_token):
            text = text.replace(special, "") if special else text
        return text

    async def stream(self, request: dict):
        """Yield ``{"delta": text}`` as this request's tokens arrive, then ``{"done": Generation fields}``. The
        request joins a batch like any other; its row of the batch's generate() streams to it."""
        loop, tokens, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        row = {**request, "cancel": cancel, "emit": lambda ids: loop.call_soon_threadsafe(tokens.put_nowait, ids)}
        result = asyncio.ensure_future(self.batcher.submit(row))
        result.add_done_callback(lambda _: tokens.put_nowait(None))  # after every token the batch emitted
        ids: list[int] = []
        prefix = read = 0  # ids[prefix:read] were sent already; decoding resumes from them for context
        sent = ""
        try:
            while (new := await tokens.get()) is not None:
                ids += new
                before, now = self._text(ids[prefix:read]), self._text(ids[prefix:])
                # Hold back half a multi-byte character, or a re-tokenisation that would change text already sent.
                if len(now) > len(before) and now.startswith(before) and not now.endswith("\ufffd"):
                    prefix, read = read, len(ids)
                    sent += now[len(before):]
                    yield {"delta": now[len(before):]}
            done = result.result()  # the batch's error, if it failed
        finally:
            cancel.set()
            result.cancel()
        if done["text"].startswith(sent) and len(done["text"]) > len(sent):
            yield {"delta": done["text"][len(sent):]}
        yield {"done": done}

    async def check_health(self) -> None:
        await asyncio.to_thread(check_model, self.model, self.probe, self.batcher, self.stuck_after_s)

    def fail(self) -> None:
        """Test only (debug_routes): raise inside the replica."""
        if self.debug:
            raise RuntimeError("debug failure requested")

    def break_model(self) -> None:
        """Test only (debug_routes): corrupt the weights (NaN), as a failing device would, so check_health fails."""
        if self.debug:
            with torch.no_grad():
                self.model.get_input_embeddings().weight.fill_(float("nan"))
