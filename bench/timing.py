"""Timing and result rows shared by every benchmark module.

A benchmark calls `measure(fn, device, ...)`: warm-up calls first (compilation, autotuning,
allocator growth stay out of the numbers), then at least 10 timed calls, each between CUDA
events on a GPU (perf_counter on the CPU), synchronised after each call so a call's
queued work never leaks into the next one. `inputs` rotates the arguments between calls
where a repeated buffer would sit in the cache. A result is a `Row`: hybridlm's median in a
higher-is-better unit, its interquartile range, and the peer's, measured in the same process.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

MIN_REPEATS = 10


@dataclass
class Timing:
    """Milliseconds of each timed call."""

    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def quartiles_ms(self) -> tuple[float, float]:
        """(first, third) quartile of the samples."""
        q1, _, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q1, q3

    def rate(self, work: float) -> tuple[float, tuple[float, float]]:
        """`work` per second at the median, and its interquartile range (slow, fast)."""
        q1, q3 = self.quartiles_ms
        return work / self.median_ms * 1e3, (work / q3 * 1e3, work / q1 * 1e3)


@dataclass
class Measured:
    """A rate (higher is better) with its interquartile range, plus anything worth keeping
    beside it (milliseconds, MFU)."""

    value: float
    spread: tuple[float, float]
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, timing: Timing, work: float, **extra: float) -> Measured:
        value, spread = timing.rate(work)
        return cls(value, spread, {"ms": timing.median_ms, **extra})


@dataclass
class Row:
    """One line of the table: hybridlm's rate and its peer's, both in `unit` (higher is
    better). `peer_name` None: the row has no peer; `peer` None with a `peer_name`: the peer
    could not be measured (`peer_error` says why, e.g. transformers missing)."""

    benchmark: str
    name: str
    unit: str
    value: float | None
    spread: tuple[float, float] | None = None
    peer_name: str | None = None
    peer: float | None = None
    peer_spread: tuple[float, float] | None = None
    note: str = ""
    error: str | None = None
    peer_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.peer:
            return None
        return self.value / self.peer

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[..., Any], device: torch.device, *, warmup: int = 3,
    repeats: int = MIN_REPEATS, inputs: Sequence[tuple] | None = None, quick: bool = False,
) -> Timing:
    """Time `fn(*inputs[i % len(inputs)])`: `warmup` untimed calls, then `repeats` timed ones.
    `quick` (smoke tests): one warm-up call and the fewest repeats, whatever was asked."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats={repeats} must be >= {MIN_REPEATS}")
    if quick:
        warmup, repeats = min(warmup, 1), MIN_REPEATS
    inputs = list(inputs) if inputs else [()]
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    synchronize(device)
    samples = []
    for i in range(repeats):
        args = inputs[(warmup + i) % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(samples)


def attempt(what: str, fn: Callable[[], Measured]) -> tuple[Measured | None, str | None]:
    """Run one measurement; a failure becomes an error string for the row instead of
    ending the whole run (one broken path must not cost the other numbers)."""
    progress(f"  {what} ...")
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # the row records it; the traceback goes to the log
        traceback.print_exc(file=sys.stderr)
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        return None, f"{type(exc).__name__}: {first_line}"
    finally:
        release_memory()
    progress(f"  {what}: {result.value:,.4g} ({time.perf_counter() - t0:.0f} s)")
    return result, None


def release_memory() -> None:
    """Drop what the last measurement left (models, optimizer state, compiled graphs'
    buffers) so the next one starts from the same free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peer_row(benchmark: str, name: str, unit: str, ours: tuple[Measured | None, str | None],
             peer_name: str | None, peer: tuple[Measured | None, str | None] = (None, None),
             note: str = "") -> Row:
    """A Row from the (result, error) pairs of `attempt` for hybridlm and its peer."""
    (mine, error), (theirs, peer_error) = ours, peer
    extra = dict(mine.extra) if mine else {}
    if theirs:
        extra.update({f"peer_{k}": v for k, v in theirs.extra.items()})
    return Row(
        benchmark, name, unit, mine.value if mine else None, mine.spread if mine else None,
        peer_name, theirs.value if theirs else None, theirs.spread if theirs else None,
        note, error, peer_error, extra,
    )


def cuda_median_ms(fn: Callable[[], object], repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats` runs, each between two CUDA events, after
    `warmup` untimed runs (the standalone scripts' timer; `measure` is bench.all's)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_parser(module: str, doc: str, device_help: str) -> argparse.ArgumentParser:
    """The flags every standalone benchmark shares: --out, --device, --quick."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--device", choices=("cuda", "cpu"), help=device_help)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    return parser
