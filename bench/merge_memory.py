"""Peak resident memory of the AdaR1 streaming merge, as a fraction of one model's size.

    .venv/bin/python bench/merge_memory.py [--hidden 1024 --layers 8 --vocab 32000 --shard-mb 64]

Builds two random bf16 Qwen2 checkpoints of a few hundred MB, each saved in several shards, in a temp dir. Each
merge runs in a fresh subprocess that imports everything first, records its RSS (the baseline), merges, and
reports its peak RSS (the kernel's VmHWM high-water mark, reset after the imports).
For contrast the same merge is done naively (both state dicts loaded, averaged in memory). Prints both and writes
``bench/out/merge_memory.json``. A 7B merge needs two 15 GB models twice over in the naive way; the streaming
merge's working set is a few float32 chunks (``chunk_bytes``), whatever the model size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "merge_memory.json"


def make_checkpoint(path: Path, seed: int, args) -> int:
    """A random bf16 Qwen2 checkpoint in shards of ``args.shard_mb`` MB; returns its weight bytes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=f"{args.shard_mb}MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child(mode: str, long_dir: str, short_dir: str, out_dir: str) -> None:
    """Run one merge and print ``{"baseline", "peak", "seconds"}`` in bytes / seconds as JSON."""
    import psutil
    import torch
    from safetensors.torch import load_file, save_file

    from synadapt.adar1.merge import merge_checkpoints

    torch.set_num_threads(1)
    reset_peak()
    baseline = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if mode == "streaming":
        merge_checkpoints(long_dir, short_dir, out_dir, 0.8)
    else:  # what a merge without streaming does: both models whole in memory, plus the result
        a = {k: v for f in sorted(Path(long_dir).glob("*.safetensors")) for k, v in load_file(f).items()}
        b = {k: v for f in sorted(Path(short_dir).glob("*.safetensors")) for k, v in load_file(f).items()}
        merged = {k: (a[k].float() * 0.8 + b[k].float() * 0.2).to(a[k].dtype) for k in a}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file(merged, Path(out_dir) / "model.safetensors", metadata={"format": "pt"})
    seconds = time.perf_counter() - t0
    print(json.dumps({"baseline": baseline, "peak": peak_rss(), "seconds": seconds}))


def reset_peak() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS, so import-time peaks do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak RSS in bytes: VmHWM of this process image. Not ru_maxrss, which Linux carries over from the parent
    across fork + exec (the parent here has just built two models) and so would overstate the merge."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(mode: str, long_dir: Path, short_dir: Path, out_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(long_dir), str(short_dir), str(out_dir)],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--child", nargs=4, metavar=("MODE", "LONG", "SHORT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="merge-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model_bytes = make_checkpoint(tmp / "long", 0, args)
        make_checkpoint(tmp / "short", 1, args)
        shards = len(list((tmp / "long").glob("*.safetensors")))
        print(f"two random bf16 Qwen2 checkpoints of {model_bytes / 2**20:.0f} MiB, {shards} shards each "
              f"({time.perf_counter() - t0:.0f} s to build)")
        result = {"model_bytes": model_bytes, "input_shards": shards, "dtype": "bfloat16",
                  "architecture": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab}}
        for mode in ("streaming", "naive"):
            m = measure(mode, tmp / "long", tmp / "short", tmp / mode)
            extra = m["peak"] - m["baseline"]
            result[mode] = {"peak_rss_above_baseline_bytes": extra, "fraction_of_model": extra / model_bytes,
                            "baseline_rss_bytes": m["baseline"], "seconds": round(m["seconds"], 2)}
            print(f"{mode:>9} merge: peak RSS {extra / 2**20:7.1f} MiB above baseline = "
                  f"{extra / model_bytes:.3f} x one model ({m['seconds']:.1f} s)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
