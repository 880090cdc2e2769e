"""The engine's own thread: it steps the engine while any request is pending and hands each
request's deltas to the asyncio queue of the handler waiting on it.

The engine is not thread-safe, so every touch of it (add_request, cancel, step) holds one
lock; handlers never step the engine themselves, so a slow client never stalls the batch.
Handlers submit from a worker thread of asyncio (the lock may wait out a step) and leave
cancellations in an inbox the engine thread empties before each step, so the event loop
never waits for the engine."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hybridlm.infer.engine import Engine
from hybridlm.infer.request import StreamDelta
from hybridlm.infer.sampling_params import SamplingParams
from hybridlm.serve.metrics import Metrics


@dataclass
class Subscriber:
    """Where one engine request's deltas go: an asyncio queue fed from the engine thread,
    as (index, delta) pairs; index: which of the HTTP request's choices it is."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    started: float  # time.monotonic() when it was submitted (for time to first token)
    index: int = 0
    first_seen: bool = False


class EngineWorker:
    """Runs `engine` on a daemon thread; `submit` and `cancel` may be called from any thread."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._wake = threading.Condition()
        self._subscribers: dict[int, Subscriber] = {}
        self._cancelled: list[int] = []  # appended from any thread (list.append is atomic)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="hybridlm-engine", daemon=True)
        self._thread.start()

    async def submit(self, prompt_ids: Sequence[int], params: SamplingParams, n: int = 1
                     ) -> tuple[list[int], asyncio.Queue]:
        """Queue n choices of a prompt (`Engine.add_choices`, whose ValueError it raises);
        their request ids and the one queue their (index, StreamDelta) pairs arrive on,
        each choice's last delta with finished=True."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        return await asyncio.to_thread(self._add, prompt_ids, params, n, loop, queue)

    def _add(self, prompt_ids: Sequence[int], params: SamplingParams, n: int,
             loop: asyncio.AbstractEventLoop, queue: asyncio.Queue
             ) -> tuple[list[int], asyncio.Queue]:
        started = time.monotonic()
        with self._wake:
            request_ids = self.engine.add_choices(prompt_ids, params, n)
            for index, request_id in enumerate(request_ids):
                self._subscribers[request_id] = Subscriber(loop, queue, started, index)
            self._wake.notify()
        return request_ids, queue

    def cancel(self, request_id: int) -> None:
        """Drop a request (finished or not) from the engine before its next step, freeing its
        cache row; returns at once."""
        self._cancelled.append(request_id)
        with self._wake:
            self._wake.notify()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests, read without the lock (a len is atomic)."""
        return len(self.engine.running), len(self.engine.waiting)

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopped or self._cancelled
                                    or self.engine.has_unfinished())
                if self._stopped:
                    return
                self._drop_cancelled()
                if not self.engine.has_unfinished():
                    continue
                try:
                    self.engine.step()
                except Exception as err:  # a bug must not kill the thread every request needs
                    self._fail_all(err)
                    continue
                self._deliver()

    def _drop_cancelled(self) -> None:
        while self._cancelled:
            request_id = self._cancelled.pop()
            self._subscribers.pop(request_id, None)
            self.engine.cancel(request_id)

    def _deliver(self) -> None:
        """Hand every new delta to its handler; finished requests leave the engine."""
        for request_id, subscriber in list(self._subscribers.items()):
            request = self.engine.requests[request_id]
            while request.deltas:
                delta = request.deltas.popleft()
                if not subscriber.first_seen and delta.finish_reason != "timeout":
                    subscriber.first_seen = True
                    self.metrics.first_token(time.monotonic() - subscriber.started)
                subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait,
                                                     (subscriber.index, delta))
            if request.finished:
                self.metrics.tokens_out += len(request.tokens)
                del self._subscribers[request_id]
                self.engine.cancel(request_id)

    def _fail_all(self, err: Exception) -> None:
        """Every pending request ends with an error delta; the engine starts over empty."""
        failure = StreamDelta(None, "", True, f"error: {type(err).__name__}: {err}")
        for request_id, subscriber in self._subscribers.items():
            subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait,
                                                 (subscriber.index, failure))
            self.engine.cancel(request_id)
        self._subscribers.clear()
