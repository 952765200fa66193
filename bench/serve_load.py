"""Load test of the serving graph on loopback: requests/s and p50/p99 latency, auto vs always-long, the graph's
overhead per request against calling the same models in-process, and that overhead per hop.

    python bench/serve_load.py --run-dir runs/demo            # a trained SynAdapt run
    python bench/serve_load.py --base-model DIR               # untrained refiner + classifier on DIR's model
    python bench/serve_load.py --chaos                        # SIGKILL a LongCoT replica under load instead

Every level is bounded by a request count and a duration; the server binds 127.0.0.1 only. Writes
bench/out/serve_load.json (--chaos: bench/out/serve_chaos.json) and prints a table.

Hops at concurrency 1: the *front* hop is the client's latency minus the time the ingress measured for the request
(HTTP, Serve's proxy, the ingress's FastAPI and JSON); the *model* hops are the ingress's time minus the model
time the replicas report (parsing, the handle call, the replica's queue, serialization), shared among the one or
two model calls of the request. *Serve's floor* for both comes from a trivial graph deployed beside ours and called
in the same loop (:func:`start_serve_floor`): what any Serve HTTP request and any handle call cost on this machine.
"""
import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `serve` is a top-level package of this repo

from serve.launch import SERVE_MODES
from synadapt.data.task import TaskConfig, make_splits


def post(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict | str | None]:
    """(status, parsed JSON body, or the raw SSE text of a stream); status 0 when the connection failed."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, raw.decode() if body.get("stream") else json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:
        return 0, None


def load_level(url: str, questions: list[str], mode: str, concurrency: int, count: int, duration: float,
               max_tokens: int, tau: float) -> dict:
    """``count`` requests (or fewer when ``duration`` runs out) from ``concurrency`` closed-loop clients."""
    lock, results, next_i = threading.Lock(), [], [0]
    t_end = time.perf_counter() + duration

    def client():
        while time.perf_counter() < t_end:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= count:
                return
            body = {"model": "synadapt", "max_tokens": max_tokens, "reasoning_mode": mode, "tau": tau,
                    "messages": [{"role": "user", "content": questions[i % len(questions)]}]}
            t0 = time.perf_counter()
            status, resp = post(f"{url}/chat/completions", body)
            results.append((time.perf_counter() - t0, status, (resp or {}).get("synadapt")))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    ok = [(lat, meta) for lat, status, meta in results if status == 200]
    lat = np.array([x for x, _ in ok]) * 1000 if ok else np.array([np.nan])
    return {"mode": mode, "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "wall_s": round(wall, 2), "rps": round(len(ok) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_ms": round(float(lat.mean()), 1),
            "long_share": round(sum(m["route"] == "long" for _, m in ok) / max(len(ok), 1), 3),
            "mean_generated_tokens": round(statistics.fmean(m["generated_tokens"] for _, m in ok), 1) if ok else None}


class InProcess:
    """The graph's path without the graph: latent route, then re-think if needed, one question per call."""

    def __init__(self, run_dir: str, max_tokens: int, latent_tokens: int):
        import torch

        from serve.deployments import read_run
        from synadapt.latent.reasoner import AdaptiveReasoner
        from synadapt.models.lm import GenerationConfig, load_model

        torch.set_num_threads(1)  # as in each serve replica (torch_threads: 1)
        self.r = AdaptiveReasoner.load(run_dir)
        base, self.fmt = read_run(run_dir)
        # Like the LongCoT deployment: a model of its own (the reasoner's base carries the refiner's LoRA layers).
        self.long_model, self.long_tok = load_model(base)
        self.cfg = GenerationConfig(max_new_tokens=max_tokens, batch_size=1)
        self.latent_tokens = min(max_tokens, latent_tokens)

    def __call__(self, question: str, mode: str, tau: float) -> None:
        from synadapt.models.lm import build_prompt, generate

        rec = self.r.latent_route([question], [tau], [mode], max_new_tokens=self.latent_tokens)[0] \
            if mode != "long" else {"route": "long"}
        if rec["route"] == "long":
            generate(self.long_model, self.long_tok, [build_prompt(self.long_tok, question, "concise", self.fmt)],
                     self.cfg)


def start_serve_floor(port: int) -> str:
    """Deploy, beside the graph, a FastAPI ingress that makes one handle call to a deployment answering at once and
    reports that call's time; returns the ingress's base URL. Its client latency minus that time is Serve's floor for
    the front hop, the call's time its floor for a model hop, on this machine and under the same load."""
    from fastapi import FastAPI, Request
    from ray import serve

    floor_api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Echo:
        async def __call__(self, body: dict) -> dict:
            return body

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})  # as the graph's Ingress
    @serve.ingress(floor_api)
    class ServeFloor:
        def __init__(self, echo):
            self.echo = echo

        @floor_api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> dict:
            body = await request.json()
            t0 = time.perf_counter()
            await self.echo.remote(body)
            return {"object": "chat.completion", "handle_call_s": time.perf_counter() - t0}

    serve.run(ServeFloor.bind(Echo.bind()), name="serve_floor", route_prefix="/floor")
    return f"http://127.0.0.1:{port}/floor/v1"


def paired_overhead(url: str, floor_url: str, local: InProcess, questions: list[str], mode: str, tau: float,
                    max_tokens: int) -> dict:
    """Served minus in-process latency, question by question, the calls back to back (rotating which goes first),
    so all see the same background load on a shared machine; the served latency split into hops; and the Serve
    floor (:func:`start_serve_floor`) in the same loop."""
    diffs, served, direct, front, model_hop, front_floor, model_floor = [], [], [], [], [], [], []
    body = {"model": "synadapt", "max_tokens": max_tokens, "reasoning_mode": mode, "tau": tau}
    sides = ("served", "direct", "floor")
    for k, q in enumerate(questions[:2] + questions):  # the first two warm up and are not counted
        t, answers, request = {}, {}, {**body, "messages": [{"role": "user", "content": q}]}
        for side in sides[k % 3:] + sides[:k % 3]:
            t0 = time.perf_counter()
            if side == "direct":
                local(q, mode, tau)
            else:
                status, answers[side] = post(f"{url if side == 'served' else floor_url}/chat/completions", request)
                assert status == 200, (side, status)
            t[side] = (time.perf_counter() - t0) * 1000
        if k >= 2:
            served.append(t["served"])
            direct.append(t["direct"])
            diffs.append(t["served"] - t["direct"])
            sec, meta = answers["served"]["synadapt"]["seconds"], answers["served"]["synadapt"]
            model_s = sec["refine"] + sec["classify"] + sec["answer"] + sec["long"]
            calls = (mode != "long") + (meta["route"] == "long")
            front.append(t["served"] - sec["total"] * 1000)
            model_hop.append((sec["total"] - model_s) * 1000 / calls)
            model_floor.append(answers["floor"]["handle_call_s"] * 1000)
            front_floor.append(t["floor"] - model_floor[-1])
    return {"mode": mode, "pairs": len(diffs), "served_mean_ms": round(statistics.fmean(served), 1),
            "in_process_mean_ms": round(statistics.fmean(direct), 1),
            "overhead_median_ms": round(statistics.median(diffs), 1),
            "overhead_mean_ms": round(statistics.fmean(diffs), 1),
            "front_hop_median_ms": round(statistics.median(front), 1),
            "model_hop_median_ms": round(statistics.median(model_hop), 1),
            "serve_floor_front_hop_median_ms": round(statistics.median(front_floor), 1),
            "serve_floor_model_hop_median_ms": round(statistics.median(model_floor), 1)}


def sigkill_replica(deployment: str) -> str:
    """SIGKILL the process of one live replica actor of ``deployment`` (this machine's); returns the actor's name."""
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=10000)
    actor = next(a for a in alive
                 if (a.name or "").startswith("SERVE_REPLICA::") and f"#{deployment}#" in a.name)
    os.kill(actor.pid, signal.SIGKILL)
    return actor.name


def chaos(url: str, questions: list[str], deployment: str, clients: int, duration: float, kill_at: float,
          max_tokens: int) -> dict:
    """``clients`` closed-loop clients (every other request streamed, reasoning_mode long) for ``duration`` s; at
    ``kill_at`` s the process of a ``deployment`` replica is SIGKILLed. A request is lost when it does not return
    200, or when its stream carries an error event (then ``cut``: it had sent a token, else before its first)."""
    log, stop, killed = [], threading.Event(), {}

    def client(k: int):
        i = k
        while not stop.is_set():
            stream = bool(i % 2)
            body = {"model": "synadapt", "max_tokens": max_tokens, "reasoning_mode": "long", "stream": stream,
                    "messages": [{"role": "user", "content": questions[i % len(questions)]}]}
            t0 = time.perf_counter()
            status, resp = post(f"{url}/chat/completions", body)
            error = status != 200
            cut = False
            if stream and status == 200:
                events = [e[6:] for e in resp.split("\n\n") if e.startswith("data: {")]
                failed = next((j for j, e in enumerate(events) if '"error"' in e), None)
                error = failed is not None or not resp.rstrip().endswith("data: [DONE]")
                cut = failed is not None and any('"reasoning_content"' in e for e in events[:failed])
            log.append({"start": t0, "end": time.perf_counter(), "stream": stream, "status": status,
                        "lost": error, "cut": cut})
            i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(kill_at)
    killed["at"], killed["actor"] = time.perf_counter(), sigkill_replica(deployment)
    time.sleep(max(duration - kill_at, 0))
    stop.set()
    for t in threads:
        t.join(150)
    at = killed["at"]
    before = [r for r in log if r["end"] < at]
    hit = [r for r in log if r["start"] <= at <= r["end"]]
    after = [r for r in log if r["start"] > at]
    first_ok = min((r["end"] for r in hit + after if not r["lost"]), default=None)
    first_ok_sent_after = min((r["end"] for r in after if not r["lost"]), default=None)
    return {"deployment": deployment, "killed_actor": killed["actor"], "clients": clients,
            "duration_s": round(time.perf_counter() - t_start, 1), "kill_at_s": kill_at, "requests": len(log),
            "lost": sum(r["lost"] for r in log), "lost_streams_cut_mid_way": sum(r["cut"] for r in log),
            "in_flight_at_kill": len(hit), "lost_in_flight_at_kill": sum(r["lost"] for r in hit),
            "lost_before_kill": sum(r["lost"] for r in before), "lost_after_kill": sum(r["lost"] for r in after),
            "first_success_after_kill_s": round(first_ok - at, 2) if first_ok else None,
            "first_success_of_a_request_sent_after_kill_s": round(first_ok_sent_after - at, 2)
            if first_ok_sent_after else None,
            "max_latency_in_flight_at_kill_s": round(max((r["end"] - r["start"] for r in hit), default=0), 2)}


def untrained_run(base_model: str | None) -> tuple[str, str]:
    """An untrained run dir on ``base_model`` (or on a freshly initialised tiny reasoner) and its description."""
    from synadapt.latent.reasoner import AdaptiveReasoner
    from synadapt.models.tiny import TinyReasonerConfig, build_model, build_tokenizer

    tmp = tempfile.mkdtemp(prefix="serve_load_", dir="/tmp")
    if not base_model:
        base_model = f"{tmp}/base"
        tok = build_tokenizer()
        build_model(tok, TinyReasonerConfig()).save_pretrained(base_model)
        tok.save_pretrained(base_model)
    run = AdaptiveReasoner.init_untrained(base_model, f"{tmp}/run")
    return run, f"untrained refiner + classifier on base model {base_model}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", help="SynAdapt run dir (reasoner.json); default: an untrained one")
    ap.add_argument("--base-model", help="base model for the untrained run dir (default: a random tiny reasoner)")
    ap.add_argument("--config", help="Serve config file (default serve/config.yaml)")
    ap.add_argument("--port", type=int, default=8779)
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--modes", default="auto,long,latent", help="reasoning_mode values to compare")
    ap.add_argument("--requests", type=int, default=96, help="requests per level (upper bound)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level (upper bound)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--tau", type=float, help="tau of the auto rows (default: the config's)")
    ap.add_argument("--serve-mode", choices=SERVE_MODES, default="throughput",
                    help="how Serve runs (serve.launch.use_serve_mode)")
    ap.add_argument("--chaos", action="store_true", help="only the fault run: SIGKILL a replica under load")
    ap.add_argument("--chaos-deployment", default="LongCoT", help="deployment whose replica --chaos kills")
    ap.add_argument("--chaos-clients", type=int, default=4)
    ap.add_argument("--chaos-duration", type=float, default=90.0, help="seconds of load (the kill included)")
    ap.add_argument("--chaos-kill-at", type=float, default=20.0, help="seconds into the load when the kill comes")
    ap.add_argument("--out", help="JSON written (default bench/out/serve_load.json, or serve_chaos.json)")
    args = ap.parse_args(argv)
    args.out = args.out or str(Path(__file__).resolve().parent / "out" /
                               ("serve_chaos.json" if args.chaos else "serve_load.json"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()

    import ray
    import yaml
    from ray import serve

    from serve.app import resolve_run_dir
    from serve.launch import DEFAULT_CONFIG, serve_run_dir

    app_args = yaml.safe_load(Path(args.config or DEFAULT_CONFIG).read_text())["applications"][0]["args"]
    tau = app_args.get("tau", 0.5) if args.tau is None else args.tau

    run_dir, kind = (resolve_run_dir(args.run_dir), "given") if args.run_dir else untrained_run(args.base_model)
    questions = [p["question"] for p in make_splits(TaskConfig())["test"]]
    questions = questions[::max(len(questions) // args.requests, 1)][:args.requests]  # spread over levels
    modes = args.modes.split(",")
    levels = [int(c) for c in args.concurrency.split(",") if c]

    print(f"run: {run_dir} ({kind}); {len(questions)} questions; load average {load_average()}", flush=True)
    if args.chaos:
        return run_chaos(args, run_dir, questions)
    local = InProcess(run_dir, args.max_tokens, app_args.get("latent_answer_tokens", 16))
    url = serve_run_dir(run_dir, host="127.0.0.1", port=args.port, config_path=args.config, blocking=False,
                        mode=args.serve_mode)
    rows = []
    try:
        floor_url = start_serve_floor(args.port)
        for m in modes:  # warm-up: the first requests after a deploy pay lazy set-up in every process
            load_level(url, questions, m, 2, 16, 60, args.max_tokens, tau)
        overhead = {m: paired_overhead(url, floor_url, local, questions, m, tau, args.max_tokens) for m in modes}
        for c in levels:
            for m in modes:
                rows.append(load_level(url, questions, m, c, args.requests, args.duration, args.max_tokens, tau))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"run_dir": run_dir, "run_kind": kind, "questions": len(questions), "max_tokens": args.max_tokens,
              "tau": tau, "config": args.config or "serve/config.yaml", "serve_mode": args.serve_mode,
              "cpu_count": os.cpu_count(),
              "load_average_at_end": load_average(), "command": " ".join(sys.argv),
              "rows": rows, "overhead_per_request": overhead,
              "wall_s": round(time.time() - t_start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    cols = ["mode", "concurrency", "requests", "errors", "rps", "p50_ms", "p99_ms", "mean_ms", "long_share",
            "mean_generated_tokens"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in cols) + " |")
    for m, o in overhead.items():
        print(f"{m}: served {o['served_mean_ms']} ms vs in-process {o['in_process_mean_ms']} ms per request "
              f"({o['pairs']} back-to-back pairs) -> graph overhead median {o['overhead_median_ms']} ms, "
              f"mean {o['overhead_mean_ms']} ms; per hop (median): front {o['front_hop_median_ms']} ms, each model "
              f"call {o['model_hop_median_ms']} ms; Serve's own floor: front {o['serve_floor_front_hop_median_ms']} ms, "
              f"handle call {o['serve_floor_model_hop_median_ms']} ms")
    print(f"load average {load_average()}; wrote {args.out} ({result['wall_s']} s)")
    return 0


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: figures from a shared machine are read against them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_chaos(args, run_dir: str, questions: list[str]) -> int:
    import ray
    from ray import serve

    from serve.launch import serve_run_dir, use_serve_mode

    use_serve_mode(args.serve_mode)
    ray.init(address="local", include_dashboard=True)  # the state API, which finds the replica's PID, needs it
    url = serve_run_dir(run_dir, host="127.0.0.1", port=args.port, config_path=args.config, blocking=False)
    try:
        load_level(url, questions, "long", 2, 8, 60, args.max_tokens, 0.5)  # warm-up
        result = chaos(url, questions, args.chaos_deployment, args.chaos_clients, args.chaos_duration,
                       args.chaos_kill_at, args.max_tokens)
    finally:
        serve.shutdown()
        ray.shutdown()
    result.update(run_dir=run_dir, serve_mode=args.serve_mode, max_tokens=args.max_tokens,
                  load_average_at_end=load_average(),
                  command=" ".join(sys.argv))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
