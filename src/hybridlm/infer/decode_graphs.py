"""The engine's decode step with static shapes, captured as CUDA graphs.

A decode step feeds one token to each generating row of the slot pool. Run eagerly, the model
launches hundreds of small kernels per step and the host waits on the device several times
(reading lengths to size the attention), so small batches are bound by Python and launches,
not by the GPU. Here the step is one fixed computation per bucket (rows, window):

- rows: the step covers pool rows 0 .. rows-1 (rows are taken lowest first, so those in use
  stay packed at the front); rows it does not feed get 0 real tokens (`input_lengths`), which
  moves nothing (see layers/cache_rows.py and MambaCache);
- window: attention covers the first `window` slots of each row (`ModelCache.key_window`), a
  static shape that every fed row's length + 1 fits in; nothing is read on the host.

On CUDA each bucket is captured once, on first use or by `capture_all` (a server's
start-up), into a CUDA graph (all graphs share one memory pool) and replayed with the new
tokens copied into its static inputs. Elsewhere, or with `capture=False`, the same static
step runs eagerly: the twin the graphs are tested against, and the reference for the eager
engine path (`Engine._forward`).

Glossary: R rows of a bucket (<= max_batch), W key window, V vocab.
"""

from __future__ import annotations

import torch

from hybridlm.infer.slots import SlotPool
from hybridlm.model import ModelCache

SMALLEST_WINDOW = 64  # the first key-window bucket; windows then double up to the capacity


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit` itself: [1, 2, 4, .., limit]."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def captured(fn, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn() recorded into a CUDA graph (in memory pool `pool`, None: its own) after one
    warm-up run on a side stream, as capture requires -> (graph, fn's output, which every
    replay rewrites in place)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class DecodeGraphs:
    """Runs decode steps over the rows of `pool` with static shapes; `capture` (default: on
    when the pool lives on a CUDA device) records each bucket into a CUDA graph.

    compile: the step's forward also goes through `torch.compile(fullgraph=True)` (fused
    elementwise work: fewer, larger kernels in each graph), at the price of a compilation
    on first use (tens of seconds; the rows and window turn dynamic at their second value,
    so later buckets reuse it). `backend`: torch.compile's (tests use "aot_eager")."""

    def __init__(self, model, pool: SlotPool, capture: bool | None = None,
                 compile: bool = False, backend: str = "inductor") -> None:
        self.model = model
        self.pool = pool
        if compile:
            self.forward = torch.compile(self.forward, fullgraph=True, backend=backend)
        device = pool.cache.lengths.device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {device}")
        max_batch = pool.cache.lengths.shape[0]
        self.row_buckets = buckets(max_batch)
        # Only caches that attend over slots have a window; a pure recurrent stack (Mamba)
        # needs one bucket per row count.
        windowed = any(getattr(layer, "reads_key_window", False) for layer in pool.cache.layers)
        smallest = min(SMALLEST_WINDOW, pool.capacity)
        self.window_buckets = buckets(pool.capacity, smallest) if windowed else [pool.capacity]
        # Static inputs of every bucket: row r's token and its real-token count (1 when the
        # step feeds it, else 0); a bucket of R rows reads columns 0 .. R-1.
        self.inputs = torch.zeros(2, max_batch, dtype=torch.long, device=device)
        self._staging = torch.zeros(2, max_batch, dtype=torch.long,
                                    pin_memory=self.capture)  # host side of `inputs`
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = torch.cuda.graph_pool_handle() if self.capture else None

    def bucket(self, rows_needed: int, window_needed: int) -> tuple[int, int]:
        """The smallest (rows, window) bucket covering rows 0 .. rows_needed-1 and a window of
        window_needed slots (ValueError past the pool)."""
        rows = next((r for r in self.row_buckets if r >= rows_needed), None)
        window = next((w for w in self.window_buckets if w >= window_needed), None)
        if rows is None or window is None:
            raise ValueError(f"a decode step of rows 0..{rows_needed - 1} with {window_needed} "
                             f"slots does not fit the pool ({self.row_buckets[-1]} rows of "
                             f"{self.pool.capacity} slots)")
        return rows, window

    @torch.no_grad()
    def capture_all(self) -> int:
        """Capture every bucket now (a server's start-up) rather than on first use, largest
        first, so the graphs' shared memory pool is sized once; returns how many were new."""
        if not self.capture:
            return 0
        new = 0
        for rows in reversed(self.row_buckets):
            for window in reversed(self.window_buckets):
                new += (rows, window) not in self.graphs
                self._graph(rows, window)
        return new

    @torch.no_grad()
    def decode(self, tokens: dict[int, int], window_needed: int) -> torch.Tensor:
        """Feed tokens (row -> its next token id) at each row's length; the rows' lengths
        advance by one, every other row is untouched. window_needed: a bound on (every fed
        row's length + 1). Returns the logits (R, V) of rows 0 .. R-1 (R >= max row + 1);
        read those of the fed rows before the next call, which overwrites them."""
        rows, window = self.bucket(max(tokens) + 1, window_needed)
        staging = self._staging
        staging[:, :rows].zero_()
        for row, token in tokens.items():
            staging[0, row] = token
            staging[1, row] = 1
        if not self.capture:
            self.inputs[:, :rows].copy_(staging[:, :rows])
            return self._step(rows, window)
        graph, logits = self._graph(rows, window)
        self.inputs[:, :rows].copy_(staging[:, :rows], non_blocking=True)
        graph.replay()
        return logits

    def _graph(self, rows: int, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (rows, window)
        if key not in self.graphs:
            # Warm up on a side stream (as CUDA graph capture requires) with every row fed 0
            # tokens, which changes nothing in the pool: the cache writes land past each
            # row's length, lengths and recurrent states stay (see module docstring).
            self.inputs[:, :rows].zero_()
            self.graphs[key] = captured(lambda: self._step(rows, window), self.mempool)
        return self.graphs[key]

    def _step(self, rows: int, window: int) -> torch.Tensor:
        """One static decode forward of rows 0 .. rows-1 -> logits (rows, V); writes the new
        lengths back to the pool in place (so a graph replay does too)."""
        view = self._view(rows, window)
        logits = self.forward(self.inputs[0, :rows, None], view, self.inputs[1, :rows])
        pool = self.pool.cache
        pool.lengths[:rows].copy_(view.lengths)
        for layer in pool.layers:
            layer.lengths[:rows].copy_(view.lengths)
        return logits

    def forward(self, ids: torch.Tensor, view: ModelCache, input_lengths: torch.Tensor
                ) -> torch.Tensor:
        """ids (R, 1), input_lengths (R,) -> the logits (R, V) of the step."""
        return self.model(ids, cache=view, input_lengths=input_lengths).logits[:, 0]

    def _view(self, rows: int, window: int) -> ModelCache:
        """The pool's rows 0 .. rows-1 as a ModelCache with a key window. Every layer reads
        the pool's model-level lengths (the same memory on every replay); the forward then
        replaces the view's lengths with new tensors, so each run builds its own view."""
        shared = self.pool.cache.lengths[:rows]  # (R,) a view into the pool
        layers = self.pool.view(0, rows).layers
        for layer in layers:
            layer.lengths = shared
        return ModelCache(layers, shared, key_window=window)

