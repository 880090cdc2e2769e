"""Live servers over a model directory on loopback: uvicorn in a thread, a free port each."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from hybridlm import HybridLM
from hybridlm.chat import ChatTemplate
from hybridlm.data import Tokenizer
from hybridlm.infer.engine import Engine
from hybridlm.serve import build_app

MODEL_NAME = "tiny-history"
API_KEY = "sk-test-key"


def load_engine(model_dir: Path, max_batch: int = 4, queue_timeout: float | None = None
                ) -> Engine:
    model = HybridLM.from_pretrained(model_dir)
    return Engine(model, Tokenizer.from_file(model_dir), max_batch=max_batch,
                  queue_timeout=queue_timeout)


@dataclasses.dataclass
class Live:
    url: str  # http://127.0.0.1:PORT
    engine: Engine
    template: ChatTemplate


def serve_in_thread(model_dir: Path, api_key: str | None = None, **engine_options
                    ) -> Iterator[Live]:
    engine = load_engine(model_dir, **engine_options)
    template = ChatTemplate.load(model_dir)
    app = build_app(engine, MODEL_NAME, api_key=api_key, chat_template=template)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, template)
    server.should_exit = True
    thread.join(timeout=20)
