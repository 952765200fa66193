"""Shared fixtures: a tiny untrained Qwen2 reasoner on disk and one local Ray session for the Ray tests."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A randomly initialised tiny reasoner + tokenizer saved with save_pretrained (no training)."""
    from synadapt.models.tiny import TinyReasonerConfig, build_model, build_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    build_model(tok, TinyReasonerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) shared by every Ray test; never attaches to a running cluster. Serve runs in
    the mode ``synadapt serve`` starts it in (HAProxy ingress, gRPC between deployments)."""
    import ray

    from serve.launch import use_serve_mode

    use_serve_mode("throughput")
    # An ingress replica that serves HTTP itself drains 30 s before it exits (so HAProxy stops sending it requests);
    # the tests' serve.shutdown need not wait that long.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
