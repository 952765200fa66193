"""Stage outputs and run dirs on an object store: a real S3-protocol server (moto) on 127.0.0.1, real Ray workers.

The ``ray_session`` workers start before this module sets anything, so they cannot be handed ``AWS_*`` variables;
the URI carries the endpoint and the test server's credentials instead (``s3://KEY:SECRET@bucket/x?
endpoint_override=...``): pyarrow resolves it the same way on the driver, in every Ray worker and in every Serve
replica, and a URI is all a stage config holds. tests/test_z_cluster.py covers the other way, credentials in the
environment of a submitted job.
"""
from __future__ import annotations

import json
import socket
import urllib.request
from collections import Counter

import pyarrow.fs
import pytest

from jobs.common import iter_parquet_shards, join_path, read_parquet_rows, storage
from synadapt.data.source import DataSource
from synadapt.data.task import TaskConfig, make_splits
from synadapt.models.lm import GenerationConfig

TASK = TaskConfig(train_per_level=2, val_per_level=1, test_per_level=1)  # 12 training questions


@pytest.fixture(scope="module")
def bucket():
    """The URI of an empty bucket on a moto S3 server that this module starts and stops."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    uri = f"s3://testing:testing@synadapt/run?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    pyarrow.fs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")[0].create_dir("synadapt")
    yield uri
    server.stop()


def s3_keys(uri: str) -> dict[str, int]:
    fs, root = storage(uri)
    return {i.path: i.size for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))}


def test_join_path_keeps_a_uri_a_uri(tmp_path):
    assert join_path("s3://b/run?region=x", "dcot", "a.json") == "s3://b/run/dcot/a.json?region=x"
    assert join_path("gs://b/run/", "dcot") == "gs://b/run/dcot"
    assert join_path(str(tmp_path), "dcot") == str(tmp_path / "dcot")
    fs, path = storage("file://" + str(tmp_path))
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path)


def test_collect_dcot_and_preferences_write_to_s3_exactly_once_and_resume(ray_session, tiny_dir, bucket):
    from transformers import AutoTokenizer

    from jobs.build_preferences import run_build_preferences, training_questions
    from jobs.collect_dcot import run_collect_dcot
    from synadapt.adar1.preferences import PreferenceConfig, pairs_for_questions
    from synadapt.data.dcot import CollectDcotConfig
    from synadapt.models.lm import build_prompt

    out = join_path(bucket, "dcot")
    cfg = CollectDcotConfig(model=tiny_dir, task=TASK, out_dir=out, batch_size=4, concurrency=2,
                            generation=GenerationConfig(max_new_tokens=6))
    counts = run_collect_dcot(cfg)
    ids = [p["id"] for p in make_splits(TASK)["train"]]
    assert counts["written"] == 12 and counts["total"] == 12 and counts["errors"] == 0
    assert Counter(r["id"] for r in read_parquet_rows(out)) == Counter(ids)
    shards = s3_keys(out)
    assert len(shards) == 3 and all(k.endswith(".parquet") for k in shards)  # one per batch, no .tmp left
    again = run_collect_dcot(cfg)
    assert again["skipped"] == 12 and again["written"] == 0 and s3_keys(out) == shards

    prefs = PreferenceConfig(long_model=tiny_dir, short_model=tiny_dir, output_dir=join_path(bucket, "prefs"),
                             data=DataSource(limit=6), k=2, batch_size=2, concurrency=1,
                             generation=GenerationConfig(max_new_tokens=8, temperature=0.6, top_p=0.95))
    stats = run_build_preferences(prefs)
    samples_dir = join_path(prefs.output_dir, "samples")
    assert len(list(iter_parquet_shards(samples_dir))) == 3  # pairs were built shard by shard
    samples = read_parquet_rows(samples_dir)
    fs, root = storage(prefs.output_dir)
    with fs.open_input_stream(f"{root}/pairs.jsonl") as f:
        pairs = [json.loads(line) for line in f.read().decode().splitlines()]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    questions = {p["id"]: {"prompt": build_prompt(tok, p["question"], "long", prefs.prompt),
                           "difficulty": p.get("difficulty")} for p in training_questions(prefs)[0]}
    whole_pairs, whole = pairs_for_questions(samples, prefs, questions)  # all samples at once, as before
    assert sorted(pairs, key=lambda p: p["id"]) == whole_pairs and {k: stats[k] for k in whole} == whole
    assert stats["questions"] == 6 and f"{root}/stats.json" in s3_keys(prefs.output_dir)
    assert f"{root}/samples/settings.json" in s3_keys(prefs.output_dir)
    assert run_build_preferences(prefs)["sampling"]["written"] == 0  # resumed from the samples on S3


def test_serve_reads_its_run_dir_from_s3(ray_session, tiny_dir, bucket, tmp_path):
    from ray import serve

    from serve.deployments import read_run, resolve_run_dir
    from serve.launch import serve_run_dir
    from synadapt.latent.reasoner import AdaptiveReasoner

    run = join_path(bucket, "reasoner")
    pyarrow.fs.copy_files(AdaptiveReasoner.init_untrained(tiny_dir, str(tmp_path / "run")), run)
    assert resolve_run_dir(run) == run and read_run(run)[0] == tiny_dir
    with pytest.raises(FileNotFoundError, match="no reasoner.json"):
        resolve_run_dir(join_path(bucket, "nothing-here"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = serve_run_dir(run, port=port, blocking=False)
    try:
        body = {"model": "synadapt", "messages": [{"role": "user", "content": "m=4;y=m+7;?y"}], "max_tokens": 4,
                "reasoning_mode": "latent"}
        req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        assert r.status == 200 and reply["synadapt"]["route"] == "latent"
    finally:
        serve.shutdown()
