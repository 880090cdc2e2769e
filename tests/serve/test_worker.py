"""The engine thread never makes handlers wait for a step: while the engine is busy with long
steps, a submission is admitted before the next step and a cancellation returns at once (a
lock held across steps made both wait, often for many steps, since the stepping thread takes
the lock again before a waiting one wakes)."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from hybridlm.infer.request import StreamDelta
from hybridlm.serve.metrics import Metrics
from hybridlm.serve.worker import EngineWorker

STEP_S = 0.05


class SlowEngine:
    """An engine stand-in: every request emits one delta per step and runs for `steps`."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.requests, self.running, self.waiting = {}, {}, deque()
        self.step_starts: list[float] = []

    def add_choices(self, prompt_ids, params, n):
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        ids = []
        for _ in range(n):
            request_id = len(self.requests)
            self.requests[request_id] = FakeRequest(self.steps)
            self.running[request_id] = self.requests[request_id]
            ids.append(request_id)
        return ids

    def cancel(self, request_id):
        self.running.pop(request_id, None)

    def has_unfinished(self):
        return bool(self.running)

    def step(self):
        self.step_starts.append(time.monotonic())
        time.sleep(STEP_S)  # the device's time: the thread holds no lock here
        for request in self.running.values():
            request.advance()


class FakeRequest:
    def __init__(self, steps: int) -> None:
        self.left, self.deltas, self.tokens = steps, deque(), []

    @property
    def finished(self) -> bool:
        return self.left == 0

    def advance(self) -> None:
        self.left -= 1
        self.tokens.append(1)
        self.deltas.append(StreamDelta(1, "x", self.finished, "length" if self.finished else None))


def test_submissions_and_cancellations_never_wait_for_steps():
    engine = SlowEngine(steps=40)
    worker = EngineWorker(engine, Metrics())

    async def scenario() -> tuple[float, float, list[int]]:
        first, queue = await worker.submit([1], None)
        await queue.get()  # the engine is stepping now
        t0 = time.monotonic()
        second, _ = await worker.submit([2], None)
        admitted = time.monotonic() - t0
        t0 = time.monotonic()
        for _ in range(20):
            worker.cancel(999)  # unknown ids are ignored by the engine
        cancelling = time.monotonic() - t0
        return admitted, cancelling, first + second

    try:
        admitted, cancelling, ids = asyncio.run(scenario())
    finally:
        worker.stop()
    assert ids == [0, 1]
    assert admitted < 2.5 * STEP_S  # before the step after the one running
    assert cancelling < STEP_S / 2  # 20 cancellations, none waited for a step


def test_a_bad_submission_raises_in_its_handler_and_the_worker_goes_on():
    engine = SlowEngine(steps=2)
    worker = EngineWorker(engine, Metrics())

    async def scenario() -> str:
        try:
            await worker.submit([], None)
        except ValueError as err:
            message = str(err)
        _, queue = await worker.submit([3], None)
        while not (await queue.get())[1].finished:
            pass
        return message

    try:
        assert asyncio.run(scenario()) == "prompt_ids is empty"
    finally:
        worker.stop()
