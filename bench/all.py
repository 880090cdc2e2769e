"""Run every benchmark in one process, print one table, write one JSON.

    python -m bench.all [--out results.json] [--quick] [--only NAME,...] [--device cuda|cpu]

Peers are measured here, in the same process and on the same card as hybridlm, every time:
only ratios from one run hold on a shared machine. `--quick` runs everything at tiny sizes
(a CPU smoke test, seconds); `--out` is rewritten after each benchmark, so a run cut short
keeps what it measured. Progress goes to stderr, the table to stdout. The serving benchmarks
(OPTIONAL) each take minutes of their own, so they run only when named:
`--only generate,serve_load` (or `python -m bench.generate` / `bench.serve_load`, which take
their own sizes).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.peers import transformers_version
from bench.report import text_table, write_json
from bench.timing import progress

# Cheap benchmarks first, the ones that compile whole models last: a run stopped by its
# time limit keeps the most rows. The table shows them in the order (report.ORDER).
BENCHMARKS = ("ceilings", "moe_layer", "mla_decode", "train_187m", "mamba_mixer", "train_nexus")
OPTIONAL = ("generate", "serve_load")  # not in the default run: see the docstring
SCHEMA = "hybridlm-bench/1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    known = BENCHMARKS + OPTIONAL
    parser.add_argument("--only", help=f"comma-separated benchmarks of {', '.join(known)}")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    args.names = BENCHMARKS if args.only is None else tuple(args.only.split(","))
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"--only names unknown benchmarks {unknown}; allowed: {list(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import hybridlm

    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "transformers": transformers_version(),
            "hybridlm": hybridlm.__version__}


def device_info(device: torch.device) -> dict[str, Any]:
    from bench.step import peak_flops

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    peak = peak_flops(device)
    return {"type": device.type, "name": name or platform.machine(),
            "peak_bf16_tflops": None if peak is None else peak / 1e12}


def new_results(module: str, argv: list[str] | None, device: torch.device, quick: bool
                ) -> dict[str, Any]:
    """The head of a results JSON (bench.report reads it): the run's command, device and
    versions, and no rows yet. `module` as run, e.g. "bench.all"; argv None: sys.argv's."""
    command = f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command.strip(), "device": device_info(device), "versions": versions(),
        "quick": quick, "benchmarks": [], "elapsed_s": 0.0, "rows": [],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        # Tiny sizes gain nothing from a thread pool, and on a busy CPU its spinning threads
        # turn milliseconds into seconds.
        torch.set_num_threads(1)
    results = new_results("bench.all", argv, device, args.quick)
    progress(f"{results['device']['name']}, torch {results['versions']['torch']}")
    started = time.perf_counter()
    for name in args.names:
        t0 = time.perf_counter()
        progress(f"[{name}]")
        module = importlib.import_module(f"bench.{name}")
        rows = module.run(device, args.quick)
        results["benchmarks"].append(name)
        results["rows"].extend(row.to_dict() for row in rows)
        results["elapsed_s"] = round(time.perf_counter() - started, 1)
        progress(f"[{name}] done in {time.perf_counter() - t0:.0f} s")
        if args.out is not None:
            write_json(results, args.out)
    print(text_table(results["rows"]))
    return results


if __name__ == "__main__":
    main()
