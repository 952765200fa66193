"""SynAdapt core on a tiny random Qwen2: synthesis, refinement, classifier, adaptive routing."""
import pytest
import torch

from synadapt.data.task import TaskConfig, sample_problems
from synadapt.latent.classifier import (ClassifierConfig, best_threshold, calibrate_tau,
                                        f1_hard, train_classifier)
from synadapt.latent.examples import make_example
from synadapt.latent.reasoner import AdaptiveReasoner
from synadapt.latent.refiner import Refiner, RefinerConfig, train_refiner
from synadapt.latent.synthesis import SynthesisConfig, synthesize_latents
from synadapt.models.lm import PromptFormat, load_model


@pytest.fixture(scope="module")
def responsive_dir(tmp_path_factory):
    """A random tiny Qwen2 with large weights: at the default 0.02 init its output barely depends on its input,
    so no latent could steer it; with std 0.3 it behaves like a trained model in that respect."""
    from synadapt.models.tiny import TinyReasonerConfig, build_model, build_tokenizer

    d = tmp_path_factory.mktemp("responsive")
    tok = build_tokenizer()
    model = build_model(tok, TinyReasonerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture()
def setup(tiny_dir):
    model, tok = load_model(tiny_dir)
    problems = sample_problems(0, 2, TaskConfig(levels=3))
    return model, tok, problems, [make_example(p, tok, PromptFormat(), 4) for p in problems]


def test_synthesis_optimises_only_z_and_the_frozen_model_reads_the_answer(responsive_dir, tmp_path):
    model, tok = load_model(responsive_dir)
    problems = sample_problems(0, 2, TaskConfig(levels=3))
    examples = [make_example(p, tok, PromptFormat(), 4) for p in problems]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recs = synthesize_latents(model, tok, examples, SynthesisConfig(m=4, max_steps=150, min_steps=3, lr=0.05, norm_scale=3.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert [r["id"] for r in recs] == [p["id"] for p in problems]
    assert sum(r["converged"] for r in recs) >= len(recs) - 1
    assert all(r["steps"] >= 3 for r in recs)
    assert all(r["shape"] == [4, model.config.hidden_size] and r["loss_dcot"] >= 0 for r in recs)
    # Independent check: decode from each converged Z_syn with the frozen model through the inference path.
    run = AdaptiveReasoner.init_untrained(responsive_dir, str(tmp_path / "run"))
    reasoner = AdaptiveReasoner.load(run)
    z = torch.tensor([r["z"] for r in recs])
    answers = reasoner.answer_from_latents([e["prompt_ids"] for e in examples], z, max_new_tokens=4)
    for r, a, p in zip(recs, answers, problems):
        if r["converged"]:
            assert a["text"] == p["answer"], (a, p)


def test_refiner_loss_decreases_and_save_load_round_trips(setup, tmp_path):
    model, tok, problems, examples = setup
    for e in examples:
        e["z_syn"] = torch.randn(4, model.config.hidden_size).tolist()
    cfg = RefinerConfig(m=4, n_passes=2, lambda_step=1.0, lr=3e-3, batch_size=len(examples), train_seconds=1e9, max_steps=40)
    refiner = Refiner(model, cfg, tok.convert_tokens_to_ids("."))
    from synadapt.latent.examples import collate

    batch = collate(examples)
    first = refiner.loss(batch)[0].item()
    stats = train_refiner(refiner, examples, cfg, log_every=1000)
    assert stats["steps"] == 40 and refiner.loss(batch)[0].item() < 0.8 * first
    refiner.save(tmp_path / "refiner")
    fresh, _ = load_model(model.name_or_path)
    loaded = Refiner.load(fresh, tmp_path / "refiner")
    prompts = [e["prompt_ids"] for e in examples]
    with torch.no_grad():
        assert torch.equal(refiner.eval().refine(prompts)[0], loaded.refine(prompts)[0])
    assert (tmp_path / "refiner" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_batched_refinement_equals_one_by_one(setup, mode):
    model, tok, _, examples = setup
    refiner = Refiner(model, RefinerConfig(m=3, n_passes=3, mode=mode), tok.convert_tokens_to_ids(".")).eval()
    prompts = [e["prompt_ids"] for e in examples]
    with torch.no_grad():
        z, feats, cost = refiner.refine(prompts)
        for i, p in enumerate(prompts):
            zi, fi, ci = refiner.refine([p])
            torch.testing.assert_close(z[i], zi[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(feats[i], fi[0], atol=1e-5, rtol=1e-4)
            assert int(cost[i]) == int(ci[0])


def test_cached_parallel_passes_equal_full_sequence_passes(setup):
    """Reusing the prompt's keys/values across passes must give what re-running ``[prompt; Z]`` every pass gives."""
    from synadapt.latent.sequence import splice

    model, tok, _, examples = setup
    torch.manual_seed(0)
    refiner = Refiner(model, RefinerConfig(m=3, n_passes=3), tok.convert_tokens_to_ids(".")).eval()
    with torch.no_grad():  # LoRA B starts at zero: perturb it so the adapted model differs from the base
        for name, p in refiner.adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    prompts = [e["prompt_ids"] for e in examples]
    with torch.no_grad():
        z, _, cost = refiner.refine(prompts)
        ref = refiner.embed(torch.tensor([refiner.draft_id])).expand(len(prompts), 3, -1)
        for _ in range(3):
            s = splice(refiner.embed, prompts, ref, None, model.config.pad_token_id)
            h = refiner.adapted(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                                position_ids=s.position_ids, output_hidden_states=True).hidden_states[-1]
            ref = refiner._project(h[:, s.latent_start:s.tail_start])
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-4)
    assert cost.tolist() == [len(p) + 3 * 3 for p in prompts]


def test_classifier_beats_chance_on_a_separable_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    hard = (x[:, 0] + 0.5 * x[:, 1] > 0.3).float()
    clf = train_classifier(x[:300], hard[:300], ClassifierConfig(hidden=32, epochs=300, lr=1e-2))
    scores = clf.score(x[300:])
    assert f1_hard(scores, hard[300:]) > 0.85
    assert f1_hard(torch.rand(100, generator=g), hard[300:]) < 0.7  # the metric itself is not trivially high
    assert 0 <= best_threshold(scores, hard[300:]) <= 1
    tau = calibrate_tau(scores, 0.25)
    assert abs((scores >= tau).float().mean().item() - 0.25) < 0.05
    with pytest.raises(ValueError, match="rethink_share"):
        calibrate_tau(scores, 1.5)


def test_routing_honours_tau_and_mode(tiny_dir, tmp_path):
    run = AdaptiveReasoner.init_untrained(tiny_dir, str(tmp_path / "run"))
    reasoner = AdaptiveReasoner.load(run)
    qs = [p["question"] for p in sample_problems(1, 2, TaskConfig(levels=2))]
    from synadapt.models.lm import GenerationConfig

    gen = GenerationConfig(max_new_tokens=4)
    assert {r["route"] for r in reasoner.answer(qs, "auto", tau=0.0, gen=gen)} == {"long"}
    never = reasoner.answer(qs, "auto", tau=1.0, gen=gen)
    assert {r["route"] for r in never} == {"latent"} and all(r["score"] is not None for r in never)
    assert {r["route"] for r in reasoner.answer(qs, "latent", tau=0.0, gen=gen)} == {"latent"}
    assert {r["route"] for r in reasoner.answer(qs, "long", gen=gen)} == {"long"}
    # Re-thinking is plain generation with the base weights: the refiner's LoRA must be off for it.
    from synadapt.models.lm import build_prompt, generate

    with torch.no_grad():  # a trained adapter is non-zero; a fresh one (lora_B = 0) would hide the bug
        for name, p in reasoner.refiner.adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    plain, tok = load_model(tiny_dir)
    expected = generate(plain, tok, [build_prompt(tok, q, "concise") for q in qs], gen)
    assert [r["text"] for r in reasoner.answer(qs, "long", gen=gen)] == [g.text for g in expected]
    control = reasoner.answer(qs, "auto", tau=1.0, gen=gen, easy_route="nothink")
    assert {r["route"] for r in control} == {"latent"} and all(r["text"].startswith("</think>") for r in control)
    with pytest.raises(ValueError, match="unknown reasoning mode"):
        reasoner.answer(qs, "fast")
    # Batched routing equals question-by-question routing.
    batched = reasoner.latent_route(qs, [0.5] * len(qs), ["auto"] * len(qs), max_new_tokens=4)
    single = [reasoner.latent_route([q], [0.5], ["auto"], max_new_tokens=4)[0] for q in qs]
    assert [(b["route"], b["text"]) for b in batched] == [(s["route"], s["text"]) for s in single]
    assert [b["score"] for b in batched] == pytest.approx([s["score"] for s in single], abs=1e-5)


def test_run_without_classifier_serves_latent_but_refuses_auto_clearly(tiny_dir, tmp_path):
    import shutil

    run = AdaptiveReasoner.init_untrained(tiny_dir, str(tmp_path / "run"))
    shutil.rmtree(tmp_path / "run" / "classifier")
    reasoner = AdaptiveReasoner.load(run)
    qs = [p["question"] for p in sample_problems(2, 1, TaskConfig(levels=2))]
    assert {r["route"] for r in reasoner.latent_route(qs, [0.5] * len(qs), ["latent"] * len(qs), 4)} == {"latent"}
    with pytest.raises(ValueError, match="needs a difficulty classifier"):
        reasoner.latent_route(qs, [0.5] * len(qs), ["auto"] * len(qs), 4)
