"""The serve config (``args:`` of serve/config.yaml), the OpenAI-compatible request/response shapes, their
limits, and the JSON error body.

Static rules (types, ``tau`` in [0, 1], ``n == 1``, a known ``reasoning_mode``) live on the pydantic models, so a
bad field is named by pydantic's own location; limits that depend on the deployment (prompt size, ``max_tokens``)
are checked by :func:`check_limits` against a :class:`Limits` from the serve config. Every error the API returns,
whatever raised it, has OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ReasoningMode = Literal["auto", "latent", "long"]


@dataclass
class Limits:
    """Per-request limits; a request over any of them gets a 400 naming the field."""

    max_prompt_chars: int = 8000
    """Longest question accepted, in characters (checked before tokenizing, so huge bodies are cheap to refuse)."""
    max_prompt_tokens: int = 2048
    """Longest question accepted, in tokens of the rendered prompt (chat template and think marker included)."""
    max_tokens: int = 4096
    """Largest ``max_tokens`` a request may ask for; the model's context length caps it further."""
    default_max_tokens: int = 96
    """``max_tokens`` of a request that names none."""


@dataclass
class BatchConfig:
    """How a model deployment groups concurrent requests into one batch. A batch starts as soon as the model is
    free, with the requests that queued meanwhile: no request waits for others to arrive."""

    max_batch_size: int = 8
    """Most requests per batch; keep the deployment's max_ongoing_requests at least this large."""


@dataclass
class ServeConfig:
    """The application's arguments (``args:`` in serve/config.yaml). Deployment options live beside them."""

    run_dir: str = "runs/demo"
    """SynAdapt run directory (reasoner.json, refiner/, classifier/), or a directory with exactly one below it."""
    long_model: str = ""
    """Model that re-thinks hard questions: empty means the run's base model; or an AdaR1 merged/DPO model dir."""
    long_backend: str = "hf"
    """What serves LongCoT: hf (transformers, this package's deployment) or vllm (a vLLM engine on Ray Serve LLM,
    serve/llm_backend.py; needs the vllm extra)."""
    long_gpus: float = 0.0
    """long_backend vllm: GPUs of each LongCoT replica's engine (its own placement-group bundle); 0 on CPU."""
    model_name: str = "synadapt"
    """The model id that /v1/models lists and requests name."""
    device: str = ""
    """cuda / cpu for the model replicas; empty picks cuda when the replica was given a GPU (num_gpus > 0)."""
    torch_threads: int = 1
    """torch threads per model replica."""
    reasoning_mode: str = "auto"
    """Default for requests that name none: auto, latent or long."""
    tau: float = 0.5
    """Default difficulty threshold: in auto mode a question scoring at or above tau re-thinks."""
    latent_answer_tokens: int = 16
    """Most tokens the latent route decodes after </think>; a request's max_tokens caps it further."""
    request_timeout_s: float = 120.0
    """Deadline of a request inside the graph (504 when passed); a client may ask for less with the
    x-synadapt-timeout-s header."""
    api_key_env: str = ""
    """Name of an env var holding the API key; when set, /v1 routes need 'Authorization: Bearer <key>'
    and the ingress refuses to start if the variable is empty."""
    max_inflight_requests: int = 448
    """Requests one ingress replica holds at once; beyond it a request gets a JSON 503 at once. Keep it below the
    Ingress deployment's max_ongoing_requests, or Serve's proxy answers the overflow with a plain-text 503."""
    debug_routes: bool = False
    """Test only: enables POST /debug/error (an exception inside the LongCoT replica) and POST /debug/break_long
    (NaN weights in the LongCoT replica, so its health check fails)."""
    limits: Limits = field(default_factory=Limits)
    latent_batch: BatchConfig = field(default_factory=BatchConfig)
    long_batch: BatchConfig = field(default_factory=BatchConfig)


class ApiError(Exception):
    """An error the API reports to the client as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Fields shared by both endpoints. Unknown OpenAI fields (``user``, ``seed``, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """Newer OpenAI name of ``max_tokens`` (chat); ``max_tokens`` wins when both are given."""
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """0 (the default) means greedy decoding; both routes honour it (and ``top_p``)."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default_factory=list)
    """Becomes a list (possibly empty) after validation."""
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = None
    reasoning_mode: ReasoningMode | None = None
    """auto: the classifier decides; latent: always answer from the latent thought; long: always re-think."""
    tau: float | None = Field(None, ge=0.0, le=1.0)
    """Difficulty threshold for auto mode: a question scoring at or above it re-thinks."""

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message as plain text; content parts other than text are refused."""
        if isinstance(self.content, list):
            if any(p.get("type") != "text" for p in self.content):
                raise ApiError(400, "only text content parts are supported", "messages", "invalid_value")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)

    def question(self) -> str:
        """The content of the last user message: what the reasoner answers (system prompts are not used)."""
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if not users:
            raise ApiError(400, "messages must contain a user message", "messages", "invalid_value")
        text = self.messages[users[-1]].text()
        if not text.strip():
            raise ApiError(400, "the last user message has empty content", f"messages.{users[-1]}.content",
                           "invalid_value")
        return text


class CompletionRequest(_Request):
    prompt: str | list[str]

    def question(self) -> str:
        """The prompt, taken as the question and rendered with the chat template like a chat message."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt must be one string (batched prompts are not supported)", "prompt",
                           "invalid_value")
        if not prompts[0].strip():
            raise ApiError(400, "prompt is empty", "prompt", "invalid_value")
        return prompts[0]


def check_limits(req: _Request, question: str, limits: Limits) -> int:
    """Raise :class:`ApiError` when the request exceeds ``limits``; returns the ``max_tokens`` to use."""
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    if len(question) > limits.max_prompt_chars:
        raise ApiError(400, f"{param} is too long: {len(question)} characters, limit {limits.max_prompt_chars}",
                       param, "context_length_exceeded")
    max_tokens = req.max_tokens or req.max_completion_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        param = "max_tokens" if req.max_tokens else "max_completion_tokens"
        raise ApiError(400, f"{param} must be at most {limits.max_tokens}, got {max_tokens}", param, "invalid_value")
    return max_tokens


def check_prompt_tokens(param: str, prompt_tokens: int, max_tokens: int, limits: Limits,
                        context: int | None) -> None:
    """Refuse a rendered prompt over the token limit, or one that with ``max_tokens`` overflows the context."""
    if prompt_tokens > limits.max_prompt_tokens:
        raise ApiError(400, f"{param} is too long: {prompt_tokens} tokens, limit {limits.max_prompt_tokens}",
                       param, "context_length_exceeded")
    if context and prompt_tokens + max_tokens > context:
        raise ApiError(400, f"max_tokens ({max_tokens}) + prompt tokens ({prompt_tokens}) exceed the model's "
                            f"context of {context} tokens", "max_tokens", "context_length_exceeded")


def validation_error(errors: list[dict]) -> ApiError:
    """One :class:`ApiError` (400) from pydantic/FastAPI validation errors, naming the first bad field."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None,
                        "invalid_json")
    param = ".".join(loc) or None
    if err.get("type") == "missing":
        return ApiError(400, f"{param or 'a JSON request body'} is required", param, "missing_required_parameter")
    if not loc:  # body present but not an object
        return ApiError(400, f"request body must be a JSON object: {err.get('msg')}", None, "invalid_json")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"invalid {param}: {msg}", param, "invalid_value")


# --- responses -------------------------------------------------------------------------------------------------

def trim_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string (OpenAI leaves stops out), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def holdback(text: str, markers: list[str]) -> int:
    """How many trailing characters of a growing ``text`` could still start a marker, so a stream must wait."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


def split_reasoning(text: str, think_end: str) -> tuple[str, str]:
    """Long-route output ``thought</think>answer`` → (thought, answer). The prompt opened the think block, so
    everything before ``think_end`` is thought, and a cut-off thought has no answer yet."""
    thought, marker, answer = text.partition(think_end)
    return thought, answer.lstrip() if marker else ""


def response_body(kind: str, rid: str, created: int, model: str, raw: str, thought: str | None, answer: str,
                  finish: str, prompt_tokens: int, completion_tokens: int, meta: dict) -> dict:
    """A whole ``chat.completion`` (answer in ``content``, thought in ``reasoning_content``) or ``text_completion``
    (the raw generated text) with usage and the ``synadapt`` metadata."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if kind == "chat":
        choice = {"index": 0, "finish_reason": finish, "logprobs": None,
                  "message": {"role": "assistant", "content": answer, "reasoning_content": thought}}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None, "text": raw}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage,
            "synadapt": meta}


def chunk_body(kind: str, rid: str, created: int, model: str, delta: dict | None = None,
               finish: str | None = None, **extra) -> dict:
    """One streamed chunk; ``delta`` holds ``content``/``reasoning_content``/``role`` (chat) or ``text``."""
    delta = delta or {}
    if kind == "chat":
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta.get("text", ""), "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **extra}
