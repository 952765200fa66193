"""What the wheel installs, and what runs without it: the repository's Ray entry points and the cluster files."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the sources (a build in the checkout would leave build/ there)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    for name in ("synadapt", "jobs", "serve"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                        "-w", str(dist)], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = dist.glob("synadapt-*.whl")
    return path


def test_wheel_installs_only_the_synadapt_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"synadapt"}, f"the wheel installs generic top-level names: {sorted(top - {'synadapt'})}"
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["synadapt"]
    assert "synadapt/cli.py" in names and "synadapt/latent/refiner.py" in names


def test_cli_outside_a_checkout_runs_eval_and_names_what_demo_needs(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed wheel, not the checkout, provides `synadapt`
    probe = "import synadapt, sys; print(synadapt.__file__)"
    assert subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.startswith(str(site))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "synadapt.cli", *args], env=env, cwd=tmp_path,
                              check=False, capture_output=True, text=True, timeout=300)

    r = cli("eval", "--help")
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout, r.stderr[-2000:]
    r = cli("demo", "--config", "missing.yaml")  # refused before the config is read
    assert r.returncode == 2 and "jobs/ and serve/" in r.stderr and "pip install -e ." in r.stderr, r.stderr[-2000:]


def test_checkout_entry_points_run_from_the_repository_and_from_elsewhere(tmp_path):
    """`python -m jobs.pipeline` from the repo root (what `ray job submit --working-dir .` runs) and the `synadapt`
    console command from another directory (it finds the checkout beside its package)."""
    r = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--help"], cwd=ROOT, check=False, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "--dry_run" in r.stdout and "--evaluate.num_gpus" in r.stdout, r.stderr[-2000:]
    synadapt_cmd = Path(sys.executable).with_name("synadapt")
    r = subprocess.run([str(synadapt_cmd), "demo", "--help"], cwd=tmp_path, check=False, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "--train_refiner.refiner.m" in r.stdout, r.stderr[-2000:]


# -------------------------------------------------------------------------------------------- cluster files


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "cluster/kuberay").glob("*.yaml"))}


def cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return [spec] if doc["kind"] == "RayCluster" else [spec.get("rayClusterSpec") or spec["rayClusterConfig"]]


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_use_operator_token_auth():
    """authOptions (KubeRay >= 1.5.1): the operator creates the token Secret and gives it to every Ray container,
    the autoscaler sidecar, the RayJob submitter and its own dashboard client. A token set by hand in the pod env
    reaches only the pods; and Ray >= 2.52 is needed."""
    docs = manifests()
    assert set(docs) == {"raycluster.yaml", "rayjob-pipeline.yaml", "rayservice.yaml"}
    for name, doc in docs.items():
        for cluster in cluster_specs(doc):
            assert cluster.get("authOptions") == {"mode": "token"}, name
            major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
            assert (major, minor) >= (2, 52), name
            for c in containers(cluster):
                hand_set = {e["name"] for e in c.get("env", [])} & {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"}
                assert not hand_set, f"{name}: {c['name']} sets {hand_set} by hand"


def test_rayservice_serve_service_name_is_the_one_kuberay_creates():
    """KubeRay names a RayService's Serve Service ``<metadata.name>-serve-svc``; every `svc/...-serve-svc` the
    manifest and the README tell users to reach must be that one."""
    svc = manifests()["rayservice.yaml"]
    expected = f"{svc['metadata']['name']}-serve-svc"
    for path in ("cluster/kuberay/rayservice.yaml", "README.md"):
        named = set(re.findall(r"[\w.-]+-serve-svc", (ROOT / path).read_text()))
        assert named == {expected}, f"{path} names {sorted(named)}"


def test_image_build_context_leaves_out_local_state():
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "runs"} <= ignored  # what COPY takes stays in the image, whatever RUN deletes later


def test_launcher_setup_fails_loudly_with_installed_tools():
    import jsonschema
    import ray.autoscaler

    launcher = yaml.safe_load((ROOT / "cluster/launcher-gpu.yaml").read_text())
    schema = Path(ray.autoscaler.__file__).with_name("ray-schema.json")
    jsonschema.validate(launcher, json.loads(schema.read_text()))  # what `ray up` checks first
    bindir = Path(sys.executable).parent
    for command in launcher["setup_commands"]:
        assert "|| true" not in command, f"a failure would be hidden: {command}"
        tool = command.split()[0]
        # Every CLI a node runs is one the pinned stack installs (huggingface_hub 1.x dropped huggingface-cli).
        assert tool == "pip" or (bindir / tool).exists(), f"{tool!r} is not installed by the tested versions"
