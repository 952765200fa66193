"""Loading any Hugging Face causal LM, building reasoning prompts, and batched generation with cost accounting.

The same functions serve the tiny reasoner and a 7B R1-distill model: prompts go through the tokenizer's own chat
template and the think markers are configurable, so nothing here knows which model it runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass
class PromptFormat:
    """How a model marks its thinking. Defaults fit both DeepSeek-R1-Distill models and the tiny reasoner."""

    think_start: str = "<think>"
    think_end: str = "</think>"
    nothink_prefill: str = ""
    """Text between the markers in NoThinking mode (R1 papers use "Okay, I think I have finished thinking.")."""
    short_prefill: str = "^"
    """Text after the think marker that asks for the model's compact chain (``short`` mode); the tiny reasoner is
    trained with this marker (its SHORT_MARKER). A model trained without one gets a stray token before its long CoT."""
    concise_instruction: str = "Please reason step by step, but be concise."
    """System message for re-thinking a question the router judged hard."""


@dataclass
class GenerationConfig:
    """Decoding settings for one batched generation call."""

    max_new_tokens: int = 96
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    batch_size: int = 128
    stop: list[str] = field(default_factory=list)
    backend: str = "hf"
    """hf: transformers ``generate`` in each actor; vllm: a vLLM engine through Ray Data LLM (the extra of
    ``synadapt.models.vllm_engine``), for the batch stages that support it (collect_dcot)."""


@dataclass
class Generation:
    """One completion and what it cost."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    forward_positions: int
    """Positions run through the model: prompt + generated tokens (each processed once with the KV cache)."""
    seconds: float
    """Wall time of the batch divided by its size."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype | str | None = None):
    """Load a causal LM and its tokenizer from a local path or hub id; bf16 on CUDA, fp32 on CPU.

    The tokenizer pads on the left (needed for batched generation) and falls back to EOS as the pad token.
    """
    device = device or default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(name_or_path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    return model, tok


def build_prompt(tok, question: str, mode: str = "long", fmt: PromptFormat = PromptFormat(),
                 system: str | None = None) -> str:
    """Render ``question`` with the chat template and open the think block.

    ``mode``: ``long`` leaves the think block open for the model to fill; ``nothink`` closes it at once (empty or
    ``fmt.nothink_prefill`` thought); ``concise`` is ``long`` under the concise-reasoning system message;
    ``short`` opens the think block with ``fmt.short_prefill`` (the tiny reasoner's compact chain).
    """
    if mode not in ("long", "nothink", "concise", "short"):
        raise ValueError(f"unknown prompt mode {mode!r}; expected long, nothink, concise or short")
    if mode == "concise":
        system = system or fmt.concise_instruction
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # R1 templates already open the think block; others (and older R1 templates) do not.
    if not prompt.rstrip().endswith(fmt.think_start):
        prompt += fmt.think_start
    if mode == "nothink":
        prompt += fmt.nothink_prefill + fmt.think_end
    elif mode == "short":
        prompt += fmt.short_prefill
    return prompt


def count_generated(row: torch.Tensor, eos_ids: set[int], pad_id: int) -> int:
    """Generated tokens up to and including the first EOS; padding after it is not generation."""
    for i, t in enumerate(row.tolist()):
        if t in eos_ids:
            return i + 1
    return int((row != pad_id).sum()) if pad_id not in eos_ids else len(row)


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """``model.generate`` arguments for sampling at ``temperature``/``top_p``, or greedy decoding at 0 (the model's
    own generation_config sampling defaults are cleared so greedy really is greedy)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@torch.no_grad()
def generate(model, tok, prompts: list[str], cfg: GenerationConfig = GenerationConfig(),
             **generate_kwargs) -> list[Generation]:
    """Batched generation with left padding; returns one :class:`Generation` per prompt, in order.

    ``generate_kwargs`` go to every ``model.generate`` call (the serving graph passes a streamer and stopping
    criteria)."""
    if cfg.backend != "hf":
        raise ValueError(f"generate() is the hf backend, got backend={cfg.backend!r}: the vllm backend runs as a Ray "
                         "Data LLM processor (jobs/vllm_generate.py), which only collect_dcot uses so far")
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else {tok.eos_token_id}
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id, **generate_kwargs,
                  **sampling_kwargs(cfg.temperature, cfg.top_p))
    if cfg.stop:
        kwargs.update(stop_strings=cfg.stop, tokenizer=tok)
    out: list[Generation] = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start:start + cfg.batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        t0 = time.perf_counter()
        seqs = model.generate(**enc, **kwargs)
        seconds = (time.perf_counter() - t0) / len(chunk)
        new = seqs[:, enc["input_ids"].shape[1]:]
        for i in range(len(chunk)):
            n_prompt = int(enc["attention_mask"][i].sum())
            n_gen = count_generated(new[i], eos_ids, tok.pad_token_id)
            text = tok.decode(new[i, :n_gen], skip_special_tokens=False)
            for special in (tok.eos_token, tok.pad_token):
                text = text.replace(special, "") if special else text
            out.append(Generation(text, n_prompt, n_gen, n_prompt + n_gen, seconds))
    return out
