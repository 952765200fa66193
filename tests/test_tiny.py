import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from synadapt.data.task import TaskConfig, sample_problems
from synadapt.models.tiny import (TinyReasonerConfig, build_model, build_tokenizer, encode_batch,
                                  SHORT_MARKER, ensure_tiny_reasoner, training_text)


def test_tokenizer_round_trip_and_chat_template(tiny_dir):
    tok = build_tokenizer()
    p = sample_problems(0, 1, TaskConfig(levels=3))[-1]
    text = "".join(training_text(p, direct=False))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<think>") in ids and tok.convert_tokens_to_ids("</think>") in ids
    # Reloading through AutoTokenizer (what every later stage does) keeps ids and decoding identical.
    auto = AutoTokenizer.from_pretrained(tiny_dir)
    assert auto.encode(text) == ids and auto.decode(ids) == text
    assert auto.padding_side == "left"
    prompt = auto.apply_chat_template([{"role": "user", "content": p["question"]}], add_generation_prompt=True,
                                      tokenize=False)
    assert prompt == p["question"] + "<think>"


def test_direct_examples_score_only_the_answer_so_the_model_never_learns_to_skip_thinking():
    tok = build_tokenizer()
    p = sample_problems(0, 1, TaskConfig(levels=2))[-1]
    batch = encode_batch(tok, [training_text(p, direct=True), training_text(p, direct=False)])
    direct, long = [[t for t in row.tolist() if t != -100] for row in batch["labels"]]
    assert tok.decode(direct) == p["answer"] + "<|endoftext|>"  # the prefilled <think></think> is not a target
    # The compact format is asked for by the marker in the (unscored) prompt: a plain <think> stays long CoT.
    prompt, completion = training_text(p, direct=False, short=True)
    assert prompt == p["question"] + "<think>" + SHORT_MARKER
    assert completion == p["short_cot"] + "</think>" + p["answer"] + "<|endoftext|>"
    assert tok.decode(long) == p["long_cot"] + "</think>" + p["answer"] + "<|endoftext|>"


def test_model_save_and_auto_load(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    enc = tok(["a=1;?a<think>"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3


def test_short_training_lowers_the_loss():
    tok = build_tokenizer()
    model = build_model(tok, TinyReasonerConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    batch = encode_batch(tok, [training_text(p, False) for p in sample_problems(1, 8, TaskConfig(levels=2))])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(**batch).loss.item()
    for _ in range(30):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_ensure_trains_once_then_reuses(tmp_path):
    cfg = TinyReasonerConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, train_seconds=2,
                             batch_size=8)
    task = TaskConfig(levels=2, test_per_level=5, val_per_level=5, train_per_level=5)
    first = ensure_tiny_reasoner(tmp_path, cfg, task)
    assert first["main"]["steps"] > 0 and (tmp_path / "model.safetensors").exists()
    mtime = (tmp_path / "model.safetensors").stat().st_mtime
    assert ensure_tiny_reasoner(tmp_path, cfg, task) == first
    assert (tmp_path / "model.safetensors").stat().st_mtime == mtime
