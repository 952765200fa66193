"""The Ray Serve deployment graph: an OpenAI-compatible ingress in front of two model deployments.

    HTTP ──► Ingress (FastAPI: validate, authorize, route, format, stream)
               ├──► LatentReasoner  latent thought + difficulty score for the batch; answers the questions it
               │                    keeps (reasoning_mode latent, or auto with score < tau)
               └──► LongCoT         re-thinks the rest with discrete chain of thought (batched, or streamed)

``build_app`` is the application builder that ``serve run serve/config.yaml``, ``serve deploy`` and
``synadapt serve`` use; every deployment takes its replicas, autoscaling, resources and queue limits from that file.

Nothing is lost when a model replica dies: a call whose replica dies before answering (for a stream: before its
first token) is made again, and Serve routes it to a live replica or the replacement, within the request's
deadline; only a stream already under way can fail, and then with an SSE error event.
"""
# No `from __future__ import annotations`: FastAPI must see the real `Request` annotations of the ingress routes.
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException
from transformers import AutoConfig, AutoTokenizer

from serve.deployments import LatentReasoner, LongCoT, read_run, resolve_run_dir
from serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ServeConfig,
    check_limits,
    check_prompt_tokens,
    chunk_body,
    holdback,
    response_body,
    split_reasoning,
    trim_stops,
    validation_error,
)
from synadapt.config import load_config
from synadapt.models.lm import build_prompt
from synadapt.models.vllm_engine import check_backend

log = logging.getLogger("ray.serve")


api = FastAPI(title="synadapt", description="OpenAI-compatible adaptive-reasoning API (SynAdapt + AdaR1)")


def error_response(e: ApiError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def overloaded(detail: str) -> ApiError:
    return ApiError(503, f"server overloaded, retry later ({detail})", None, "overloaded", "server_error")


class _Admission:
    """ASGI middleware: a /v1 request beyond ``limit`` in flight on this replica (a stream counts until its last
    byte) gets at once the JSON 503 a model deployment's overload gets; were the replica's max_ongoing_requests
    reached instead, Serve's proxy would answer in plain text."""

    limit = ServeConfig.max_inflight_requests
    """Set by the Ingress from its config (a class attribute: Serve runs a frozen copy of ``api``)."""

    def __init__(self, app):
        self.app, self.inflight = app, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.inflight >= self.limit:
            detail = f"{self.inflight} requests in flight on this ingress replica"
            return await error_response(overloaded(detail))(scope, receive, send)
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


api.add_middleware(_Admission)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes and methods get OpenAI's error body too."""
    return error_response(ApiError(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404
                                   else "method_not_allowed"))


def as_api_error(e: Exception, timeout_s: float | None = None) -> ApiError:
    """What the client is told about an exception raised while serving its request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, BackPressureError):
        return overloaded(e.message)
    if isinstance(e, (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)):
        return ApiError(503, "a model replica is unavailable (it is being replaced); retry", None,
                        "replica_unavailable", "server_error")
    if isinstance(e, TimeoutError) and not isinstance(e, RayTaskError):
        return ApiError(504, f"request timed out after {timeout_s:.3g} s", None, "timeout", "server_error")
    cause = getattr(e, "cause", None) or e
    log.error("request failed", exc_info=e)
    return ApiError(500, f"internal error: {type(cause).__name__}: {str(cause)[:300]}", None, "internal_error",
                    "server_error")


@dataclass
class _Job:
    """One parsed request on its way through the graph."""

    kind: str  # chat | completion
    req: ChatRequest | CompletionRequest
    question: str
    max_tokens: int
    prompt_tokens: int
    mode: str
    tau: float
    t0: float
    timeout_s: float
    rid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def remaining(self) -> float:
        return max(self.t0 + self.timeout_s - time.perf_counter(), 0.0)

    @property
    def response_id(self) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{self.rid}"


def metadata(job: _Job, latent: dict | None, long: dict | None) -> dict:
    """The ``synadapt`` object of a response. While a re-think is still streaming (route long, no ``long`` yet)
    its costs are unknown and left None; the stream's last chunk carries them."""
    rethinks = latent is None or latent["route"] == "long"
    pending = rethinks and long is None
    seconds = {"refine": 0.0, "classify": 0.0, "answer": 0.0, **(latent["seconds"] if latent else {}),
               "long": None if pending else (long["seconds"] if long else 0.0),
               "total": None if pending else time.perf_counter() - job.t0}
    spent = (latent["forward_positions"] if latent else 0) + (long["forward_positions"] if long else 0)
    return {"route": "long" if rethinks else "latent", "reasoning_mode": job.mode, "tau": job.tau,
            "score": latent["score"] if latent else None, "latent_steps": latent["latent_steps"] if latent else 0,
            "generated_tokens": None if pending else (long or latent)["generated_tokens"],
            "forward_positions": None if pending else spent,
            "seconds": {k: None if v is None else round(v, 6) for k, v in seconds.items()}}


def metadata_headers(meta: dict) -> dict[str, str]:
    """``x-synadapt-*`` response headers carrying the same metadata as the body."""
    headers = {f"x-synadapt-{k.replace('_', '-')}": str(v) for k, v in meta.items()
               if k != "seconds" and v is not None}
    headers.update({f"x-synadapt-seconds-{k}": str(v) for k, v in meta["seconds"].items() if v is not None})
    return headers


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _items(first: list, rest=None):
    """``first`` then whatever ``rest`` (an async iterator) yields."""
    for item in first:
        yield item
    if rest is not None:
        async for item in rest:
            yield item


async def _deadline(job: _Job, items, gen):
    """``items`` with the request's deadline applied to each next item."""
    it = items.__aiter__()
    while True:
        try:
            yield await asyncio.wait_for(it.__anext__(), job.remaining())
        except StopAsyncIteration:
            return
        except TimeoutError:
            if gen is not None:
                gen.cancel()
            raise


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=512, max_queued_requests=512,
                  graceful_shutdown_timeout_s=130,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 128})
@serve.ingress(api)
class Ingress:
    """HTTP front: validates and authorizes, asks LatentReasoner to route, re-thinks on LongCoT, formats."""

    def __init__(self, latent, long, cfg: ServeConfig):
        self.latent, self.long, self.cfg = latent, long, cfg
        _Admission.limit = cfg.max_inflight_requests
        base, self.fmt = read_run(cfg.run_dir)
        self.tok = AutoTokenizer.from_pretrained(base)  # to count prompt tokens against the limits
        self.context = getattr(AutoConfig.from_pretrained(cfg.long_model or base), "max_position_embeddings", None)
        self.key = None
        if cfg.api_key_env:
            self.key = os.environ.get(cfg.api_key_env, "")
            if not self.key:
                raise RuntimeError(f"api_key_env is {cfg.api_key_env!r} but that variable is empty in the ingress "
                                   "replica; export it before starting Ray or set it in the deployment's runtime_env")
        self.created = int(time.time())

    def _authorize(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", None,
                           "invalid_api_key", "authentication_error")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except ApiError as e:
            return error_response(e)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": self.created,
                                            "owned_by": "synadapt"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle("chat", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle("completion", request)

    @api.post("/debug/error")
    async def debug_error(self, request: Request):
        """Test only: an exception raised inside a LongCoT replica, returned as a 500."""
        if not self.cfg.debug_routes:
            return error_response(ApiError(404, "Not Found", None, "not_found"))
        try:
            await asyncio.wait_for(self.long.fail.remote(), self.cfg.request_timeout_s)
            return {"status": "no error"}
        except Exception as e:  # noqa: BLE001 -- every failure becomes a JSON error
            return error_response(as_api_error(e))

    @api.post("/debug/break_long")
    async def debug_break_long(self, request: Request):
        """Test only: NaN weights in the LongCoT replica, so its check_health fails and Serve replaces it."""
        if not self.cfg.debug_routes:
            return error_response(ApiError(404, "Not Found", None, "not_found"))
        await self.long.break_model.remote()
        return {"status": "broken"}

    def _timeout(self, request: Request) -> float:
        raw = request.headers.get("x-synadapt-timeout-s")
        try:
            asked = float(raw) if raw is not None else self.cfg.request_timeout_s
        except ValueError:
            asked = -1.0
        if not 0 < asked:
            raise ApiError(400, f"x-synadapt-timeout-s must be a positive number of seconds, got {raw!r}",
                           "x-synadapt-timeout-s", "invalid_value")
        return min(asked, self.cfg.request_timeout_s)

    def _parse(self, kind: str, body: bytes, request: Request) -> _Job:
        t0 = time.perf_counter()
        self._authorize(request)
        timeout_s = self._timeout(request)
        try:
            req = (ChatRequest if kind == "chat" else CompletionRequest).model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e.errors(include_url=False)) from None
        if req.model and req.model != self.cfg.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {self.cfg.model_name!r}",
                           "model", "model_not_found")
        question = req.question()
        max_tokens = check_limits(req, question, self.cfg.limits)
        prompt = build_prompt(self.tok, question, "concise", self.fmt)
        n_prompt = len(self.tok(prompt, add_special_tokens=False)["input_ids"])
        check_prompt_tokens("messages" if kind == "chat" else "prompt", n_prompt, max_tokens, self.cfg.limits,
                            self.context)
        return _Job(kind, req, question, max_tokens, n_prompt, req.reasoning_mode or self.cfg.reasoning_mode,
                    self.cfg.tau if req.tau is None else req.tau, t0, timeout_s)

    async def _handle(self, kind: str, request: Request):
        job = None
        try:
            job = self._parse(kind, await request.body(), request)
            return await self._run(job)
        except Exception as e:  # noqa: BLE001 -- every failure becomes a JSON error; the replica keeps serving
            return error_response(as_api_error(e, job.timeout_s if job else None))

    @staticmethod
    async def _first(job: _Job, call, stream: bool = False):
        """``call()`` (a handle call) and its result, or a stream's first item, within the request's deadline (on
        timeout it is cancelled downstream and TimeoutError raised). A replica that dies before answering is not
        the client's failure: the call is made again, and Serve routes it to a live replica or the replacement."""
        pause = 0.1
        while True:
            response = call()
            try:
                return response, await asyncio.wait_for(response.__anext__() if stream else response, job.remaining())
            except TimeoutError:
                response.cancel()
                raise
            except (RayActorError, ReplicaUnavailableError) as e:  # ActorDiedError, ActorUnavailableError too
                if job.remaining() <= pause:
                    raise
                log.warning("request %s: a replica died before answering (%s); retrying", job.rid, type(e).__name__)
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2.0)

    async def _run(self, job: _Job):
        req, latent = job.req, None
        sampling = {"temperature": req.temperature or 0.0, "top_p": req.top_p or 1.0}
        if job.mode != "long":
            _, latent = await self._first(job, lambda: self.latent.route.remote(
                {"question": job.question, "tau": job.tau, "mode": job.mode,
                 "max_new_tokens": min(job.max_tokens, self.cfg.latent_answer_tokens), **sampling}))
        if latent is not None and latent["route"] == "latent":
            # The latent thought stands where text would: the continuation is "</think>" + answer.
            raw = self.fmt.think_end + (latent["text"] or "")
            if req.stream:
                return self._stream(job, latent, _items([{"delta": raw}, {"done": None}]), None)
            return self._respond(job, latent, None, raw, latent["generated_tokens"])
        params = {"question": job.question, "max_tokens": job.max_tokens, "stop": req.stop, **sampling}
        if req.stream:  # nothing is sent before the first item: overload errors are JSON, a dead replica retried
            gen, first = await self._first(job, lambda: self.long.options(stream=True).stream.remote(params), True)
            return self._stream(job, latent, _items([first], gen), gen)
        _, long = await self._first(job, lambda: self.long.generate.remote(params))
        return self._respond(job, latent, long, long["text"], long["generated_tokens"])

    def _respond(self, job: _Job, latent: dict | None, long: dict | None, raw: str, generated: int) -> JSONResponse:
        raw, stopped = trim_stops(raw, job.req.stop)
        thought, answer = split_reasoning(raw, self.fmt.think_end)
        meta = metadata(job, latent, long)
        body = response_body(job.kind, job.response_id, job.created, self.cfg.model_name, raw, thought or None,
                             answer, self._finish_reason(job, long, stopped, generated), job.prompt_tokens,
                             generated, meta)
        return JSONResponse(body, headers=metadata_headers(meta))

    def _finish_reason(self, job: _Job, long: dict | None, stopped: bool, generated: int) -> str:
        cap = job.max_tokens if long else min(job.max_tokens, self.cfg.latent_answer_tokens)
        return "stop" if stopped or generated < cap else "length"

    def _stream(self, job: _Job, latent: dict | None, items, gen) -> StreamingResponse:
        """SSE in OpenAI chunk format; headers carry what is known before the first token."""
        head = metadata(job, latent, None)
        return StreamingResponse(self._events(job, latent, items, gen), media_type="text/event-stream",
                                 headers=metadata_headers(head))

    async def _events(self, job: _Job, latent: dict | None, items, gen):
        kind, stops = job.kind, job.req.stop
        chunk = lambda delta=None, finish=None, **extra: sse(
            chunk_body(kind, job.response_id, job.created, self.cfg.model_name, delta, finish, **extra))
        markers = stops + [self.fmt.think_end]  # a partial marker at the end is held back until it resolves
        full, sent = "", {"reasoning_content": 0, "content": 0, "text": 0}

        def unsent(visible: str) -> dict:
            """The part of each field of ``visible`` the client has not had yet (and mark it sent)."""
            parts = dict(zip(("reasoning_content", "content"), split_reasoning(visible, self.fmt.think_end))) \
                if kind == "chat" else {"text": visible}
            delta = {k: v[sent[k]:] for k, v in parts.items() if len(v) > sent[k]}
            sent.update({k: len(parts[k]) for k in delta})
            return delta

        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            async for item in _deadline(job, items, gen):
                if "done" in item:
                    long = item["done"]
                    break
                full += item["delta"]
                text, stopped = trim_stops(full, stops)
                delta = unsent(text if stopped else text[:len(text) - holdback(text, markers)])
                if delta:
                    yield chunk(delta)
            else:
                raise RuntimeError("the LongCoT stream ended without its summary")
            text, stopped = trim_stops(full, stops)
            meta = metadata(job, latent, long)
            n = meta["generated_tokens"]
            yield chunk(unsent(text), self._finish_reason(job, long, stopped, n), synadapt=meta)
            if job.req.include_usage():
                usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}
                yield sse({**chunk_body(kind, job.response_id, job.created, self.cfg.model_name), "choices": [],
                           "usage": usage})
        except Exception as e:  # noqa: BLE001 -- headers are sent: the error goes as an event, then [DONE]
            yield sse(as_api_error(e, job.timeout_s).body())
        finally:
            if gen is not None:
                gen.cancel()
        yield sse("[DONE]")


def build_app(args: dict):
    """Application builder (``import_path: serve.app:build_app``): ``args`` are :class:`ServeConfig` fields.

    ``args["deployments"]`` may carry the same per-deployment options as a config file's ``deployments:`` list
    (for callers that deploy from Python, like ``synadapt serve``); ``serve run``/``serve deploy`` apply the
    file's list themselves.
    """
    args = dict(args or {})
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in args.pop("deployments", None) or []}
    unknown = sorted(set(options) - {"Ingress", "LatentReasoner", "LongCoT"})
    if unknown:
        raise ValueError(f"unknown deployment {unknown[0]!r}; the graph has Ingress, LatentReasoner, LongCoT")
    cfg = load_config(ServeConfig, None, args)
    if cfg.reasoning_mode not in ("auto", "latent", "long"):
        raise ValueError(f"reasoning_mode must be auto, latent or long, got {cfg.reasoning_mode!r}")
    ingress_slots = options.get("Ingress", {}).get("max_ongoing_requests", Ingress.max_ongoing_requests)
    if cfg.max_inflight_requests >= ingress_slots:
        raise ValueError(f"max_inflight_requests ({cfg.max_inflight_requests}) must be below the Ingress "
                         f"deployment's max_ongoing_requests ({ingress_slots}), so the ingress answers its own "
                         "overflow with a JSON 503")
    cfg.run_dir = resolve_run_dir(cfg.run_dir)
    if cfg.long_model:
        cfg.long_model = str(Path(cfg.long_model).expanduser().resolve())
    with_opts = lambda d: d.options(**options[d.name]) if d.name in options else d
    check_backend(cfg.long_backend, "long_backend")  # a missing vllm extra fails here, before any replica starts
    if cfg.long_backend == "vllm":
        from serve.llm_backend import build_long_cot  # ray.serve.llm imports vLLM

        long = build_long_cot(cfg, options.get("LongCoT", {}))
    else:
        long = with_opts(LongCoT).bind(cfg)
    return with_opts(Ingress).bind(with_opts(LatentReasoner).bind(cfg), long, cfg)
