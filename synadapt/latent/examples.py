"""Turning problems, DCoT records and synthesised latents into the token-level examples the latent stages train on."""
from __future__ import annotations

import random

import torch

from synadapt.models.lm import PromptFormat, build_prompt

TARGET_FORMATS = ("values", "var_values", "long_cot")


def target_text(problem: dict, targets: str = "values") -> str | None:
    """The per-slot target text of a problem: what its latents should spell, one slot per token.

    ``values``: the intermediate results with commas (``4,1,1,6``); ``var_values``: each variable with its value
    (``m=4,y=1,n=1,b=6``, names from the embedded task's question); ``long_cot``: the problem's long CoT. A
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
    values = problem.get("short_cot")
    if not values:
        return None
    if targets == "values":
        return values
    names = [s.split("=")[0] for s in problem["question"].split(";")[:-1]]
    return ",".join(f"{n}={v}" for n, v in zip(names, values.split(",")))


def latent_targets(problem: dict, tok, m: int, targets: str = "values", pad: str = ",") -> dict | None:
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
    ids = tok.encode(text, add_special_tokens=False)
    comma = tok.encode(",", add_special_tokens=False)
    steps, step = [], 0
    for t in ids:
        steps.append(step)
        step += [t] == comma
    pad_id = tok.encode(pad, add_special_tokens=False)[0]
    if len(ids) > m:
        return {"ids": ids[-m:], "steps": steps[-m:], "truncated": len(ids)}
    return {"ids": [pad_id] * (m - len(ids)) + ids, "steps": [0] * (m - len(ids)) + steps, "truncated": 0}


def make_example(problem: dict, tok, fmt: PromptFormat, m: int, response: str | None = None,
                 dcot: str | None = None, targets: str = "values", target_pad: str = ",") -> dict:
    """Token ids for one question: prompt (ending with the think marker), the DCoT, the answer tail
    (``[</think>] + answer + [eos]``, the model's own answer when ``response`` is given) and the per-slot latent
    targets (``target_ids`` and their chain step ``target_steps``, see :func:`latent_targets`)."""
    prompt = build_prompt(tok, problem["question"], "long", fmt)
    answer_text = response.split(fmt.think_end)[-1] if response and fmt.think_end in response else problem["answer"]
    end_id = tok.convert_tokens_to_ids(fmt.think_end)
    slots = latent_targets(problem, tok, m, targets, target_pad)
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
