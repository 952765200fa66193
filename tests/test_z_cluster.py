"""A two-node local Ray cluster (`ray start --head` + `ray start --address`) runs a stage with `ray job submit`.

Runs in its own pytest process (`make test` selects ``-m cluster`` separately). The recipe follows STACK.md §8:
one RAY_AUTH_MODE for every command, a short separate --temp-dir per node, explicit ports, a timeout on every
command. Teardown stops only this cluster's processes (found through their temp dir): `ray stop` would also kill
every other Ray instance on the machine, including other people's test sessions.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.fs
import pytest

from jobs.common import read_parquet_rows
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def stop_cluster(temp_root: str) -> None:
    """Terminate, then kill, every process of this cluster: those naming its temp dir on their command line or
    writing logs under it (agents and the client server rename themselves and outlive the `ray start` parent)."""
    def ours(p: psutil.Process) -> bool:
        try:
            return temp_root in " ".join(p.cmdline()) or any(f.path.startswith(temp_root) for f in p.open_files())
        except psutil.Error:
            return False

    procs = [p for p in psutil.process_iter() if p.pid != os.getpid() and ours(p)]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


def test_two_node_cluster_runs_a_submitted_collect_dcot_job_writing_to_s3(tiny_dir, monkeypatch):
    """The job's output goes to an S3-protocol server (moto on 127.0.0.1); the job's runtime env is the only way
    its workers on both nodes get the endpoint and credentials, as on a real cluster without instance roles."""
    import ray
    from moto.server import ThreadedMotoServer

    if ray.is_initialized():
        ray.shutdown()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": "http://{}:{}".format(*s3.get_host_and_port())}
    for k, v in aws.items():
        monkeypatch.setenv(k, v)  # for this process's own reads below, not for the cluster
    pyarrow.fs.FileSystem.from_uri("s3://synadapt?allow_bucket_creation=true")[0].create_dir("synadapt")
    bindir = os.path.dirname(sys.executable)
    root = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: unix socket paths must stay < 107 chars
    gcs, dash, client, agent_h, agent_w = free_ports(5)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash}",
               PATH=bindir + os.pathsep + env.get("PATH", ""))  # the job's `python` is this venv's

    def ray_cli(*args, timeout=120):
        r = subprocess.run([os.path.join(bindir, "ray"), *args], check=False, env=env, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, f"ray {args[0]} failed:\n{(r.stdout + r.stderr)[-3000:]}"
        return r.stdout + r.stderr

    out = "s3://synadapt/dcot"
    try:
        ray_cli("start", "--head", "--num-cpus=1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent_h}", f"--temp-dir={root}/h", "--disable-usage-stats")
        ray_cli("start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", f"--dashboard-agent-listen-port={agent_w}",
                f"--temp-dir={root}/w", "--disable-usage-stats")
        t0 = time.time()
        # Two actors of 1 CPU each on two 1-CPU nodes: one on each node.
        log = ray_cli("job", "submit", "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": aws}),
                      "--", "python", "-m", "jobs.collect_dcot",
                      "--model", tiny_dir, "--data.limit", "8", "--out_dir", out, "--batch_size", "2",
                      "--concurrency", "2", "--generation.max_new_tokens", "8", timeout=300)
        assert "succeeded" in log and '"written": 8' in log, log[-3000:]
        print(f"job submit took {time.time() - t0:.1f} s")
        expected = [p["id"] for p in DataSource(limit=8).load(TaskConfig())]
        assert Counter(r["id"] for r in read_parquet_rows(out)) == Counter(expected)  # read back from S3
        assert ray_cli("status", f"--address=127.0.0.1:{gcs}").count("node_") == 2
    finally:
        stop_cluster(root)
        shutil.rmtree(root, ignore_errors=True)
        s3.stop()
