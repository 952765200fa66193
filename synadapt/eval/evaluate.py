"""Evaluate a model on problems in one of the plain generation modes (long CoT, NoThinking, concise)."""
from __future__ import annotations

from synadapt.data.grading import grade
from synadapt.models.lm import Generation, GenerationConfig, PromptFormat, build_prompt, generate


def evaluate_generation(model, tok, problems: list[dict], mode: str, gen: GenerationConfig = GenerationConfig(),
                        fmt: PromptFormat = PromptFormat()) -> list[dict]:
    """Generate for every problem in ``mode`` and grade it; one record per problem, in order."""
    prompts = [build_prompt(tok, p["question"], mode, fmt) for p in problems]
    return [generation_record(p, g, mode, fmt) for p, g in zip(problems, generate(model, tok, prompts, gen))]


def generation_record(problem: dict, g: Generation, mode: str, fmt: PromptFormat) -> dict:
    """The graded record of one generation ``g`` (from either backend) for ``problem`` in ``mode``."""
    # In NoThinking mode the closing marker sits in the prompt, so the whole completion is the answer.
    correct, pred = grade(g.text if mode != "nothink" else fmt.think_end + g.text, problem["answer"], fmt.think_end)
    return {"id": problem["id"], "difficulty": problem.get("difficulty"), "mode": mode, "response": g.text,
            "prediction": pred, "correct": correct, "generated_tokens": g.generated_tokens,
            "forward_positions": g.forward_positions, "seconds": g.seconds}


def evaluate_adaptive(reasoner, problems: list[dict], mode: str = "auto", tau: float = 0.5,
                      gen: GenerationConfig = GenerationConfig(), latents: str = "refined",
                      easy_route: str = "latent") -> list[dict]:
    """Run an :class:`~synadapt.latent.reasoner.AdaptiveReasoner` on every problem and grade it.

    Records carry the evaluate_generation fields plus ``route`` and ``score``; ``seconds`` sums every stage.
    """
    results = reasoner.answer([p["question"] for p in problems], mode, tau, gen, latents, easy_route)
    records = []
    for p, r in zip(problems, results):
        correct, pred = grade(r["text"] or "", p["answer"], reasoner.fmt.think_end)
        records.append({"id": p["id"], "difficulty": p.get("difficulty"), "mode": mode, "response": r["text"],
                        "prediction": pred, "correct": correct, "generated_tokens": r["generated_tokens"],
                        "forward_positions": r["forward_positions"], "seconds": sum(r["seconds"].values()),
                        "route": r["route"], "score": r["score"]})
    return records
