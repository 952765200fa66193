"""Turning problems, DCoT records and synthesised latents into the token-level examples the latent stages train on."""
from __future__ import annotations

import random

import torch

from synadapt.models.lm import PromptFormat, build_prompt


def latent_targets(problem: dict, tok, m: int) -> list[int] | None:
    """Per-latent target tokens from the problem's intermediate results, padded with the last one to ``m``.

    Intermediate results come from ``latent_targets`` (a list or comma-separated string) or, on the embedded task,
    from ``short_cot`` (the value after each step). Each result is represented by its first token.
    """
    raw = problem.get("latent_targets") or problem.get("short_cot")
    if not raw:
        return None
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    ids = [tok.encode(str(x).strip(), add_special_tokens=False)[0] for x in items if str(x).strip()][:m]
    return ids + [ids[-1]] * (m - len(ids)) if ids else None


def make_example(problem: dict, tok, fmt: PromptFormat, m: int, response: str | None = None,
                 dcot: str | None = None) -> dict:
    """Token ids for one question: prompt (ending with the think marker), the DCoT, the answer tail
    (``[</think>] + answer + [eos]``, the model's own answer when ``response`` is given) and latent targets."""
    prompt = build_prompt(tok, problem["question"], "long", fmt)
    answer_text = response.split(fmt.think_end)[-1] if response and fmt.think_end in response else problem["answer"]
    end_id = tok.convert_tokens_to_ids(fmt.think_end)
    return {
        "id": problem["id"],
        "difficulty": problem.get("difficulty"),
        "prompt_ids": tok.encode(prompt, add_special_tokens=False),
        "dcot_ids": tok.encode(dcot if dcot is not None else problem.get("long_cot") or "", add_special_tokens=False),
        "answer_ids": tok.encode(answer_text, add_special_tokens=False) + [tok.eos_token_id],
        "tail_ids": [end_id] + tok.encode(answer_text, add_special_tokens=False) + [tok.eos_token_id],
        "target_ids": latent_targets(problem, tok, m),
    }


def collate(examples: list[dict], device=None) -> dict:
    """A refiner training batch: id lists stay lists (they are spliced), tensors are stacked."""
    batch = {"prompt_ids": [e["prompt_ids"] for e in examples], "tail_ids": [e["tail_ids"] for e in examples],
             "z_syn": None, "target_ids": None}
    if all(e.get("z_syn") is not None for e in examples):
        batch["z_syn"] = torch.stack([torch.as_tensor(e["z_syn"], dtype=torch.float32) for e in examples]).to(device)
    if all(e.get("target_ids") is not None for e in examples):
        batch["target_ids"] = torch.tensor([e["target_ids"] for e in examples], device=device)
    return batch


def batches(examples: list[dict], batch_size: int, seed: int = 0):
    """Endless shuffled batches (epoch after epoch)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]
