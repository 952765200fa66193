import pytest
from transformers import AutoTokenizer

from synadapt.data.task import TaskConfig, sample_problems
from synadapt.eval.evaluate import evaluate_generation
from synadapt.models.lm import GenerationConfig, PromptFormat, build_prompt, generate, load_model

R1_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
               "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def test_prompts_for_toy_and_r1_templates(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert build_prompt(tok, "a=1;?a", "long") == "a=1;?a<think>"
    assert build_prompt(tok, "a=1;?a", "nothink") == "a=1;?a<think></think>"
    tok.chat_template = R1_TEMPLATE
    long = build_prompt(tok, "What is 1+1?", "long")
    assert long.endswith("<｜Assistant｜><think>\n") and long.count("<think>") == 1
    fmt = PromptFormat(nothink_prefill="Okay, I think I have finished thinking.\n")
    assert build_prompt(tok, "q", "nothink", fmt).endswith("<think>\nOkay, I think I have finished thinking.\n</think>")
    concise = build_prompt(tok, "q", "concise")
    assert PromptFormat().concise_instruction in concise and concise.endswith("<｜User｜>q<｜Assistant｜><think>\n")
    with pytest.raises(ValueError, match="unknown prompt mode"):
        build_prompt(tok, "q", "fast")


def test_batched_generation_matches_one_by_one_and_counts_costs(tiny_dir):
    model, tok = load_model(tiny_dir)
    assert str(model.device) == "cpu" and model.dtype.is_floating_point
    problems = sample_problems(3, 2, TaskConfig(levels=3))
    prompts = [build_prompt(tok, p["question"], "long") for p in problems]
    cfg = GenerationConfig(max_new_tokens=12, batch_size=8)
    batched = generate(model, tok, prompts, cfg)
    single = [generate(model, tok, [p], cfg)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    for g, p in zip(batched, prompts):
        assert g.prompt_tokens == len(tok.encode(p))
        assert 1 <= g.generated_tokens <= 12
        assert g.forward_positions == g.prompt_tokens + g.generated_tokens and g.seconds > 0


def test_evaluation_modes_record_every_question(tiny_dir):
    model, tok = load_model(tiny_dir)
    problems = sample_problems(4, 2, TaskConfig(levels=2))
    for mode in ("long", "nothink", "concise"):
        recs = evaluate_generation(model, tok, problems, mode, GenerationConfig(max_new_tokens=6))
        assert [r["id"] for r in recs] == [p["id"] for p in problems]
        assert all(isinstance(r["correct"], bool) and r["mode"] == mode for r in recs)
