"""Evaluate a model on problems in one of the plain generation modes (long CoT, NoThinking, concise)."""
from __future__ import annotations

from synadapt.data.grading import grade
from synadapt.models.lm import GenerationConfig, PromptFormat, build_prompt, generate


def evaluate_generation(model, tok, problems: list[dict], mode: str, gen: GenerationConfig = GenerationConfig(),
                        fmt: PromptFormat = PromptFormat()) -> list[dict]:
    """Generate for every problem in ``mode`` and grade it; one record per problem, in order."""
    prompts = [build_prompt(tok, p["question"], mode, fmt) for p in problems]
    records = []
    for p, g in zip(problems, generate(model, tok, prompts, gen)):
        # In NoThinking mode the closing marker sits in the prompt, so the whole completion is the answer.
        correct, pred = grade(g.text if mode != "nothink" else fmt.think_end + g.text, p["answer"], fmt.think_end)
        records.append({"id": p["id"], "difficulty": p.get("difficulty"), "mode": mode, "response": g.text,
                        "prediction": pred, "correct": correct, "generated_tokens": g.generated_tokens,
                        "forward_positions": g.forward_positions, "seconds": g.seconds})
    return records
