"""Concurrent streaming clients against a live `hybridlm serve`: aggregate tokens/s, latency.

    python -m bench.serve_load --out FILE.json [--device cuda|cpu] [--clients 64] [--quick]
        [--max-tokens 128] [--rounds 2] [--max-batch N]

Saves a random-weight `complexity-deep-187m` model directory (with a byte-level BPE tokenizer
trained on the demo corpus at the model's vocab size) to a temporary directory, starts
`hybridlm serve --port 0` on it as a subprocess (the port it picks is read from its banner,
then /health is awaited), and runs `--clients` concurrent clients, each streaming
`--rounds` completions one after the other over `/v1/completions` (PROMPT_TOKENS random
token ids, greedy, `max_tokens` fixed). A first round of every client, untimed, warms the
server up (CUDA graphs, allocator). Reported: generated tokens (each reply's
`usage.completion_tokens`) over the wall time of the timed rounds, p50/p99 request latency
and p50/p99 time to first token (the first streamed chunk that carries text). The server is
then sent SIGTERM and must exit 0.

Every request runs its max_tokens: the server stops a reply at end-of-text, so the saved
model's end-of-text row of the tied embedding is zeroed: its logit is then exactly 0, below
the largest of the other logits, and greedy decoding never picks it (checked: the count of
complete replies is recorded, and a short reply fails the run).

Needs the serve extra (fastapi, uvicorn, pydantic) and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import train_187m
from bench.report import number, write_json
from bench.timing import Row, bench_parser, progress

NAME = "serve_load"
PRESET = "complexity-deep-187m"
CLIENTS, QUICK_CLIENTS = 64, 4
MAX_TOKENS, QUICK_MAX_TOKENS = 128, 8
ROUNDS, QUICK_ROUNDS = 2, 1
PROMPT_TOKENS, QUICK_PROMPT_TOKENS = 32, 8
QUICK_TOKENIZER_DOCS = 20  # documents of the demo corpus a quick tokenizer trains on
START_TIMEOUT_S = 300  # loading a model onto a GPU and importing torch take a while
STOP_TIMEOUT_S = 60  # the server itself waits at most 30 s for requests in flight
REQUEST_TIMEOUT_S = 600
MODEL_NAME = "complexity-deep-187m-random"


@dataclass
class Reply:
    """One streamed completion as its client saw it."""

    latency_s: float
    ttft_s: float
    tokens: int


# --- the model directory ------------------------------------------------------------------
def save_model_dir(out: Path, quick: bool) -> list[int]:
    """A random-weight preset model + tokenizer in `out`; -> the token ids prompts draw from
    (those that decode alone to whole characters, so the text streams from the first token)."""
    from hybridlm import HybridLM, ModelConfig
    from hybridlm.data import DEMO_CORPUS, Tokenizer, load_documents

    config = ModelConfig.from_preset(PRESET, **(train_187m.QUICK_SIZES if quick else {}))
    docs = load_documents(DEMO_CORPUS)
    texts = [d.text for d in (docs[:QUICK_TOKENIZER_DOCS] if quick else docs)]
    tokenizer = Tokenizer.train(texts, vocab_size=config.vocab_size)
    torch.manual_seed(0)
    model = HybridLM(config)
    with torch.no_grad():  # end-of-text's logit becomes exactly 0: greedy never picks it
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.save_pretrained(out)
    tokenizer.save(out)
    return [i for i in range(1, tokenizer.vocab_size)
            if (text := tokenizer.decode([i])) and "\ufffd" not in text]


# --- the server ---------------------------------------------------------------------------
class Server:
    """`hybridlm serve` in a subprocess; its output goes to `log`."""

    def __init__(self, model_dir: Path, max_batch: int, device: str, log: Path) -> None:
        import hybridlm

        src = str(Path(hybridlm.__file__).resolve().parents[1])
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hybridlm.cli", "serve", "--model", str(model_dir),
             "--port", "0", "--max-batch", str(max_batch), "--device", device],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """The server's base URL once its banner is out and /health answers."""
        import httpx

        deadline = time.monotonic() + timeout_s
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hybridlm serve exited with {self.proc.returncode} before "
                                   f"it was ready:\n{self.log_tail()}")
            if url is None:
                found = re.search(r" on (http://\S+)/v1", self.log.read_text(errors="replace"))
                url = found.group(1) if found else None
            if url is not None:
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.25)
        raise RuntimeError(f"hybridlm serve was not ready within {timeout_s:.0f} s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, then its exit code (None: it had to be killed)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        finally:
            self._log_file.close()


# --- the clients --------------------------------------------------------------------------
async def stream_completion(client, url: str, body: dict) -> Reply:
    t0 = time.perf_counter()
    ttft, tokens = None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status_code}: {text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error'].get('message')}")
            if chunk["choices"]:  # the last chunk holds usage alone
                choice = chunk["choices"][0]
                if ttft is None and (choice.get("text") or choice.get("finish_reason")):
                    ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the stream ended without usage (no final chunk)")
    return Reply(time.perf_counter() - t0, ttft, tokens)


async def load(url: str, clients: int, rounds: int, max_tokens: int,
               prompts: list[list[int]]) -> tuple[list[Reply], float]:
    """Every client streams `rounds` completions in turn; -> the replies and the wall time."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:

        async def one_client(index: int) -> list[Reply]:
            body = {"model": MODEL_NAME, "prompt": prompts[index], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            return [await stream_completion(client, url, body) for _ in range(rounds)]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(i) for i in range(clients)))
        wall_s = time.perf_counter() - t0
    return [reply for replies in per_client for reply in replies], wall_s


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """p50 and p99 (inclusive method: within the samples' range) in milliseconds."""
    if len(values) == 1:
        return {"p50": values[0] * 1e3, "p99": values[0] * 1e3}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49] * 1e3, "p99": cuts[98] * 1e3}


# --- the run ------------------------------------------------------------------------------
def measure(device: torch.device, quick: bool, clients: int | None = None,
            max_tokens: int | None = None, rounds: int | None = None,
            max_batch: int | None = None) -> dict[str, Any]:
    """Start a server, load it, stop it; -> what was measured (the `load` of the JSON)."""
    clients = clients or (QUICK_CLIENTS if quick else CLIENTS)
    max_tokens = max_tokens or (QUICK_MAX_TOKENS if quick else MAX_TOKENS)
    rounds = rounds or (QUICK_ROUNDS if quick else ROUNDS)
    max_batch = max_batch or clients
    prompt_tokens = QUICK_PROMPT_TOKENS if quick else PROMPT_TOKENS
    settings = {"clients": clients, "max_tokens": max_tokens, "rounds": rounds,
                "max_batch": max_batch, "prompt_tokens": prompt_tokens, "preset": PRESET,
                "weights": "random, saved in float32; served in --dtype auto (bfloat16 on CUDA)"}
    with tempfile.TemporaryDirectory(prefix="hybridlm-serve-load-") as tmp:
        t0 = time.perf_counter()
        model_dir = Path(tmp) / MODEL_NAME
        ids = save_model_dir(model_dir, quick)
        g = torch.Generator().manual_seed(0)
        picks = torch.randint(0, len(ids), (clients, prompt_tokens), generator=g).tolist()
        prompts = [[ids[i] for i in row] for row in picks]
        progress(f"  model directory saved ({time.perf_counter() - t0:.0f} s); starting "
                 f"hybridlm serve --max-batch {max_batch} --device {device.type}")
        server = Server(model_dir, max_batch, device.type, Path(tmp) / "server.log")
        failed = True
        try:
            t0 = time.perf_counter()
            url = server.wait_ready()
            startup_s = time.perf_counter() - t0
            progress(f"  ready at {url} ({startup_s:.0f} s); warm-up round")
            _, warmup_s = asyncio.run(load(url, clients, 1, max_tokens, prompts))
            progress(f"  warm-up {warmup_s:.1f} s; {rounds} timed round(s) of {clients} "
                     "clients")
            replies, wall_s = asyncio.run(load(url, clients, rounds, max_tokens, prompts))
            failed = False
        finally:
            exit_code = server.stop()
            if failed or exit_code != 0:
                progress(f"  hybridlm serve's log (end):\n{server.log_tail()}")
    tokens = sum(r.tokens for r in replies)
    complete = sum(r.tokens == max_tokens for r in replies)
    return {
        "settings": settings,
        "aggregate_tokens_per_s": tokens / wall_s, "tokens": tokens, "requests": len(replies),
        "complete_requests": complete, "wall_s": wall_s,
        "latency_ms": percentiles_ms([r.latency_s for r in replies]),
        "ttft_ms": percentiles_ms([r.ttft_s for r in replies]),
        "startup_s": startup_s, "warmup_s": warmup_s, "server_exit_code": exit_code,
    }


def problems(measured: dict[str, Any]) -> list[str]:
    """What makes the run a failure: a short reply, a server that did not exit 0."""
    found = []
    if measured["complete_requests"] != measured["requests"]:
        found.append(f"{measured['requests'] - measured['complete_requests']} of "
                     f"{measured['requests']} replies ended before max_tokens")
    if measured["server_exit_code"] != 0:
        found.append(f"the server exited with {measured['server_exit_code']} after SIGTERM "
                     f"(None: killed after {STOP_TIMEOUT_S} s)")
    return found


def row_of(measured: dict[str, Any] | None, error: str | None = None) -> Row:
    if measured is None:
        return Row(NAME, "serve streaming clients", "tokens/s", None, error=error)
    s = measured["settings"]
    lat, ttft = measured["latency_ms"], measured["ttft_ms"]
    note = (f"187m, {s['clients']} clients x {s['rounds']} x {s['max_tokens']} tokens, "
            f"max-batch {s['max_batch']}; latency p50 {number(lat['p50'])} / p99 "
            f"{number(lat['p99'])} ms; TTFT p50 {number(ttft['p50'])} / p99 "
            f"{number(ttft['p99'])} ms")
    issues = problems(measured)
    extra = {"latency_p50_ms": lat["p50"], "latency_p99_ms": lat["p99"],
             "ttft_p50_ms": ttft["p50"], "ttft_p99_ms": ttft["p99"]}
    return Row(NAME, f"serve {s['clients']} streaming clients", "tokens/s",
               measured["aggregate_tokens_per_s"], note=note,
               error="; ".join(issues) or None, extra=extra)


def run(device: torch.device, quick: bool) -> list[Row]:
    """bench.all's entry: the default sizes (or the quick ones)."""
    if (missing := check_extras()) is not None:
        return [row_of(None, f"n/a: {missing}")]
    try:
        return [row_of(measure(device, quick))]
    except Exception as exc:
        import traceback

        traceback.print_exc(file=sys.stderr)
        return [row_of(None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")]


def check_extras() -> str | None:
    """None, or what is missing to run the server and its clients."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "pydantic", "httpx")
               if importlib.util.find_spec(m) is None]
    if missing:
        return (f"bench.serve_load needs {', '.join(missing)}: pip install 'hybridlm[serve]' "
                "httpx")
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.serve_load", __doc__,
                          "the server's device (default: cuda when available, else cpu)")
    parser.add_argument("--clients", type=int,
                        help=f"concurrent clients (default {CLIENTS}, quick {QUICK_CLIENTS})")
    parser.add_argument("--max-tokens", type=int,
                        help=f"tokens per reply (default {MAX_TOKENS}, quick "
                             f"{QUICK_MAX_TOKENS})")
    parser.add_argument("--rounds", type=int,
                        help=f"timed requests per client (default {ROUNDS}, quick "
                             f"{QUICK_ROUNDS})")
    parser.add_argument("--max-batch", type=int, help="the server's --max-batch (default: "
                                                      "--clients)")
    args = parser.parse_args(argv)
    for name in ("clients", "max_tokens", "rounds", "max_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device")
    if (missing := check_extras()) is not None:
        parser.error(missing)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.all import new_results

    args = parse_args(argv)
    device = torch.device(args.device)
    results = new_results("bench.serve_load", argv, device, args.quick)
    results["benchmarks"] = [NAME]
    started = time.perf_counter()
    progress(f"{results['device']['name']}, torch {results['versions']['torch']}")
    measured = measure(device, args.quick, args.clients, args.max_tokens, args.rounds,
                       args.max_batch)
    results["load"] = measured
    results["rows"] = [row_of(measured).to_dict()]
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    if args.out is not None:
        write_json(results, args.out)
    lat, ttft = measured["latency_ms"], measured["ttft_ms"]
    print(f"clients {measured['settings']['clients']}, {measured['requests']} requests, "
          f"{measured['tokens']} tokens in {measured['wall_s']:.2f} s: "
          f"{number(measured['aggregate_tokens_per_s'])} tokens/s; latency p50 "
          f"{number(lat['p50'])} ms, p99 {number(lat['p99'])} ms; TTFT p50 "
          f"{number(ttft['p50'])} ms, p99 {number(ttft['p99'])} ms; server exit code "
          f"{measured['server_exit_code']}")
    if issues := problems(measured):
        sys.exit("bench.serve_load: " + "; ".join(issues))
    return results


if __name__ == "__main__":
    main()
