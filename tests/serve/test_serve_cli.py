"""`hybridlm serve` as a user runs it: a subprocess on a free port answering as `hybridlm
generate --greedy` does, SIGTERM letting the request in flight finish and exiting 0; a
missing fastapi is a one-line error; the core package never imports fastapi."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from live_server import MODEL_NAME

from cli_errors import assert_one_line_error, run_cli

SRC = Path(__file__).resolve().parents[2] / "src"


def start_server(model_dir: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridlm.cli", "serve", "--model", str(model_dir),
         "--port", "0", "--max-batch", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # "serving 'NAME' on http://127.0.0.1:PORT/v1"
    if "serving" not in line:
        proc.kill()
        pytest.fail(f"no banner: {line!r} {proc.stderr.read()}")
    return proc, line.split(" on ")[1].strip().removesuffix("/v1")


def test_sigterm_finishes_the_request_in_flight_and_exits_0(model_dir, capsys):
    proc, url = start_server(model_dir)
    try:
        assert_generate_equals_served(model_dir, url, capsys)
        events, first = [], threading.Event()

        def stream() -> None:
            body = {"model": MODEL_NAME, "prompt": "Once", "max_tokens": 200,
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30), "no first chunk"
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] in ("length", "stop")  # ran to its end
    assert "Traceback" not in proc.stderr.read()


def assert_generate_equals_served(model_dir: Path, url: str, capsys) -> None:
    prompt = "Once upon a time"
    code, out, err = run_cli(["generate", "--model", str(model_dir), "--prompt", prompt,
                              "--greedy", "--max-new-tokens", "12"], capsys)
    assert code == 0, err
    served = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
    assert prompt + served["choices"][0]["text"] == out.rstrip("\n")


def test_without_fastapi_serve_is_a_one_line_error(model_dir, capsys, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("hybridlm.serve")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now fails
    assert_one_line_error(["serve", "--model", model_dir], "fastapi", "pip install",
                          "hybridlm[serve]", capsys=capsys)


@pytest.mark.parametrize("argv, words", [
    (["--max-batch", "0"], ["--max-batch", ">= 1"]),
    (["--port", "70000"], ["--port", "70000"]),
    (["--api-key", ""], ["--api-key", "empty"]),
    (["--queue-timeout", "0"], ["--queue-timeout", "> 0"]),
    (["--queue-timeout", "nan"], ["--queue-timeout", "finite"]),
    (["--compile"], ["--compile", "--device cuda"]),
])
def test_bad_serve_flags_are_one_line_errors(model_dir, capsys, argv, words):
    assert_one_line_error(["serve", "--model", model_dir, *argv], *words, capsys=capsys)


def test_the_served_weights_take_the_asked_dtype(model_dir):
    from hybridlm.serve.cli import load_engine, serving_dtype

    assert serving_dtype("auto", "cpu") == torch.float32
    engine, _, _ = load_engine(model_dir, 1, "cpu", dtype="bfloat16")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.pool.cache.layers[0].k.dtype == torch.bfloat16  # the cache follows
    engine, _, _ = load_engine(model_dir, 1, "cpu")
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}


def test_a_missing_model_directory_is_a_one_line_error(tmp_path, capsys):
    assert_one_line_error(["serve", "--model", tmp_path / "nowhere"], "nowhere", capsys=capsys)


def test_the_core_package_never_imports_fastapi():
    code = ("import sys, hybridlm, hybridlm.cli, hybridlm.infer.engine, hybridlm.chat; "
            "sys.exit('fastapi' in sys.modules or 'uvicorn' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
