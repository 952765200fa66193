"""The `synadapt` command end to end, as a user runs it (a real subprocess, a real model directory)."""
import json
import subprocess
import sys


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "synadapt.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_eval_on_a_jsonl_file_counts_malformed_rows(tiny_dir, tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "a=1;b=a+2;?b", "answer": "blah #### 3"}) + "\n"
                    + "{not json\n" + json.dumps({"question": "a=5;?a", "answer": "#### 5"}) + "\n")
    out = tmp_path / "ev"
    r = run("eval", "--model", tiny_dir, "--data", str(data), "--adapter", "gsm8k", "--mode", "nothink",
            "--max-new-tokens", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 malformed" in r.stdout and "line 2" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["rows"][0]["method"] == "nothink" and res["rows"][0]["n"] == 2
    assert (out / "records" / "nothink.jsonl").read_text().count("\n") == 2


def test_help_lists_every_config_field_and_bad_flags_fail_clearly():
    r = run("demo", "--help")
    assert r.returncode == 0 and "--train_refiner.refiner.n_passes" in r.stdout and "--synthesize.synthesis.m" in r.stdout
    r = run("demo", "--no_such.key", "3")
    assert r.returncode == 2 and "unknown config key 'no_such'" in r.stderr
