"""``synadapt serve --run-dir DIR``: the graph of serve/config.yaml, on a SynAdapt run, on a local Ray instance."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
log = logging.getLogger(__name__)


def serve_run_dir(run_dir: str, host: str = "127.0.0.1", port: int = 8000, config_path: str | None = None,
                  blocking: bool = True) -> str:
    """Deploy the serving graph on ``run_dir`` and return the API's base URL (``http://host:port/v1``).

    The Serve config file (default serve/config.yaml) gives the application args and the per-deployment options;
    ``run_dir``, ``host`` and ``port`` replace its values. Starts a local Ray instance unless this process is
    already connected to one. ``blocking`` serves until Ctrl-C, then shuts Serve (and a Ray it started) down.
    """
    import ray
    from ray import serve

    from serve.app import build_app, resolve_run_dir

    conf = yaml.safe_load(Path(config_path or DEFAULT_CONFIG).read_text()) or {}
    apps = conf.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{config_path or DEFAULT_CONFIG}: expected exactly one application, found {len(apps)}")
    app = apps[0]
    args = {**(app.get("args") or {}), "run_dir": resolve_run_dir(run_dir), "deployments": app.get("deployments")}
    started = not ray.is_initialized()
    if started:
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
