"""The serving graph end to end: a real Ray Serve app on the tiny model, real HTTP on 127.0.0.1.

One app is deployed for the whole module (about 25 s to ready on 2 cores); the replica-kill test runs last.
"""
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml

from serve.app import build_app
from serve.deployments import resolve_run_dir
from serve.schemas import holdback, split_reasoning, trim_stops

PORT = 8763
KEY = "test-key-4f1c"
KEY_ENV = "SYNADAPT_TEST_API_KEY"
ROOT = f"http://127.0.0.1:{PORT}"
QUESTION = "m=4;y=m+7;?y"
CONFIG = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"


def test_answer_text_helpers():
    assert trim_stops("a=1;b=2", ["b", ";"]) == ("a=1", True)
    assert trim_stops("a=1", ["x"]) == ("a=1", False)
    assert holdback("abc</th", ["</think>"]) == 4 and holdback("abc", ["</think>"]) == 0
    assert split_reasoning("m=4,y=11</think> 11", "</think>") == ("m=4,y=11", "11")
    assert split_reasoning("m=4,y=", "</think>") == ("m=4,y=", "")


def test_config_yaml_is_a_valid_serve_config(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    conf = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(conf)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app" and schema.http_options.host == "127.0.0.1"
    assert {d["name"] for d in conf["applications"][0]["deployments"]} == {"Ingress", "LatentReasoner", "LongCoT"}
    run = tmp_path / "runs" / "reasoner"
    (run / "refiner").mkdir(parents=True)
    (run / "reasoner.json").write_text("{}")
    (tmp_path / "runs" / "stages").mkdir()
    (tmp_path / "runs" / "stages" / "reasoner.json").write_text("{}")  # a pipeline stage marker, not a run
    assert resolve_run_dir(str(tmp_path / "runs")) == str(run)  # the one run below the dir given is found
    graph = build_app({**app.args, "run_dir": str(run), "deployments": conf["applications"][0]["deployments"]})
    assert graph is not None
    with pytest.raises(ValueError, match="unknown config key 'tau_x'"):
        build_app({**app.args, "run_dir": str(run), "tau_x": 1})
    with pytest.raises(ValueError, match="unknown deployment 'Router'"):
        build_app({"run_dir": str(run), "deployments": [{"name": "Router"}]})
    with pytest.raises(FileNotFoundError, match="no reasoner.json"):
        resolve_run_dir(str(tmp_path / "nowhere"))
    for d in conf["applications"][0]["deployments"]:  # a downscale lets every request in flight finish
        assert d["graceful_shutdown_timeout_s"] > app.args["request_timeout_s"], d["name"]
    with pytest.raises(ValueError, match=r"max_inflight_requests \(600\) must be below .* \(512\)"):
        build_app({"run_dir": str(run), "max_inflight_requests": 600,
                   "deployments": [{"name": "Ingress", "max_ongoing_requests": 512}]})


def test_batcher_starts_a_lone_request_at_once_and_batches_what_queues_meanwhile():
    import asyncio

    from serve.deployments import Batcher

    batches = []

    def work(items):
        batches.append(items)
        time.sleep(0.3)
        if "boom" in items:
            raise RuntimeError("boom")
        return [f"{x}!" for x in items]

    async def scenario():
        batcher = Batcher(work, max_batch_size=3, key=lambda x: x[0])  # a batch shares its items' first letter
        first = asyncio.create_task(batcher.submit("a1"))
        await asyncio.sleep(0.1)  # a1 runs alone; these queue while it runs
        rest = [asyncio.create_task(batcher.submit(x)) for x in ("a2", "b1", "a3", "gone", "a4", "a5")]
        await asyncio.sleep(0)
        rest.pop(3).cancel()  # a caller that gave up is dropped from the queue
        assert await asyncio.gather(first, *rest) == ["a1!", "a2!", "b1!", "a3!", "a4!", "a5!"]
        with pytest.raises(RuntimeError, match="boom"):  # a failed batch fails its callers, and only them
            await batcher.submit("boom")
        assert await batcher.submit("c1") == "c1!" and batcher.batch_started is None

    asyncio.run(scenario())
    assert batches == [["a1"], ["a2", "a3", "a4"], ["b1"], ["a5"], ["boom"], ["c1"]]


def _test_config(path: Path) -> str:
    """serve/config.yaml with small limits, tight LongCoT queues, auth on and tiny CPU shares."""
    conf = yaml.safe_load(CONFIG.read_text())
    app = conf["applications"][0]
    app["args"].update(api_key_env=KEY_ENV, debug_routes=True, request_timeout_s=60, max_inflight_requests=8,
                       limits={"max_prompt_chars": 200, "max_prompt_tokens": 100, "max_tokens": 64,
                               "default_max_tokens": 16},
                       latent_batch={"max_batch_size": 4}, long_batch={"max_batch_size": 2})
    one = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2}
    for d in app["deployments"]:
        d["autoscaling_config"] = one
        d["ray_actor_options"] = {"num_cpus": 0.1 if d["name"] == "Ingress" else 0.2}
        if d["name"] != "Ingress":  # a broken or killed model replica is found within seconds
            d.update(health_check_period_s=1, health_check_timeout_s=10)
    ingress, latent, long = (next(d for d in app["deployments"] if d["name"] == n)
                             for n in ("Ingress", "LatentReasoner", "LongCoT"))
    ingress["ray_actor_options"]["runtime_env"] = {"env_vars": {KEY_ENV: KEY}}  # replicas are other processes
    latent.update(max_ongoing_requests=4, max_queued_requests=8)
    long.update(max_ongoing_requests=2, max_queued_requests=4)  # small, so a burst gets 503s
    path.write_text(yaml.safe_dump(conf))
    return str(path)


@pytest.fixture(scope="module")
def server(ray_session, tiny_dir, tmp_path_factory):
    from ray import serve

    from serve.launch import serve_run_dir
    from synadapt.latent.reasoner import AdaptiveReasoner

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", PORT)) != 0, f"port {PORT} is taken"
    tmp = tmp_path_factory.mktemp("serve")
    run = AdaptiveReasoner.init_untrained(tiny_dir, str(tmp / "run"))
    url = serve_run_dir(run, port=PORT, config_path=_test_config(tmp / "serve.yaml"), blocking=False)
    assert url == f"{ROOT}/v1"
    yield url
    serve.shutdown()


def call(path: str, body=None, key: str | None = KEY, headers: dict | None = None, method: str | None = None):
    """(status, headers, parsed JSON or raw text) of one HTTP request to the test server."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    h = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    req = urllib.request.Request(ROOT + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=90) as r:
            status, hdrs, raw = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, e.headers, e.read().decode()
    is_json = hdrs.get("content-type", "").startswith("application/json")
    return status, hdrs, json.loads(raw) if is_json else raw


def chat(mode=None, tau=None, **extra):
    body = {"model": "synadapt", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, **extra}
    body.update({k: v for k, v in (("reasoning_mode", mode), ("tau", tau)) if v is not None})
    return call("/v1/chat/completions", body)


def client(key=KEY):
    return openai.OpenAI(base_url=f"{ROOT}/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_chat_completions_and_streaming(server):
    c = client()
    assert [m.id for m in c.models.list().data] == ["synadapt"]
    raw = c.chat.completions.with_raw_response.create(
        model="synadapt", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTION}],
        max_tokens=12, extra_body={"reasoning_mode": "long"})
    resp = raw.parse()
    meta = resp.model_extra["synadapt"]
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].finish_reason in ("stop", "length")
    assert meta["route"] == raw.headers["x-synadapt-route"] == "long" and meta["score"] is None
    assert 1 <= meta["generated_tokens"] == resp.usage.completion_tokens <= 12
    assert int(raw.headers["x-synadapt-generated-tokens"]) == meta["generated_tokens"]
    assert meta["forward_positions"] == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert meta["seconds"]["total"] >= meta["seconds"]["long"] > 0

    comp = c.completions.create(model="synadapt", prompt=QUESTION, max_tokens=8,
                                extra_body={"reasoning_mode": "latent"})
    assert comp.model_extra["synadapt"]["route"] == "latent" and comp.choices[0].text.startswith("</think>")
    assert comp.model_extra["synadapt"]["latent_steps"] > 0 and 0 <= comp.model_extra["synadapt"]["score"] <= 1

    for mode in ("long", "latent"):
        chunks = list(c.chat.completions.create(model="synadapt", messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=12, stream=True, stream_options={"include_usage": True},
                                                extra_body={"reasoning_mode": mode}))
        final = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
        meta = final.model_extra["synadapt"]
        assert meta["route"] == mode and chunks[-1].usage.completion_tokens == meta["generated_tokens"]
        if mode == "long":
            assert len([ch for ch in chunks if ch.choices]) >= 3  # token by token, not one blob
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="synadapt", prompt=QUESTION, max_tokens=10, stream=True, extra_body={"reasoning_mode": "long"}))
    assert text == c.completions.create(model="synadapt", prompt=QUESTION, max_tokens=10,
                                        extra_body={"reasoning_mode": "long"}).choices[0].text  # greedy: same text


def test_stop_sequences_cut_the_text_streamed_or_not(server):
    c = client()
    ask = {"model": "synadapt", "prompt": QUESTION, "max_tokens": 16, "extra_body": {"reasoning_mode": "long"}}
    full = c.completions.create(**ask).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.find(stop)]
    cut = c.completions.create(**ask, stop=[stop]).choices[0]
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    assert "".join(ch.choices[0].text for ch in c.completions.create(**ask, stop=[stop], stream=True)) == expected


def test_sse_wire_format_and_headers(server):
    status, headers, raw = chat("long", stream=True)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-synadapt-route"] == "long"
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_routing_honours_mode_and_tau(server):
    status, headers, latent = chat("latent")
    assert status == 200 and latent["synadapt"]["route"] == headers["x-synadapt-route"] == "latent"
    score = latent["synadapt"]["score"]
    assert float(headers["x-synadapt-score"]) == pytest.approx(score)
    assert latent["choices"][0]["message"]["reasoning_content"] is None
    assert chat("long")[2]["synadapt"]["route"] == "long"
    assert chat("auto", tau=0.0)[2]["synadapt"]["route"] == "long"  # tau 0: everything re-thinks
    assert chat("auto", tau=1.0)[2]["synadapt"]["route"] == "latent"  # tau 1: nothing does
    assert chat("auto", tau=min(score + 1e-3, 1.0))[2]["synadapt"]["route"] == "latent"
    rethink = chat("auto", tau=max(score - 1e-3, 0.0))[2]["synadapt"]
    assert rethink["route"] == "long" and rethink["score"] == pytest.approx(score, abs=1e-5)
    assert rethink["forward_positions"] > rethink["generated_tokens"] > 0
    # Concurrent mixed requests share batches; each still gets its own route. (Six stay within the test
    # config's queue limits: 4 + 8 for LatentReasoner, 2 + 2 for LongCoT.)
    modes = ["latent", "long", "auto", "latent", "long", "auto"]
    with ThreadPoolExecutor(len(modes)) as pool:
        results = list(pool.map(lambda m: chat(m, tau=1.0), modes))
    assert [r[0] for r in results] == [200] * len(modes)
    assert [r[2]["synadapt"]["route"] for r in results] == [{"auto": "latent"}.get(m, m) for m in modes]


BAD = [  # (body, status, param, words the message must contain)
    (b"{not json", 400, None, "malformed JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "synadapt"}, 400, "messages", "messages is required"),
    ({"messages": []}, 400, "messages", "at least 1"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages.0.content", "empty"),
    ({"messages": [{"role": "system", "content": "hi"}]}, 400, "messages", "user message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "role"),
    ({"messages": [{"role": "user", "content": "1+" * 101}]}, 400, "messages", "202 characters"),
    ({"messages": [{"role": "user", "content": "1+" * 60}]}, 400, "messages", "tokens, limit 100"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 65}, 400, "max_tokens", "at most 64"),
    ({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 99}, 400, "max_completion_tokens",
     "at most 64"),
    ({"messages": [{"role": "user", "content": "a"}], "tau": 1.5}, 400, "tau", "less than or equal to 1"),
    ({"messages": [{"role": "user", "content": "a"}], "tau": -0.1}, 400, "tau", "greater than or equal to 0"),
    ({"messages": [{"role": "user", "content": "a"}], "reasoning_mode": "fast"}, 400, "reasoning_mode", "'auto'"),
    ({"messages": [{"role": "user", "content": "a"}], "n": 2}, 400, "n", "n=1"),
    ({"messages": [{"role": "user", "content": "a"}], "temperature": -1}, 400, "temperature", "greater than"),
    ({"messages": [{"role": "user", "content": "a"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"messages": [{"role": "user", "content": "a"}], "model": "gpt-9"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[f"{b[1]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_chat_input_is_refused_with_its_field(server, body, status, param, words):
    got, headers, err = call("/v1/chat/completions", body)
    assert (got, headers["content-type"]) == (status, "application/json"), err
    assert err["error"]["param"] == param and words in err["error"]["message"], err
    assert err["error"]["type"] == "invalid_request_error"


def test_bad_completion_input_timeout_and_unknown_route(server):
    for body, param in (({"max_tokens": 4}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt")):
        status, _, err = call("/v1/completions", body)
        assert status == 400 and err["error"]["param"] == param, err
    status, _, err = call("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}]},
                          headers={"x-synadapt-timeout-s": "soon"})
    assert status == 400 and err["error"]["param"] == "x-synadapt-timeout-s"
    status, _, err = call("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}]},
                          headers={"x-synadapt-timeout-s": "0.0001"})
    assert status == 504 and err["error"]["code"] == "timeout", err
    status, _, err = call("/v1/nothing", {})
    assert status == 404 and "error" in err
    assert chat("auto")[0] == 200  # still serving after all of the above


def test_internal_error_is_a_json_500_and_server_keeps_serving(server):
    status, _, err = call("/debug/error", {})
    assert status == 500 and err["error"]["code"] == "internal_error" and "debug failure" in err["error"]["message"]
    assert chat("long")[0] == 200


def test_latent_route_samples_at_temperature_above_zero(server):
    def answers(**sampling):
        return [chat("latent", max_tokens=12, **sampling)[2]["choices"][0]["message"]["content"] for _ in range(4)]

    assert len(set(answers())) == 1  # greedy by default
    assert len(set(answers(temperature=1.5, top_p=1.0))) >= 3  # 12 tokens sampled from an untrained model


def test_backpressure_returns_json_503_not_a_hang(server):
    gate = threading.Barrier(24)

    def burst(i):  # half latent, so more requests stay in flight than the ingress admits (8)
        gate.wait()
        return call("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64,
                                             "reasoning_mode": ("long", "latent")[i % 2]})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(burst, range(24)))
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    assert all(r[2]["error"]["code"] == "overloaded" for r in results if r[0] == 503)
    # The ingress's own overflow (max_inflight_requests 8 of 24) gets the same JSON 503, not Serve's plain text.
    assert any("in flight on this ingress" in r[2]["error"]["message"] for r in results if r[0] == 503), results
    assert time.perf_counter() - t0 < 30
    assert chat("long")[0] == 200


def test_api_key_is_required(server):
    for key in (None, "wrong-key"):
        status, headers, err = call("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}, key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
        assert call("/v1/models", key=key)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        client("wrong-key").models.list()
    assert call("/healthz", key=None)[:1] == (200,)


def test_listens_on_loopback_only(server):
    import ray

    ip = ray.util.get_node_ip_address()
    if ip.startswith("127."):
        pytest.skip("the node address is loopback; nothing to compare")
    with socket.socket() as s:
        s.settimeout(5)
        assert s.connect_ex((ip, PORT)) != 0, f"the API answers on {ip}:{PORT}"


def test_throughput_mode_puts_haproxy_on_the_http_port(server):
    """The session runs Serve as ``synadapt serve`` does: HAProxy, not Serve's Python proxy, owns the API port."""
    import psutil

    owners = {psutil.Process(c.pid).name() for c in psutil.net_connections("tcp")
              if c.status == psutil.CONN_LISTEN and c.laddr.port == PORT and c.pid}
    assert owners == {"haproxy"}, owners


def test_serve_mode_is_checked_and_set_for_the_ray_processes(monkeypatch):
    from serve.launch import use_serve_mode

    for var in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    with pytest.raises(ValueError, match="'fast'"):
        use_serve_mode("fast")
    use_serve_mode("default")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    use_serve_mode("throughput")
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def _replicas(deployment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"])


def _wait_for_replacement(deployment: str, before: list[str], seconds: float = 90) -> list[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (len(_replicas(deployment)) != 1 or _replicas(deployment) == before):
        time.sleep(0.5)
    return _replicas(deployment)


def test_broken_model_fails_its_health_check_and_is_replaced(server):
    before = _replicas("LongCoT")
    good = chat("long")[2]["choices"][0]["message"]
    assert call("/debug/break_long", {})[0] == 200
    after = _wait_for_replacement("LongCoT", before)
    assert len(after) == 1 and after != before, "the broken LongCoT replica was not replaced"
    status, _, body = chat("long")
    assert status == 200 and body["choices"][0]["message"] == good  # fresh weights, the same greedy answer


def test_sigkill_of_a_replica_under_load_loses_no_request(server):
    """4 clients, half streaming, while the LongCoT replica's process is SIGKILLed: every request that had not
    started streaming is retried and succeeds; a stream already under way ends with an SSE error event."""
    import signal

    import ray
    from ray.util.state import list_actors

    before = _replicas("LongCoT")
    log: list[tuple[float, bool, int, object]] = []
    stop = threading.Event()

    def traffic(k: int):
        i = 0
        while not stop.is_set():
            stream = bool((i + k) % 2)
            try:
                status, _, body = chat("long", stream=stream, max_tokens=32)
            except OSError as e:  # a dropped connection is a lost request too
                status, body = 0, repr(e)
            log.append((time.perf_counter(), stream, status, body))
            i += 1

    threads = [threading.Thread(target=traffic, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    while len(log) < 4:
        time.sleep(0.05)
    replica = list_actors(address=ray.get_runtime_context().gcs_address,
                          filters=[("name", "=", before[0]), ("state", "=", "ALIVE")])[0]
    os.kill(replica.pid, signal.SIGKILL)
    killed_at = time.perf_counter()
    after = _wait_for_replacement("LongCoT", before)
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline and sum(t > killed_at for t, *_ in log) < len(threads) * 3:
        time.sleep(0.2)  # let the replacement serve a few rounds
    stop.set()
    for t in threads:
        t.join(60)
    assert after != before and len(after) == 1, "no new LongCoT replica"
    finished_after = [(stream, status, body) for t, stream, status, body in log if t > killed_at]
    assert len(finished_after) >= len(threads) * 3
    for stream, status, body in finished_after:
        assert status == 200, (status, body)  # nothing lost: the requests in flight were retried
        if stream:
            events = [json.loads(e[6:]) for e in body.split("\n\n") if e and e != "data: [DONE]"]
            assert body.rstrip().endswith("data: [DONE]")
            failed = [i for i, e in enumerate(events) if "error" in e]
            if failed:  # only a stream already under way may fail: its error event follows a token
                assert any(e["choices"][0]["delta"].get("reasoning_content") for e in events[:failed[0]]), events
