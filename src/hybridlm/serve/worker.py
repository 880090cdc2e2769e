"""The engine's own thread: the only one that touches the engine. It admits submissions,
drops cancellations, steps the engine while any request is pending and hands each request's
deltas to the asyncio queue of the handler waiting on it.

Handlers never wait for a step: `submit` leaves the prompt in an inbox and awaits a future
the engine thread resolves (the request ids, or add_choices' ValueError) before its next
step; `cancel` leaves the id in another inbox. The one lock guards only the inboxes and the
engine thread's sleep while nothing is pending, never a step, so a step never holds back a
submission or the event loop (a lock held across steps starves both: the thread that
releases a lock usually takes it again first).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

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

    def post(self, item: tuple[int, StreamDelta]) -> None:
        """Put item on the handler's queue, from the engine thread. A handler whose event loop
        has closed (a server stopping) loses it; the engine thread goes on."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # "Event loop is closed"
            pass


@dataclass
class Submission:
    """A prompt waiting in the inbox; `result` gets its request ids or add_choices' error."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    n: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    started: float
    result: Future = field(default_factory=Future)


class EngineWorker:
    """Runs `engine` on a daemon thread; `submit` and `cancel` may be called from any thread."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._wake = threading.Condition()  # guards the inboxes and _stopped
        self._subscribers: dict[int, Subscriber] = {}  # engine thread only
        self._inbox: list[Submission] = []
        self._cancelled: list[int] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="hybridlm-engine", daemon=True)
        self._thread.start()

    async def submit(self, prompt_ids: Sequence[int], params: SamplingParams, n: int = 1
                     ) -> tuple[list[int], asyncio.Queue]:
        """Queue n choices of a prompt (`Engine.add_choices`, whose ValueError it raises);
        their request ids and the one queue their (index, StreamDelta) pairs arrive on,
        each choice's last delta with finished=True."""
        submission = Submission(prompt_ids, params, n, asyncio.get_running_loop(),
                                asyncio.Queue(), time.monotonic())
        with self._wake:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            self._inbox.append(submission)
            self._wake.notify()
        request_ids = await asyncio.wrap_future(submission.result)
        return request_ids, submission.queue

    def cancel(self, request_id: int) -> None:
        """Drop a request (finished or not) from the engine before its next step, freeing its
        cache row; returns at once."""
        with self._wake:
            self._cancelled.append(request_id)
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
                self._wake.wait_for(lambda: self._stopped or self._inbox or self._cancelled
                                    or self.engine.has_unfinished())
                if self._stopped:
                    self._refuse(self._inbox)
                    return
                inbox, self._inbox = self._inbox, []
                cancelled, self._cancelled = self._cancelled, []
            self._drop_cancelled(cancelled)
            self._admit(inbox)
            if not self.engine.has_unfinished():
                continue
            try:
                self.engine.step()
            except Exception as err:  # a bug must not kill the thread every request needs
                self._fail_all(err)
                continue
            self._deliver()

    def _admit(self, inbox: list[Submission]) -> None:
        for submission in inbox:
            try:
                request_ids = self.engine.add_choices(submission.prompt_ids, submission.params,
                                                      submission.n)
            except Exception as err:  # a bad request: its handler answers it
                submission.result.set_exception(err)
                continue
            for index, request_id in enumerate(request_ids):
                self._subscribers[request_id] = Subscriber(
                    submission.loop, submission.queue, submission.started, index)
            submission.result.set_result(request_ids)

    @staticmethod
    def _refuse(inbox: list[Submission]) -> None:
        for submission in inbox:
            submission.result.set_exception(RuntimeError("the server is shutting down"))

    def _drop_cancelled(self, cancelled: list[int]) -> None:
        for request_id in cancelled:
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
                subscriber.post((subscriber.index, delta))
            if request.finished:
                self.metrics.tokens_out += len(request.tokens)
                del self._subscribers[request_id]
                self.engine.cancel(request_id)

    def _fail_all(self, err: Exception) -> None:
        """Every pending request ends with an error delta; the engine starts over empty."""
        failure = StreamDelta(None, "", True, f"error: {type(err).__name__}: {err}")
        for request_id, subscriber in self._subscribers.items():
            subscriber.post((subscriber.index, failure))
            self.engine.cancel(request_id)
        self._subscribers.clear()
