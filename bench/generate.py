"""Decode speed through the continuous-batching engine, next to HF LlamaForCausalLM.generate.

    python -m bench.generate --out FILE.json [--device cuda|cpu] [--quick]
        [--batches 1,8,32,128] [--new-tokens 128] [--max-minutes 7] [--dtype bf16|fp32]

Models, random weights (bf16 on CUDA, fp32 on the CPU): `complexity-deep-187m`,
`nexus-small` (Mamba + MoE) and "187m MLA" (the 187m preset with every mixer latent
attention). For each batch size B an Engine of max_batch B gets B prompts of PROMPT_TOKENS
random ids at once, greedy, max_tokens N and no stop ids, so every request runs its N tokens
(checked). The first step prefills every prompt and samples each first token: time to first
token (TTFT) is from the submission to its end. Decode tokens/s is the B x (N - 1) tokens of
the steps after it over their wall time; the interquartile range is that of the steps' own
rates. A warm-up run of WARMUP_TOKENS on the same Engine comes first, so CUDA graph capture,
allocator growth and autotuning stay out of the numbers.

Peers, in the same process: HF `LlamaForCausalLM.generate` at the 187m model's active
dimensions (bench/train_187m.py's peer), greedy, `min_new_tokens = max_new_tokens` so it
never stops early, once with its dynamic cache and once with `cache_implementation="static"`
(which transformers compiles on CUDA by itself); a streamer stamps each token, so TTFT and
decode tokens/s mean the same as above. `HybridLM.generate` (the lock-step path) runs last:
TTFT is a 1-token call, decode the N-token call's time beyond it.

A batch size that runs out of memory is recorded as skipped with the reason, as is every
measurement left when `--max-minutes` is spent (they run in `plans`' order: the 187m engine,
HF dynamic, the other engines, HF static, HybridLM.generate). `--out` is rewritten after
each measurement.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bench import peers, train_187m, train_nexus
from bench.report import number, write_json
from bench.timing import Row, bench_parser, progress, release_memory, synchronize
from hybridlm import HybridLM, ModelConfig
from hybridlm.infer.engine import Engine
from hybridlm.infer.sampling_params import SamplingParams

NAME = "generate"
BATCHES, QUICK_BATCHES = (1, 8, 32, 128), (1, 2)
NEW_TOKENS, QUICK_NEW_TOKENS = 128, 8
PROMPT_TOKENS, QUICK_PROMPT_TOKENS = 32, 8
WARMUP_TOKENS = 16
MAX_MINUTES = 7.0  # sizes chosen for about 6 minutes on an H100 (estimated, not yet run);
# a cell already running finishes past it, inside the device's 10-minute limit
HF_DYNAMIC, HF_STATIC = "HF Llama dynamic cache", "HF Llama static cache"
HF_DYNAMIC_NAME = "HF LlamaForCausalLM.generate, dynamic cache"
HF_STATIC_NAME = "HF LlamaForCausalLM.generate, static cache"
ENGINE_187M = "187m engine"
ENGINE_187M_COMPILED = "187m engine, compiled decode"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Stack:
    """A hybridlm model of the table: a preset with overrides (full and quick sizes)."""

    label: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    quick_overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, quick: bool) -> ModelConfig:
        return ModelConfig.from_preset(
            self.preset, **{**self.overrides, **(self.quick_overrides if quick else {})})


STACKS = (
    Stack("187m", "complexity-deep-187m", quick_overrides=train_187m.QUICK_SIZES),
    Stack("nexus-small", "nexus-small", quick_overrides=train_nexus.QUICK_SIZES),
    Stack("187m MLA", "complexity-deep-187m", {"mixer_pattern": "L"},
          {**train_187m.QUICK_SIZES, "mla_kv_rank": 32, "mla_rope_dim": 8}),
)


@dataclass
class Cell:
    """One (model, batch) measurement. status "ok", "skipped" (out of memory, time budget,
    transformers missing) or "error"; `reason` says why for the latter two."""

    model: str
    batch: int
    status: str = "ok"
    reason: str | None = None
    tokens_per_s: float | None = None
    spread: tuple[float, float] | None = None  # (slow, fast) quartiles of the steps' rates
    ttft_ms: float | None = None
    decode_s: float | None = None
    warmup_s: float | None = None


@dataclass
class Decoded:
    """What one timed generation gave: its decode rate, spread and TTFT."""

    tokens_per_s: float
    spread: tuple[float, float] | None
    ttft_ms: float
    decode_s: float


# --- one timed generation per path -------------------------------------------------------
def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """B random prompts, ids in [1, vocab): id 0 (end-of-text in hybridlm's tokenizers) left
    out. The same for every model (they share the vocab) and every run."""
    g = torch.Generator().manual_seed(batch)
    return torch.randint(1, vocab, (batch, length), generator=g).tolist()


def from_stamps(t0: float, stamps: list[float], tokens: list[int]) -> Decoded:
    """stamps[i]: when the i-th step (all rows) ended, tokens[i]: the tokens it gave; step 0
    gave every row its first token."""
    decode_s = stamps[-1] - stamps[0]
    if len(stamps) < 2 or decode_s <= 0:
        raise RuntimeError("a timed generation needs at least 2 tokens per row "
                           "(--new-tokens >= 2)")
    steps_ms = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]
    rates = [n / ms * 1e3 for n, ms in zip(tokens[1:], steps_ms, strict=True)]
    spread = None
    if len(rates) >= 4:  # quartiles of the steps' own rates
        q1, _, q3 = statistics.quantiles(rates, n=4, method="inclusive")
        spread = (q1, q3)
    return Decoded(sum(tokens[1:]) / decode_s, spread, (stamps[0] - t0) * 1e3, decode_s)


def engine_run(engine: Engine, batch_prompts: list[list[int]], new_tokens: int,
               device: torch.device) -> Decoded:
    params = SamplingParams(max_tokens=new_tokens, temperature=0)  # no stop ids: N tokens
    synchronize(device)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in batch_prompts]
    requests = [engine.requests[i] for i in ids]
    stamps, totals = [], []
    while engine.has_unfinished():
        engine.step()
        synchronize(device)
        stamps.append(time.perf_counter())
        totals.append(sum(len(r.tokens) for r in requests))
    for request in requests:
        if len(request.tokens) != new_tokens:
            raise RuntimeError(f"a request ended after {len(request.tokens)} of {new_tokens} "
                               f"tokens (finish_reason {request.finish_reason!r})")
    # The step after which every row had its first token starts the decode phase (one step
    # here: prompts shorter than the prefill chunk are fed whole).
    start = next(i for i, total in enumerate(totals) if total >= len(requests))
    tokens = [totals[start]] + [b - a for a, b in itertools.pairwise(totals[start:])]
    for i in ids:
        engine.cancel(i)  # forget the finished requests (their rows are free already)
    return from_stamps(t0, stamps[start:], tokens)


def hybridlm_generate_run(model: HybridLM, batch_prompts: list[list[int]], new_tokens: int,
                          device: torch.device) -> Decoded:
    """The lock-step path: TTFT from a 1-token call (the fastest of 3), decode from the
    N-token call's time beyond it."""
    ids = torch.tensor(batch_prompts, device=device)

    def timed(n: int) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        out = model.generate(ids, n, do_sample=False)
        synchronize(device)
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"HybridLM.generate gave {out.shape[1] - ids.shape[1]} of {n} "
                               "tokens")
        return time.perf_counter() - t0

    # The least of three 1-token calls: noise on a short call must not eat the difference.
    first_s = min(timed(1) for _ in range(3))
    whole_s = timed(new_tokens)
    decode_s = whole_s - first_s
    if decode_s <= 0:
        raise RuntimeError(f"{new_tokens} tokens took no longer than 1 ({whole_s:.4f} s)")
    return Decoded(len(batch_prompts) * (new_tokens - 1) / decode_s, None, first_s * 1e3,
                   decode_s)


def hf_run(model, batch_prompts: list[list[int]], new_tokens: int, device: torch.device,
           static: bool) -> Decoded:
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """Stamps each put: first the prompt, then one per generated token (all rows)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.tensor(batch_prompts, device=device)
    clock = StepClock()
    extra = {"cache_implementation": "static"} if static else {}
    synchronize(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=0, streamer=clock, **extra)
    synchronize(device)
    if out.shape[1] != ids.shape[1] + new_tokens or len(clock.stamps) != new_tokens + 1:
        raise RuntimeError(f"HF generate gave {out.shape[1] - ids.shape[1]} of {new_tokens} "
                           f"tokens in {len(clock.stamps) - 1} streamed steps")
    return from_stamps(t0, clock.stamps[1:], [len(batch_prompts)] * new_tokens)


# --- the run ----------------------------------------------------------------------------
@dataclass
class Plan:
    """A model to build once and the measurement of one batch size on it."""

    label: str
    build: Callable[[], Any]
    measure: Callable[[Any, int], tuple[Decoded, float]]  # -> (timed, warm-up seconds)
    needs_transformers: bool = False


def timed_with_warmup(warm: Callable[[], object], timed: Callable[[], Decoded]
                      ) -> tuple[Decoded, float]:
    """(the timed run's result, the warm-up's seconds); the warm-up runs first."""
    t0 = time.perf_counter()
    warm()
    warmup_s = time.perf_counter() - t0
    return timed(), warmup_s


def plans(device: torch.device, dtype: torch.dtype, quick: bool, new_tokens: int,
          prompt_tokens: int) -> list[Plan]:
    def hybridlm_model(stack: Stack) -> Callable[[], HybridLM]:
        def build() -> HybridLM:
            torch.manual_seed(0)
            with device:  # initialised where it runs: seconds fewer than on the host
                return HybridLM(stack.config(quick)).to(dtype).eval()
        return build

    def engine_measure(model: HybridLM, batch: int, compile_decode: bool = False
                       ) -> tuple[Decoded, float]:
        batch_prompts = prompts(batch, prompt_tokens, model.config.vocab_size)
        engine = Engine(model, max_batch=batch, compile_decode=compile_decode)
        # As a server starts: every decode graph captured (and compiled) before the clock runs.
        return timed_with_warmup(
            lambda: (engine.warm_up(),
                     engine_run(engine, batch_prompts, min(new_tokens, WARMUP_TOKENS), device)),
            lambda: engine_run(engine, batch_prompts, new_tokens, device))

    def generate_measure(model: HybridLM, batch: int) -> tuple[Decoded, float]:
        batch_prompts = prompts(batch, prompt_tokens, model.config.vocab_size)
        ids = torch.tensor(batch_prompts, device=device)
        return timed_with_warmup(
            lambda: model.generate(ids, min(new_tokens, WARMUP_TOKENS), do_sample=False),
            lambda: hybridlm_generate_run(model, batch_prompts, new_tokens, device))

    peer_config = STACKS[0].config(quick)

    def hf_model():
        with torch.device("meta"):
            width = train_187m.active_mlp_width(HybridLM(peer_config))
        torch.manual_seed(0)
        cfg = peer_config
        return peers.hf_llama(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                              cfg.num_key_value_heads, width, cfg.vocab_size,
                              cfg.max_position_embeddings, device).to(dtype).eval()

    def hf_measure(static: bool) -> Callable[[Any, int], tuple[Decoded, float]]:
        def measure(model, batch: int) -> tuple[Decoded, float]:
            batch_prompts = prompts(batch, prompt_tokens, peer_config.vocab_size)
            # The static cache is sized by max_new_tokens and compiled for its shape: only
            # the same call warms it up.
            warm_tokens = new_tokens if static else min(new_tokens, WARMUP_TOKENS)
            return timed_with_warmup(
                lambda: hf_run(model, batch_prompts, warm_tokens, device, static),
                lambda: hf_run(model, batch_prompts, new_tokens, device, static))
        return measure

    engines = [Plan(f"{stack.label} engine", hybridlm_model(stack), engine_measure)
               for stack in STACKS]
    # The decode step compiled too (Engine(compile_decode=True): CUDA graphs only).
    compiled = ([Plan(ENGINE_187M_COMPILED, hybridlm_model(STACKS[0]),
                      lambda model, batch: engine_measure(model, batch, compile_decode=True))]
                if device.type == "cuda" else [])
    # The order a spent time budget cuts from the end: the targets first, then the
    # static-cache peer (transformers compiles it for each batch size: minutes on a GPU),
    # then the compiled decode step (compiled and captured at every batch size).
    return [
        engines[0],
        Plan(HF_DYNAMIC, hf_model, hf_measure(static=False), needs_transformers=True),
        *engines[1:],
        Plan(HF_STATIC, hf_model, hf_measure(static=True), needs_transformers=True),
        *compiled,
        Plan("187m HybridLM.generate", hybridlm_model(STACKS[0]), generate_measure),
    ]


def measure_plan(plan: Plan, batches: tuple[int, ...], deadline: float,
                 on_cell: Callable[[Cell], None]) -> None:
    """Every batch size of one plan; a failure to build fails each of its cells."""
    def record(cell: Cell) -> None:
        shown = number(cell.tokens_per_s) if cell.status == "ok" else cell.reason
        progress(f"  {plan.label} B{cell.batch}: {shown}")
        on_cell(cell)

    if plan.needs_transformers and peers.transformers_module() is None:
        for batch in batches:
            record(Cell(plan.label, batch, "skipped", peers.MISSING))
        return
    if time.monotonic() > deadline:
        for batch in batches:
            record(Cell(plan.label, batch, "skipped", "time budget (--max-minutes) spent"))
        return
    progress(f"  {plan.label} ...")
    try:
        model = plan.build()
    except Exception as exc:
        status = "skipped" if isinstance(exc, torch.OutOfMemoryError) else "error"
        for batch in batches:
            record(Cell(plan.label, batch, status, f"building the model: {failure(exc)}"))
        release_memory()
        return
    for batch in batches:
        if time.monotonic() > deadline:
            record(Cell(plan.label, batch, "skipped", "time budget (--max-minutes) spent"))
            continue
        record(measure_cell(plan, model, batch))
    del model
    release_memory()


def measure_cell(plan: Plan, model: Any, batch: int) -> Cell:
    try:
        decoded, warmup_s = plan.measure(model, batch)
    except torch.OutOfMemoryError as exc:
        return Cell(plan.label, batch, "skipped", f"out of memory: {failure(exc)}")
    except Exception as exc:  # the cell records it; the traceback goes to the log
        import traceback

        traceback.print_exc(file=sys.stderr)
        return Cell(plan.label, batch, "error", failure(exc))
    finally:
        release_memory()
    return Cell(plan.label, batch, "ok", None, decoded.tokens_per_s, decoded.spread,
                decoded.ttft_ms, decoded.decode_s, warmup_s)


def failure(exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}"


# --- rows and the table -----------------------------------------------------------------
def row_of(name: str, ours: Cell | None, peer_name: str | None, peer: Cell | None,
           note: str) -> Row:
    """A bench.report row: hybridlm's cell against a peer's cell (same batch)."""
    def error(cell: Cell | None) -> str | None:
        if cell is None:
            return "not measured"
        if cell.status == "skipped" and not cell.reason.startswith("n/a"):
            return f"skipped: {cell.reason}"
        return None if cell.status == "ok" else cell.reason

    extra: dict[str, Any] = {}
    if ours is not None and ours.status == "ok":
        extra.update(ttft_ms=ours.ttft_ms, decode_s=ours.decode_s, warmup_s=ours.warmup_s)
    if peer is not None and peer.status == "ok":
        extra.update(peer_ttft_ms=peer.ttft_ms, peer_decode_s=peer.decode_s)
    return Row(NAME, name, "tokens/s", ours.tokens_per_s if ours else None,
               ours.spread if ours else None, peer_name, peer.tokens_per_s if peer else None,
               peer.spread if peer else None, note, error(ours), error(peer), extra)


def rows_of(cells: list[Cell], new_tokens: int, prompt_tokens: int) -> list[Row]:
    by = {(c.model, c.batch): c for c in cells}
    note = f"{prompt_tokens} prompt + {new_tokens} new tokens per row, greedy"
    rows = []
    for batch in sorted({c.batch for c in cells}):
        hf_dynamic, hf_static = by.get((HF_DYNAMIC, batch)), by.get((HF_STATIC, batch))
        engine_187m = by.get((ENGINE_187M, batch))
        rows += [
            row_of(f"decode 187m engine B{batch}", engine_187m, HF_DYNAMIC_NAME, hf_dynamic,
                   note),
            row_of(f"decode 187m engine vs HF static B{batch}", engine_187m, HF_STATIC_NAME,
                   hf_static, note),
        ]
        for stack in STACKS[1:]:
            label = f"{stack.label} engine"
            rows.append(row_of(f"decode {label} B{batch}", by.get((label, batch)),
                               HF_DYNAMIC_NAME, hf_dynamic, note))
        rows.append(row_of(f"decode 187m engine, compiled decode B{batch}",
                           by.get((ENGINE_187M_COMPILED, batch)), HF_DYNAMIC_NAME, hf_dynamic,
                           note))
        rows += [
            row_of(f"decode nexus-small vs 187m B{batch}", by.get(("nexus-small engine", batch)),
                   "hybridlm 187m engine", engine_187m, "the issue's target: within 2x"),
            row_of(f"decode 187m HybridLM.generate B{batch}",
                   by.get(("187m HybridLM.generate", batch)), HF_DYNAMIC_NAME, hf_dynamic,
                   note),
        ]
    return [r for r in rows if r.value is not None or r.error != "not measured"]


def cell_table(cells: list[Cell]) -> str:
    """model | batch | tokens/s | vs HF dynamic | TTFT ms | note, one line per cell."""
    hf = {c.batch: c.tokens_per_s for c in cells if c.model == HF_DYNAMIC and c.status == "ok"}
    header = ["model", "batch", "tokens/s", "vs HF dynamic", "TTFT ms", "note"]
    lines = [header]
    for c in cells:
        ratio = (f"{c.tokens_per_s / hf[c.batch]:.2f}x"
                 if c.tokens_per_s is not None and hf.get(c.batch) else "—")
        lines.append([c.model, str(c.batch), number(c.tokens_per_s), ratio,
                      number(c.ttft_ms), c.reason or ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(" | ".join([*(cell.ljust(w) for cell, w in zip(line, widths,
                                                                     strict=False)), line[-1]])
                     for line in lines)


# --- entry points -----------------------------------------------------------------------
def measure(device: torch.device, quick: bool, batches: tuple[int, ...] | None = None,
            new_tokens: int | None = None, dtype: torch.dtype | None = None,
            max_minutes: float = MAX_MINUTES,
            on_cell: Callable[[list[Cell]], None] | None = None) -> list[Cell]:
    batches = batches or (QUICK_BATCHES if quick else BATCHES)
    new_tokens = new_tokens or (QUICK_NEW_TOKENS if quick else NEW_TOKENS)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    prompt_tokens = QUICK_PROMPT_TOKENS if quick else PROMPT_TOKENS
    deadline = time.monotonic() + max_minutes * 60
    cells: list[Cell] = []

    def add(cell: Cell) -> None:
        cells.append(cell)
        if on_cell is not None:
            on_cell(cells)

    for plan in plans(device, dtype, quick, new_tokens, prompt_tokens):
        measure_plan(plan, batches, deadline, add)
    return cells


def run(device: torch.device, quick: bool) -> list[Row]:
    """bench.all's entry: the default sizes (or the quick ones)."""
    new_tokens = QUICK_NEW_TOKENS if quick else NEW_TOKENS
    prompt_tokens = QUICK_PROMPT_TOKENS if quick else PROMPT_TOKENS
    return rows_of(measure(device, quick), new_tokens, prompt_tokens)


def positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be comma-separated ints >= 1, e.g. 1,8,32,128") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated ints >= 1")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.generate", __doc__, "default: cuda when available, else cpu")
    parser.add_argument("--batches", type=positive_ints,
                        help=f"default {','.join(map(str, BATCHES))} "
                             f"(quick: {','.join(map(str, QUICK_BATCHES))})")
    parser.add_argument("--new-tokens", type=int,
                        help=f"tokens generated per row, >= 2 (default {NEW_TOKENS}, "
                             f"quick {QUICK_NEW_TOKENS})")
    parser.add_argument("--max-minutes", type=float, default=MAX_MINUTES,
                        help="measurements left when this is spent are recorded as skipped "
                             f"(default {MAX_MINUTES})")
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="weights and caches of every model (default bf16 on cuda, fp32 "
                             "on cpu)")
    args = parser.parse_args(argv)
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens} must be >= 2 (decode speed is measured "
                     "after each row's first token)")
    if args.max_minutes <= 0:
        parser.error(f"--max-minutes {args.max_minutes} must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.all import new_results

    args = parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        torch.set_num_threads(1)  # as bench.all: tiny sizes lose to a spinning thread pool
    dtype = DTYPES[args.dtype] if args.dtype else None
    results = new_results("bench.generate", argv, device, args.quick)
    results["benchmarks"] = [NAME]
    new_tokens = args.new_tokens or (QUICK_NEW_TOKENS if args.quick else NEW_TOKENS)
    prompt_tokens = QUICK_PROMPT_TOKENS if args.quick else PROMPT_TOKENS
    used_dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    results["settings"] = {
        "batches": list(args.batches or (QUICK_BATCHES if args.quick else BATCHES)),
        "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
        "warmup_tokens": min(new_tokens, WARMUP_TOKENS), "dtype": str(used_dtype),
        "max_minutes": args.max_minutes,
    }
    progress(f"{results['device']['name']}, torch {results['versions']['torch']}")
    started = time.perf_counter()

    def save(cells: list[Cell]) -> None:
        results["cells"] = [asdict(c) for c in cells]
        results["rows"] = [r.to_dict() for r in rows_of(cells, new_tokens, prompt_tokens)]
        results["elapsed_s"] = round(time.perf_counter() - started, 1)
        if args.out is not None:
            write_json(results, args.out)

    cells = measure(device, args.quick, args.batches, new_tokens, dtype, args.max_minutes,
                    save)
    save(cells)
    print(cell_table(cells))
    return results


if __name__ == "__main__":
    main()
