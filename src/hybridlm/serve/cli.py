"""What `hybridlm serve` runs: load a model directory into an Engine, bind, serve until
SIGTERM / Ctrl-C, then let in-flight requests finish (for at most GRACE_S) and return."""

from __future__ import annotations

import math
import signal
import socket
import threading
from pathlib import Path

import torch

from hybridlm.chat import ChatTemplate
from hybridlm.data import Tokenizer
from hybridlm.infer.engine import Engine
from hybridlm.model import HybridLM
from hybridlm.serve.app import build_app

GRACE_S = 30  # the longest a shutdown waits for requests still running


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serving_dtype(name: str, device: str) -> torch.dtype:
    """--dtype: "auto" is bfloat16 on a GPU that supports it, float32 otherwise."""
    if name == "auto":
        return (torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported()
                else torch.float32)
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_engine(model_dir: str, max_batch: int, device: str, queue_timeout: float = 60.0,
                dtype: str = "auto", compile_decode: bool = False
                ) -> tuple[Engine, str, ChatTemplate]:
    """An Engine over the model directory's model (in `dtype`, see `serving_dtype`) and
    tokenizer, the name it is served as (the directory's name) and its chat template. On
    CUDA the engine decodes with CUDA graphs; compile_decode also compiles that step."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"--max-batch {max_batch} must be an int >= 1")
    if not (math.isfinite(queue_timeout) and queue_timeout > 0):
        raise ValueError(f"--queue-timeout {queue_timeout} must be a finite number of "
                         "seconds > 0")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    if compile_decode and device != "cuda":
        raise ValueError("--compile compiles the CUDA-graph decode step: it needs --device cuda")
    weights_dtype = serving_dtype(dtype, device)
    model = HybridLM.from_pretrained(model_dir).to(device, weights_dtype).eval()
    tokenizer = Tokenizer.from_file(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but "
                         f"the model's vocab_size is {model.config.vocab_size}: the "
                         "tokenizer.json there is not the one the model was trained with")
    engine = Engine(model, tokenizer, max_batch=max_batch, queue_timeout=queue_timeout,
                    compile_decode=compile_decode)
    engine.warm_up()  # every decode graph captured before the first request
    return engine, Path(model_dir).resolve().name, ChatTemplate.load(model_dir)


def run_server(uvicorn, engine: Engine, name: str, template: ChatTemplate, host: str,
               port: int, api_key: str | None) -> None:
    """Bind first (a taken port is a one-line OSError, not a log line), then serve."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port {port} must lie in [0, 65536)")
    if api_key is not None and not api_key:
        raise ValueError("--api-key is empty: give a key, or leave the flag out")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    app = build_app(engine, name, api_key=api_key, chat_template=template)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACE_S)
    print(f"serving {name!r} on http://{host}:{sock.getsockname()[1]}/v1", flush=True)
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])
        return
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler
    # found before it: an ignoring one makes that a clean exit 0, as a service manager wants.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
