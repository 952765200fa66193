"""AdaR1: streaming merge, bi-level preference pairs, DPO on the tiny model, and the Ray jobs (SFT, DPO, sampling)."""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from synadapt.adar1.merge import merge_checkpoints, pick_alpha
from synadapt.adar1.preferences import build_pairs, dedupe_against, normalize_question, prefers_long
from synadapt.models.tiny import TinyReasonerConfig, build_model, build_tokenizer

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def save_tiny(path, seed, dtype=torch.float32, max_shard_size=None, **overrides):
    """A random tiny reasoner with tokenizer; ``max_shard_size`` forces a sharded checkpoint with an index."""
    tok = build_tokenizer()
    model = build_model(tok, TinyReasonerConfig(**{**TINY, **overrides}, seed=seed)).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(path)
    return path


def tensors(model_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (single file or shards), read independently of the merge code."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def assert_bit_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert t.dtype == b[name].dtype and t.shape == b[name].shape, name
        assert torch.equal(bits(t), bits(b[name])), f"tensor {name} differs"


# ------------------------------------------------------------------------------------------------------ merge


def test_merge_endpoints_are_parents_and_half_is_mean(tmp_path):
    long_dir, short_dir = save_tiny(tmp_path / "long", 0), save_tiny(tmp_path / "short", 1)
    long_t, short_t = tensors(long_dir), tensors(short_dir)
    assert "lm_head.weight" not in long_t  # tied embeddings: the head is not stored
    for alpha, expected in ((1.0, long_t), (0.0, short_t)):
        merge_checkpoints(long_dir, short_dir, tmp_path / f"m{alpha}", alpha)
        assert_bit_equal(tensors(tmp_path / f"m{alpha}"), expected)
    out = tmp_path / "half"
    info = merge_checkpoints(long_dir, short_dir, out, 0.5)
    merged = tensors(out)
    mean = {n: (long_t[n].float() * 0.5 + short_t[n].float() * 0.5).to(long_t[n].dtype) for n in long_t}
    assert_bit_equal(merged, mean)
    assert not torch.equal(merged["model.embed_tokens.weight"], long_t["model.embed_tokens.weight"])
    assert info["tensors"] == len(long_t) and info["shards"] == 1
    # A loadable model directory with the long model's config and tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.embed_tokens.weight, mean["model.embed_tokens.weight"])
    assert AutoTokenizer.from_pretrained(out).encode("a=1;?a") == AutoTokenizer.from_pretrained(long_dir).encode("a=1;?a")
    assert (out / "generation_config.json").exists()


def test_streaming_merge_of_sharded_bf16_checkpoint_equals_in_memory_merge(tmp_path):
    long_dir = save_tiny(tmp_path / "long", 0, torch.bfloat16, max_shard_size="20KB")
    short_dir = save_tiny(tmp_path / "short", 1, torch.bfloat16)
    assert len(list(long_dir.glob("*.safetensors"))) > 2 and (long_dir / "model.safetensors.index.json").exists()
    # The short checkpoint stores its tied head explicitly, as some converters do; the merge must not mind.
    short_t = tensors(short_dir)
    short_t["lm_head.weight"] = short_t["model.embed_tokens.weight"].clone()
    save_file(short_t, short_dir / "model.safetensors", metadata={"format": "pt"})
    long_t = tensors(long_dir)
    alpha = 0.7
    expected = {n: (long_t[n].float() * alpha + short_t[n].float() * (1 - alpha)).to(torch.bfloat16) for n in long_t}
    out = tmp_path / "merged"
    info = merge_checkpoints(long_dir, short_dir, out, alpha, max_shard_bytes=12_000, chunk_bytes=512)
    assert info["shards"] > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(long_t)
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, framework="pt") as f:
            assert name in list(f.keys())
    assert_bit_equal(tensors(out), expected)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, expected["model.layers.1.mlp.down_proj.weight"])


def test_merge_refuses_mismatches_with_a_clear_error(tmp_path):
    long_dir = save_tiny(tmp_path / "long", 0)
    with pytest.raises(ValueError, match="intermediate_size"):
        merge_checkpoints(long_dir, save_tiny(tmp_path / "wide", 1, intermediate_size=96), tmp_path / "o1", 0.5)
    bad = save_tiny(tmp_path / "bad", 1)
    t = tensors(bad)
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape"):
        merge_checkpoints(long_dir, bad, tmp_path / "o2", 0.5)
    assert not (tmp_path / "o2" / "model.safetensors").exists()  # checked before anything is written
    del t["model.layers.0.mlp.up_proj.weight"]
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' is in the long model but not"):
        merge_checkpoints(long_dir, bad, tmp_path / "o3", 0.5)
    half = save_tiny(tmp_path / "half", 1, torch.bfloat16)
    with pytest.raises(ValueError, match="has dtype F32 in the long model but BF16"):
        merge_checkpoints(long_dir, half, tmp_path / "o4", 0.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        merge_checkpoints(long_dir, half, tmp_path / "o5", 1.5)


def test_pick_alpha_rule():
    rows = [{"alpha": 0.6, "accuracy": 0.9, "mean_generated_tokens": 10.0},
            {"alpha": 0.8, "accuracy": 0.95, "mean_generated_tokens": 20.0},
            {"alpha": 0.9, "accuracy": 0.95, "mean_generated_tokens": 18.0}]
    assert pick_alpha(rows)["alpha"] == 0.9
    assert pick_alpha(rows, acc_tolerance=0.05)["alpha"] == 0.6
    # Accuracy per token: 0.09 at 0.6 against 0.053 at 0.9; a tie goes to the larger alpha.
    assert pick_alpha(rows, rule="rel_g")["alpha"] == 0.6
    assert pick_alpha(rows + [{"alpha": 0.7, "accuracy": 0.45, "mean_generated_tokens": 5.0}], rule="rel_g")["alpha"] == 0.7
    from synadapt.adar1.merge import MergeConfig

    with pytest.raises(ValueError, match="unknown merge rule 'shortest'"):
        MergeConfig(rule="shortest")


# ------------------------------------------------------------------------------------------------ preferences


def group(prefix: str, spec: list[tuple[bool, int]]) -> list[dict]:
    return [{"text": f"{prefix}{i + 1}", "correct": c, "tokens": n} for i, (c, n) in enumerate(spec)]


def pairs_of(out: dict, level: str) -> list[tuple[str, str]]:
    return [(p["chosen"], p["rejected"]) for p in out["pairs"] if p["level"] == level]


def test_pairs_long_better():
    long = group("L", [(True, 10), (False, 12), (False, 16), (False, 9)])     # acc 0.25
    short = group("S", [(False, 2), (False, 3), (False, 4), (False, 5)])     # acc 0
    out = build_pairs(long, short, k=4, rng=random.Random(0))
    assert out["preferred"] == "long"
    assert sorted(pairs_of(out, "group")) == [("L1", "S1"), ("L1", "S2"), ("L1", "S3"), ("L1", "S4")]
    assert pairs_of(out, "instance") == [("L1", "L3"), ("L1", "L2")]  # the two longest wrong ones


def test_pairs_short_better_samples_m1_of_the_correct_vs_wrong_pairs():
    long = group("L", [(True, 10), (True, 12), (False, 16), (False, 14)])    # acc 0.5
    short = group("S", [(True, 3), (True, 2), (False, 4), (True, 5)])        # acc 0.75
    out = build_pairs(long, short, k=4, rng=random.Random(0))
    assert out["preferred"] == "short"
    grp = pairs_of(out, "group")
    allowed = {(c, r) for c in ("S1", "S2", "S4") for r in ("L3", "L4")}
    assert len(grp) == 4 and len(set(grp)) == 4 and set(grp) <= allowed
    assert pairs_of(out, "instance") == [("S2", "S3")]  # only one wrong response to reject
    assert out == build_pairs(long, short, k=4, rng=random.Random(0))  # deterministic given the rng


def test_pairs_all_correct_prefers_short_and_rejects_long_ones():
    long = group("L", [(True, 10), (True, 12), (True, 11), (True, 16)])
    short = group("S", [(True, 3), (True, 2), (True, 4), (True, 5)])
    out = build_pairs(long, short, k=4, rng=random.Random(1))
    assert out["preferred"] == "short" and out["acc_long"] == out["acc_short"] == 1.0
    grp = pairs_of(out, "group")
    assert len(set(grp)) == 4 and all(c.startswith("S") and r.startswith("L") for c, r in grp)
    assert pairs_of(out, "instance") == [("S2", "S4"), ("S2", "S3")]  # shortest vs the two longest


def test_pairs_all_wrong_are_dropped():
    out = build_pairs(group("L", [(False, 9)] * 4), group("S", [(False, 2)] * 4), k=4)
    assert out == {"preferred": None, "acc_long": 0.0, "acc_short": 0.0, "pairs": []}


def test_pairs_mixed_only_short_correct_and_identical_texts():
    long = group("L", [(False, 10), (False, 12), (False, 30), (False, 14)])
    short = [{"text": "same", "correct": True, "tokens": 3}, {"text": "same", "correct": True, "tokens": 3},
             {"text": "S3", "correct": False, "tokens": 7}, {"text": "S4", "correct": False, "tokens": 6}]
    out = build_pairs(long, short, k=4, m1=100, rng=random.Random(0))
    assert out["preferred"] == "short"
    # Two samples of one text make one candidate pair per rejected response, not two copies of it.
    assert sorted(pairs_of(out, "group")) == [("same", r) for r in ("L1", "L2", "L3", "L4")]
    assert pairs_of(out, "instance") == [("same", "S3"), ("same", "S4")]
    # A preferred group of identical correct answers gives no instance pair: there is nothing to prefer. A
    # rejected group of one wrong text gives one group-level pair, however large M1.
    out = build_pairs([{"text": "w", "correct": False, "tokens": 5}] * 4,
                      [{"text": "x", "correct": True, "tokens": 1}] * 4, k=4)
    assert pairs_of(out, "instance") == [] and pairs_of(out, "group") == [("x", "w")]


def test_instance_pairs_reject_distinct_texts():
    long = group("L", [(False, 9)] * 4)
    short = [{"text": "S1", "correct": True, "tokens": 2}, {"text": "long-wrong", "correct": False, "tokens": 9},
             {"text": "long-wrong", "correct": False, "tokens": 9}, {"text": "S4", "correct": False, "tokens": 5}]
    out = build_pairs(long, short, k=4, rng=random.Random(0))
    assert pairs_of(out, "instance") == [("S1", "long-wrong"), ("S1", "S4")]


def test_group_threshold_is_half_over_k():
    assert prefers_long(0.5, 0.25, k=4) and not prefers_long(0.5, 0.375, k=4)  # 0.125 is not > 1/(2K)
    assert prefers_long(0.5, 0.375, k=4, eps=0.1)


def test_dedupe_normalises_case_spacing_and_punctuation():
    assert normalize_question("  X = 3 ;\n?X ") == normalize_question("x=3;?x") == "x=3;?x"
    train = [{"id": "a", "question": "What is 2 + 2 ?"}, {"id": "b", "question": "What is 3+3?"}]
    kept, removed = dedupe_against(train, [{"question": "what is 2+2?"}])
    assert [p["id"] for p in kept] == ["b"] and [p["id"] for p in removed] == ["a"]


# ------------------------------------------------------------------------------------------------------ SFT


def test_sft_batches_are_padding_free_and_overlong_examples_are_counted(tiny_dir, tmp_path, caplog):
    from synadapt.adar1.train import SftConfig, TrainSettings, build_sft_trainer

    rows = [{"prompt": f"a={i};" * (1 + i % 3) + "?a<think>", "completion": f"^a={i}</think>{i}"} for i in range(6)]
    rows.append({"prompt": "a=1;" * 40 + "?a<think>", "completion": "</think>1"})  # 170 tokens
    cfg = SftConfig(model=tiny_dir, train=TrainSettings(max_length=64, per_device_batch_size=3, max_steps=1,
                                                        deepspeed_stage=0))
    with caplog.at_level(logging.WARNING):
        trainer = build_sft_trainer(cfg, rows, str(tmp_path / "work"))
    assert len(trainer.train_dataset) == 6 and "1 of 7 examples are longer than train.max_length 64" in caplog.text
    batch = next(iter(trainer.get_train_dataloader()))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert batch["input_ids"].shape[0] == 1 and len(starts) == 3  # three examples end to end, no pad token
    # Kept apart: the packed row's loss is the token-weighted mean of each example's loss run alone.
    model = trainer.model.eval()
    ends = starts[1:] + [batch["input_ids"].shape[1]]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
        parts = [(model(input_ids=batch["input_ids"][:, a:b], labels=batch["labels"][:, a:b]).loss,
                  (batch["labels"][0, a + 1:b] != -100).sum()) for a, b in zip(starts, ends)]
    alone = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_sft_rehearsal_continues_the_long_chain_from_its_first_token(tiny_dir):
    from synadapt.adar1.train import sft_examples
    from synadapt.data.source import DataSource
    from synadapt.data.task import TaskConfig
    from synadapt.models.lm import load_model

    _, tok = load_model(tiny_dir, device="cpu")
    problems = DataSource(limit=40).load(TaskConfig(short_format="ops_only"))
    rows, skipped = sft_examples(problems, tok, template="^{short_cot}{think_end}{answer}", rehearsal_share=1.0)
    assert skipped == 0 and [r["kind"] for r in rows] == ["short", "rehearsal"] * 40
    for p, short, rehearsal in zip(problems, rows[::2], rows[1::2]):
        # The first token of the long chain (its first variable) is prompt, so it is never scored: the model learns
        # to go on with a long chain, not to start one.
        assert rehearsal["prompt"] == short["prompt"] + p["long_cot"][0]
        assert rehearsal["prompt"] + rehearsal["completion"] == short["prompt"] + p["long_cot"] + "</think>" + p["answer"]
        assert short["completion"] == f"^{p['short_cot']}</think>{p['answer']}"
    half = [r["id"] for r in sft_examples(problems, tok, rehearsal_share=0.5)[0] if r["kind"] == "rehearsal"]
    assert 8 <= len(half) <= 32 and half == [r["id"] for r in sft_examples(problems, tok, rehearsal_share=0.5)[0]
                                             if r["kind"] == "rehearsal"]  # chosen by id: the same every time
    assert all(r["kind"] == "short" for r in sft_examples(problems, tok)[0])
    with pytest.raises(ValueError, match="rehearsal_share must be in"):
        sft_examples(problems, tok, rehearsal_share=1.5)


# ------------------------------------------------------------------------------------------------------ DPO


def completion_logps(model, tok, rows: list[dict]) -> torch.Tensor:
    """Summed log-probabilities of each completion (with EOS, as TRL trains it) given its prompt."""
    out = []
    for r in rows:
        for key in ("chosen", "rejected"):
            p = tok.encode(r["prompt"], add_special_tokens=False)
            c = tok.encode(r[key] + tok.eos_token, add_special_tokens=False)
            ids = torch.tensor([p + c])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1)
            out.append(logp[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum())
    return torch.stack(out).view(-1, 2)


def test_dpo_raises_the_chosen_vs_rejected_margin(tiny_dir, tmp_path):
    from synadapt.adar1.train import DpoConfig, TrainSettings, build_dpo_trainer

    rows = [{"prompt": f"a={i};?a<think>", "chosen": f"</think>{i}", "rejected": f"a={i},b+1={(i + 1) % 10}</think>7"}
            for i in range(8)]
    cfg = DpoConfig(model=tiny_dir, train=TrainSettings(learning_rate=1e-3, max_steps=6, per_device_batch_size=4,
                                                        grad_accum=1, deepspeed_stage=0, logging_steps=1,
                                                        save_steps=100))
    trainer = build_dpo_trainer(cfg, rows, str(tmp_path / "work"))
    before = completion_logps(trainer.model.eval(), trainer.processing_class, rows)
    # precompute_ref: no frozen copy of the model; the reference log-probs are the merged model's, computed once
    assert trainer.ref_model is None
    ref = torch.tensor([trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]]).T
    torch.testing.assert_close(ref, before, atol=1e-4, rtol=1e-5)
    trainer.train()
    after = completion_logps(trainer.model.eval(), trainer.processing_class, rows)
    m_before, m_after = ((lp[:, 0] - lp[:, 1]).mean().item() for lp in (before, after))
    assert m_after > m_before + 1.0, (m_before, m_after)
    assert trainer.state.log_history[-2]["rewards/margins"] > 0


def test_dpo_sft_weight_adds_the_chosen_nll(tiny_dir, tmp_path):
    from synadapt.adar1.train import DpoConfig, TrainSettings, build_dpo_trainer

    rows = [{"prompt": f"a={i};?a<think>", "chosen": f"^a={i}</think>{i}", "rejected": f"a={i},a={i}</think>{i}"}
            for i in range(8)]
    chosen = {}
    for weight in (0.0, 1.0):
        cfg = DpoConfig(model=tiny_dir, sft_weight=weight, precompute_ref=False,  # TRL's frozen copy as reference
                        train=TrainSettings(learning_rate=1e-3, max_steps=6, per_device_batch_size=4, grad_accum=1,
                                            deepspeed_stage=0, logging_steps=1, save_steps=100))
        trainer = build_dpo_trainer(cfg, rows, str(tmp_path / f"work{weight}"))
        assert trainer.args.loss_type == (["sigmoid", "sft"] if weight else ["sigmoid"])
        assert trainer.ref_model is not None
        trainer.train()
        chosen[weight] = completion_logps(trainer.model.eval(), trainer.processing_class, rows)[:, 0].mean().item()
    assert chosen[1.0] > chosen[0.0] + 0.5, chosen  # the NLL term holds the chosen response up


# ---------------------------------------------------------------------------------------------- Ray jobs


def test_sft_job_on_ray_with_deepspeed(ray_session, tiny_dir, tmp_path):
    from jobs.train_sft import run_sft
    from synadapt.adar1.train import SftConfig, TrainSettings
    from synadapt.data.source import DataSource
    from synadapt.data.task import TaskConfig
    from synadapt.models.lm import load_model

    cfg = SftConfig(model=tiny_dir, output_dir=str(tmp_path / "short"), data=DataSource(limit=24), short_format="ops",
                    train=TrainSettings(max_steps=2, per_device_batch_size=4, save_steps=100, logging_steps=1))
    out = run_sft(cfg)
    rows = [json.loads(line) for line in (tmp_path / "short" / "sft_data.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[0]["prompt"].endswith("<think>") and "</think>" in rows[0]["completion"]
    ops = {p["id"]: p for p in DataSource(limit=24).load(TaskConfig(short_format="ops"))}
    assert all(r["completion"].startswith(ops[r["id"]]["short_cot"] + "</think>") for r in rows)  # not var_values
    info = json.loads((tmp_path / "short" / "train_info.json").read_text())
    assert info["metrics"]["step"] == 2
    assert info["metrics"]["distributed_type"] == "DEEPSPEED" and info["metrics"]["num_processes"] == 2
    model, _ = load_model(out, device="cpu")
    base, _ = load_model(tiny_dir, device="cpu")
    assert not torch.equal(model.model.norm.weight, base.model.norm.weight)  # it trained
    assert not (tmp_path / "short" / "optimizer.pt").exists() and (tmp_path / "short" / "tokenizer_config.json").exists()


def test_dpo_job_on_ray_with_deepspeed_resumes(ray_session, tiny_dir, tmp_path):
    from jobs.train_dpo import run_dpo
    from jobs.train_sft import check_checkpoint_complete
    from synadapt.adar1.train import DpoConfig, TrainSettings
    from synadapt.data.problems import write_jsonl

    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"a={i};?a<think>", "chosen": f"</think>{i}",
                                           "rejected": f"a={i}</think>{(i + 3) % 10}", "level": "group"}
                                          for i in range(8)])
    cfg = DpoConfig(model=tiny_dir, pairs=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / "dpo"),
                    train=TrainSettings(learning_rate=1e-3, max_steps=2, per_device_batch_size=2, grad_accum=1,
                                        save_steps=2, logging_steps=1, storage_path=str(tmp_path / "ray")))
    run_dpo(cfg)
    first = json.loads((tmp_path / "dpo" / "train_info.json").read_text())["metrics"]
    assert first["step"] == 2 and first["resumed_from_step"] == 0 and "rewards/margins" in first
    assert first["distributed_type"] == "DEEPSPEED"
    persisted = sorted((tmp_path / "ray" / "dpo").glob("checkpoint_*/checkpoint"))
    assert persisted, "no checkpoint reached Ray Train storage"
    for ckpt in persisted:  # every rank's files, whole, in what a resume will read
        check_checkpoint_complete(str(ckpt), world_size=2)
    cfg.train.max_steps = 3  # the same run name and storage: continues from the step-2 checkpoint
    run_dpo(cfg)
    second = json.loads((tmp_path / "dpo" / "train_info.json").read_text())["metrics"]
    assert second["step"] == 3 and second["resumed_from_step"] == 2


def test_incomplete_trainer_checkpoint_is_refused_by_name(tmp_path):
    from jobs.train_sft import check_checkpoint_complete

    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "rng_state_0.pth").write_bytes(b"x")
    check_checkpoint_complete(str(tmp_path), world_size=1)
    with pytest.raises(ValueError, match=r"rng_state_1\.pth \(missing\)"):
        check_checkpoint_complete(str(tmp_path), world_size=2)
    (tmp_path / "rng_state_1.pth").touch()  # what a rank still writing leaves behind
    with pytest.raises(ValueError, match=r"incomplete: rng_state_1\.pth$"):
        check_checkpoint_complete(str(tmp_path), world_size=2)


def test_build_preferences_job_samples_grades_and_pairs(ray_session, tiny_dir, tmp_path):
    from jobs.build_preferences import run_build_preferences
    from synadapt.adar1.preferences import PreferenceConfig
    from synadapt.data.source import DataSource
    from synadapt.models.lm import GenerationConfig

    short_dir = save_tiny(tmp_path / "short", 1)
    cfg = PreferenceConfig(long_model=tiny_dir, short_model=str(short_dir), output_dir=str(tmp_path / "prefs"),
                           data=DataSource(limit=6), k=3, batch_size=3, concurrency=1,
                           generation=GenerationConfig(max_new_tokens=24, temperature=0.6, top_p=0.95))
    stats = run_build_preferences(cfg)
    from jobs.common import read_parquet_rows

    samples = read_parquet_rows(str(tmp_path / "prefs" / "samples"))
    assert len(samples) == 6 and all(len(s["long_text"]) == len(s["short_correct"]) == 3 for s in samples)
    assert stats["questions"] == 6 == stats["prefer_long"] + stats["prefer_short"] + stats["dropped_both_zero"]
    pairs = [json.loads(line) for line in (tmp_path / "prefs" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == stats["pairs"] == sum(stats["pairs_by_level"].values())
    for p in pairs:  # every pair is recomputable from the stored samples
        s = next(s for s in samples if s["id"] == p["question_id"])
        assert p["prompt"].endswith("<think>") and p["chosen"] != p["rejected"]
        texts = s["long_text"] + s["short_text"]
        assert p["chosen"] in texts and p["rejected"] in texts
    assert json.loads((tmp_path / "prefs" / "stats.json").read_text())["pairs"] == len(pairs)


def test_merge_sweep_job_picks_alpha_on_validation(ray_session, tiny_dir, tmp_path):
    from jobs.merge import run_merge
    from synadapt.adar1.merge import MergeConfig
    from synadapt.data.source import DataSource
    from synadapt.models.lm import GenerationConfig

    cfg = MergeConfig(long_model=tiny_dir, short_model=str(save_tiny(tmp_path / "short", 1)),
                      output_dir=str(tmp_path / "merged"), sweep=[0.5, 1.0], val=DataSource(split="val", limit=6),
                      generation=GenerationConfig(max_new_tokens=16))
    out = run_merge(cfg)
    sweep = json.loads((tmp_path / "merged" / "sweep.json").read_text())
    assert [r["alpha"] for r in sweep["results"]] == [0.5, 1.0] and sweep["validation_questions"] == 6
    assert sweep["best_alpha"] == pick_alpha(sweep["results"])["alpha"]
    assert json.loads((tmp_path / "merged" / "merge_info.json").read_text())["alpha"] == sweep["best_alpha"]
    assert not (tmp_path / "merged-sweep").exists() and out == str(tmp_path / "merged")
