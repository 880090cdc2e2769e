"""Data-parallel scaling of `hybridlm train` on one host: 1 GPU vs N GPUs (DDP and FSDP2).

Weak scaling: every GPU runs the same micro-batch, so N GPUs process N times the tokens per
step. Throughput is the median over the second half of the steps of tokens / step time (from
metrics.jsonl's `step_seconds`), so start-up, evaluation and checkpoint writing are left out.

    python bench/multi_gpu_scaling.py --out bench/results   # on a machine with >= 2 GPUs

Writes `multi_gpu_scaling.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, env=ENV, cwd=ROOT)


def prepare(work: Path) -> Path:
    data = work / "data"
    if not (data / "meta.json").is_file():
        cli = [sys.executable, "-m", "hybridlm.cli"]
        sh(*cli, "tokenizer", "train", "--input", "data/demo_corpus.jsonl.xz",
           "--vocab-size", "8192", "--out", str(work / "tok"))
        sh(*cli, "data", "prepare", "--input", "data/demo_corpus.jsonl.xz", "--tokenizer",
           str(work / "tok"), "--out", str(data))
    return data


def run(work: Path, data: Path, name: str, gpus: int, parallel: str, args) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # a benchmark always starts a fresh run
    flags = ["--data", str(data), "--out", str(out), "--preset", args.preset,
             "--steps", str(args.steps), "--batch-size", str(args.micro_batch * gpus),
             "--micro-batch-size", str(args.micro_batch), "--seq-len", str(args.seq_len),
             "--eval-every", str(10 * args.steps), "--checkpoint-every", str(10 * args.steps),
             "--warmup-steps", "5", "--set", "progress=false"]
    if gpus == 1:
        cmd = [sys.executable, "-m", "hybridlm.train", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={gpus}", "-m", "hybridlm.train", *flags, "--parallel", parallel]
    sh(*cmd)
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    tail = records[len(records) // 2:]
    tokens_per_step = args.micro_batch * gpus * args.seq_len
    tps = statistics.median(tokens_per_step / r["step_seconds"] for r in tail)
    mfu = statistics.median(r.get("mfu", float("nan")) for r in tail)
    return {"name": name, "gpus": gpus, "parallel": parallel, "tokens_per_s": tps,
            "step_seconds": statistics.median(r["step_seconds"] for r in tail),
            "final_loss": records[-1]["loss"], "mfu_cumulative": mfu}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/hybridlm-scaling")
    parser.add_argument("--preset", default="complexity-deep-187m")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    import torch

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(work)
    rows = [run(work, data, "1gpu", 1, "none", args)]
    for parallel in ("ddp", "fsdp"):
        rows.append(run(work, data, f"{args.gpus}gpu-{parallel}", args.gpus, parallel, args))
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["scaling_efficiency"] = row["tokens_per_s"] / (base * row["gpus"])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"device": device, "torch": torch.__version__,
              "config": vars(args), "runs": rows}
    (out / "multi_gpu_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}, torch {result['torch']}, preset {args.preset}, "
          f"{args.micro_batch} x {args.seq_len} tokens per GPU per step")
    print(f"{'run':<12} {'GPUs':>4} {'tokens/s':>12} {'step s':>8} {'efficiency':>10} "
          f"{'MFU':>6}")
    for r in rows:
        print(f"{r['name']:<12} {r['gpus']:>4} {r['tokens_per_s']:>12,.0f} "
              f"{r['step_seconds']:>8.3f} {r['scaling_efficiency']:>10.1%} "
              f"{r['mfu_cumulative']:>6.1%}")


if __name__ == "__main__":
    main()
