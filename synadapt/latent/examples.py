"""Turning problems, DCoT records and synthesised latents into the token-level examples the latent stages train on."""
from __future__ import annotations

import random

import torch

from synadapt.models.lm import PromptFormat, build_prompt

TARGET_FORMATS = ("values", "var_values", "long_cot")


def target_text(problem: dict, targets: str = "values") -> str | None:
    """The per-slot target text of a problem: what its latents should spell, one slot per token.

    ``values``: the intermediate results with commas (``4,1,1,6``); ``var_values``: each computed variable with its
    value (``y=1,n=1,b=6``, the embedded task's short_cot); ``long_cot``: the problem's long CoT. A
    ``latent_targets`` field (a list or a comma-separated string) overrides all three. None when the data has none.
    """
    if targets not in TARGET_FORMATS:
        raise ValueError(f"unknown latent target format {targets!r}; expected one of {TARGET_FORMATS}")
    given = problem.get("latent_targets")
    # Ray Data hands an all-missing column back as NaN floats, so test for a string or a sequence, not truthiness.
    if isinstance(given, str) and given:
        return given
    if not isinstance(given, str) and hasattr(given, "__len__") and len(given):
        return ",".join(str(x).strip() for x in given)
    if targets == "long_cot":
        return problem.get("long_cot") or None
    short = problem.get("short_cot")
    if not short:
        return None
    # The embedded task's short_cot is names and values of the computed variables (y=1,n=1,b=6) or, in v1, every
    # value (4,1,1,6); either gives both formats (the question supplies the other part).
    if "=" in short:
        return short if targets == "var_values" else \
            ",".join([problem["question"].split(";")[0].split("=")[1]] + [i.split("=")[1] for i in short.split(",")])
    if targets == "values":
        return short
    names = [s.split("=")[0] for s in problem["question"].split(";")[:-1]]
    return ",".join(f"{n}={v}" for n, v in zip(names[1:], short.split(",")[1:]))


def latent_targets(problem: dict, tok, m: int, targets: str = "values", pad: str = ",",
                   prefix: str = "", align: str = "right") -> dict | None:
    """Per-slot target tokens (``ids``, m), the chain step each belongs to (``steps``, m) and ``truncated``, or None.

    The text is right-aligned so it ends at the last slot, before ``</think>``, and the slots before it are ``pad``:
    the shipped reader answers 1.00 from such a layout fed exactly, against 0.39-0.46 when the padding comes after
    the text (bench/latent_probe_log.md). Step k (the k-th comma-separated item) can be right only from
    refinement pass k+1 on, because each pass moves a result one step along the chain. A text longer than m keeps
    its last m tokens and is marked ``truncated``: the losses that use the targets refuse it (m is too small).
    """
    text = target_text(problem, targets)
    if not text:
        return None
    text = prefix + text  # e.g. the tiny reasoner's short-CoT marker, so the reader knows the format it reads
    ids = tok.encode(text, add_special_tokens=False)
    comma = tok.encode(",", add_special_tokens=False)
    steps, step = [], 0
    for t in ids:
        steps.append(step)
        step += [t] == comma
    pad_id = tok.encode(pad, add_special_tokens=False)[0]
    if align not in ("right", "left"):
        raise ValueError(f"unknown latent target align {align!r}; expected right or left")
    if len(ids) > m:
        return {"ids": ids[-m:], "steps": steps[-m:], "truncated": len(ids)}
    fill = m - len(ids)
    if align == "left":  # the chain right after the think marker, as the model writes it; pads belong to its end
        return {"ids": ids + [pad_id] * fill, "steps": steps + [steps[-1]] * fill, "truncated": 0}
    return {"ids": [pad_id] * fill + ids, "steps": [0] * fill + steps, "truncated": 0}


def make_example(problem: dict, tok, fmt: PromptFormat, m: int, response: str | None = None,
                 dcot: str | None = None, targets: str = "values", target_pad: str = ",",
                 target_prefix: str = "", target_align: str = "right") -> dict:
    """Token ids for one question: prompt (ending with the think marker), the DCoT, the answer tail
    (``[</think>] + answer + [eos]``, the model's own answer when ``response`` is given) and the per-slot latent
    targets (``target_ids`` and their chain step ``target_steps``, see :func:`latent_targets`)."""
    prompt = build_prompt(tok, problem["question"], "long", fmt)
    answer_text = response.split(fmt.think_end)[-1] if response and fmt.think_end in response else problem["answer"]
    end_id = tok.convert_tokens_to_ids(fmt.think_end)
    slots = latent_targets(problem, tok, m, targets, target_pad, target_prefix, target_align)
    return {
        "id": problem["id"],
        "difficulty": problem.get("difficulty"),
        "prompt_ids": tok.encode(prompt, add_special_tokens=False),
        "dcot_ids": tok.encode(dcot if dcot is not None else problem.get("long_cot") or "", add_special_tokens=False),
        "answer_ids": tok.encode(answer_text, add_special_tokens=False) + [tok.eos_token_id],
        "tail_ids": [end_id] + tok.encode(answer_text, add_special_tokens=False) + [tok.eos_token_id],
        "target_ids": slots and slots["ids"],
        "target_steps": slots and slots["steps"],
        "target_truncated": slots and slots["truncated"],
    }


def collate(examples: list[dict], device=None) -> dict:
    """A refiner training batch: id lists stay lists (they are spliced), tensors are stacked."""
    batch = {"prompt_ids": [e["prompt_ids"] for e in examples], "tail_ids": [e["tail_ids"] for e in examples],
             "z_syn": None, "target_ids": None, "target_steps": None, "target_truncated": 0}
    if all(e.get("z_syn") is not None for e in examples):
        batch["z_syn"] = torch.stack([torch.as_tensor(e["z_syn"], dtype=torch.float32) for e in examples]).to(device)
    if all(e.get("target_ids") is not None for e in examples):
        batch["target_ids"] = torch.tensor([e["target_ids"] for e in examples], device=device)
        batch["target_steps"] = torch.tensor([e["target_steps"] for e in examples], device=device)
        batch["target_truncated"] = max(e.get("target_truncated") or 0 for e in examples)
    return batch


def batches(examples: list[dict], batch_size: int, seed: int = 0):
    """Endless shuffled batches (epoch after epoch)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]
