"""The serving benchmarks: `python -m bench.generate --quick --device cpu` and
`python -m bench.serve_load --quick --device cpu` write the JSON bench.report reads, with a
positive rate in every cell they measure; their arithmetic (decode rate from step stamps,
out-of-memory and time-budget skips) and the served model's never-chosen end-of-text, on
numbers and models made up here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bench import generate, report, serve_load
from bench.all import BENCHMARKS, OPTIONAL, SCHEMA, parse_args
from bench.peers import MISSING, transformers_module

from hybridlm.infer.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
ENGINE_LABELS = [f"{stack.label} engine" for stack in generate.STACKS]
HYBRIDLM_LABELS = [*ENGINE_LABELS, "187m HybridLM.generate"]
HF_LABELS = [generate.HF_DYNAMIC, generate.HF_STATIC]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def check_head(results: dict, module: str, name: str) -> None:
    assert results["schema"] == SCHEMA
    assert results["benchmarks"] == [name]
    assert results["quick"] is True
    assert results["device"]["type"] == "cpu"
    assert results["versions"]["torch"] == torch.__version__
    assert set(results["versions"]) >= {"python", "torch", "triton", "transformers"}
    assert results["command"].startswith(f"python -m {module} --quick --device cpu --out ")
    assert results["elapsed_s"] > 0


# --- bench.generate ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def generate_run(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("generate") / "generate.json"
    done = run_module("bench.generate", "--quick", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout, out


def test_generate_json_names_the_run(generate_run):
    results, _, _ = generate_run
    check_head(results, "bench.generate", "generate")
    settings = results["settings"]
    assert settings["batches"] == list(generate.QUICK_BATCHES)
    assert settings["new_tokens"] == generate.QUICK_NEW_TOKENS
    assert settings["dtype"] == "torch.float32"


def test_generate_measures_every_model_at_every_batch(generate_run):
    results, _, _ = generate_run
    cells = {(c["model"], c["batch"]): c for c in results["cells"]}
    assert set(cells) == {(label, b) for label in HYBRIDLM_LABELS + HF_LABELS
                          for b in generate.QUICK_BATCHES}
    peers_here = transformers_module() is not None
    for (label, batch), cell in cells.items():
        if label in HF_LABELS and not peers_here:
            assert cell["status"] == "skipped" and cell["reason"] == MISSING
            continue
        assert cell["status"] == "ok", (label, batch, cell["reason"])
        assert cell["tokens_per_s"] > 0 and cell["ttft_ms"] > 0 and cell["decode_s"] > 0
        if label in ENGINE_LABELS or label in HF_LABELS:  # stepwise: a spread of step rates
            low, high = cell["spread"]
            assert 0 < low <= high


def test_generate_rows_feed_the_report(generate_run, tmp_path):
    results, stdout, out = generate_run
    names = {row["name"] for row in results["rows"]}
    for batch in generate.QUICK_BATCHES:
        assert {f"decode 187m engine B{batch}", f"decode nexus-small vs 187m B{batch}",
                f"decode 187m MLA engine B{batch}"} <= names
    vs_187m = [r for r in results["rows"] if r["name"].startswith("decode nexus-small vs")]
    assert all(r["ratio"] == pytest.approx(r["value"] / r["peer"]) for r in vs_187m)
    header = [cell.strip() for cell in stdout.splitlines()[0].split(" | ")]
    assert header == ["model", "batch", "tokens/s", "vs HF dynamic", "TTFT ms", "note"]
    assert len(stdout.splitlines()) == 1 + len(results["cells"])
    done = run_module("bench.report", str(out))
    assert done.returncode == 0, done.stderr
    assert "| decode 187m engine B1 |" in done.stdout
    assert "TTFT" in done.stdout


def test_decode_rate_leaves_out_the_first_step():
    # t0 = 0; step 0 (prefill, 2 rows' first tokens) ends at 1 s, then 4 steps of 2 tokens
    # taking 0.5, 0.5, 1 and 2 s: 8 tokens in 4 s.
    decoded = generate.from_stamps(0.0, [1.0, 1.5, 2.0, 3.0, 5.0], [2, 2, 2, 2, 2])
    assert decoded.tokens_per_s == pytest.approx(2.0)
    assert decoded.ttft_ms == pytest.approx(1000.0)
    assert decoded.decode_s == pytest.approx(4.0)
    low, high = decoded.spread  # step rates 4, 4, 2, 1 tokens/s
    assert 1.0 < low <= 2.0 <= high <= 4.0


def test_engine_run_counts_every_generated_token(make_history_model):
    model = make_history_model(mixer_pattern="AM", num_hidden_layers=2)
    engine = Engine(model, max_batch=3)
    batch_prompts = generate.prompts(3, 5, model.config.vocab_size)
    decoded = generate.engine_run(engine, batch_prompts, 6, torch.device("cpu"))
    assert decoded.tokens_per_s * decoded.decode_s == pytest.approx(3 * 5)  # B x (N - 1)
    assert not engine.requests and sorted(engine.pool.free) == [0, 1, 2]


def test_warmup_seconds_leave_out_the_timed_run():
    order = []
    decoded = generate.Decoded(1.0, None, 1.0, 1.0)

    def timed():
        order.append("timed")
        time.sleep(0.2)
        return decoded

    result, warmup_s = generate.timed_with_warmup(lambda: order.append("warm"), timed)
    assert order == ["warm", "timed"] and result is decoded
    assert warmup_s < 0.1


def fake_plan(measure) -> generate.Plan:
    return generate.Plan("fake", build=lambda: object(), measure=measure)


def test_out_of_memory_skips_the_batch_and_the_others_go_on():
    def measure(model, batch):
        if batch == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return generate.Decoded(100.0 * batch, None, 1.0, 1.0), 0.5

    cells = []
    generate.measure_plan(fake_plan(measure), (1, 8, 32), float("inf"), cells.append)
    assert [(c.batch, c.status) for c in cells] == [(1, "ok"), (8, "skipped"), (32, "ok")]
    assert cells[1].reason.startswith("out of memory: OutOfMemoryError: CUDA out of memory")
    assert cells[2].tokens_per_s == 3200.0
    row = generate.row_of("decode x B8", cells[1], None, None, "")
    assert row.error.startswith("skipped: out of memory")
    assert report.cells(row.to_dict())[1] == "skipped"


def test_a_spent_time_budget_skips_what_is_left():
    cells = []
    generate.measure_plan(fake_plan(lambda m, b: pytest.fail("measured")), (1, 8), 0.0,
                          cells.append)
    assert [c.status for c in cells] == ["skipped", "skipped"]
    assert all("--max-minutes" in c.reason for c in cells)


@pytest.mark.parametrize("flags", [["--batches", "1,0"], ["--batches", "8,x"],
                                   ["--new-tokens", "1"], ["--max-minutes", "0"]])
def test_generate_refuses_bad_flags(flags, capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(flags)
    assert flags[0] in capsys.readouterr().err


def test_serving_benchmarks_run_only_when_named():
    assert not set(OPTIONAL) & set(BENCHMARKS)
    assert parse_args(["--only", "generate,serve_load"]).names == ("generate", "serve_load")
    assert parse_args([]).names == BENCHMARKS


# --- bench.serve_load -------------------------------------------------------------------
def test_served_model_never_picks_end_of_text(tmp_path):
    from hybridlm import HybridLM

    ids = serve_load.save_model_dir(tmp_path, quick=True)
    model = HybridLM.from_pretrained(tmp_path).eval()
    assert 0 not in ids and len(ids) > 100
    prompt = torch.tensor([ids[:16], ids[-16:]])
    with torch.no_grad():
        logits = model(prompt).logits  # (2, 16, V)
    assert torch.equal(logits[..., 0], torch.zeros_like(logits[..., 0]))
    assert bool((logits.amax(-1) > 0).all())  # so argmax is never id 0


needs_serve = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "httpx")),
    reason="needs the serve extra and httpx")


@needs_serve  # a server subprocess: about 7 s on 2 cores
def test_serve_load_quick_run(tmp_path):
    out = tmp_path / "serve.json"
    done = run_module("bench.serve_load", "--quick", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    check_head(results, "bench.serve_load", "serve_load")
    load = results["load"]
    clients, tokens = serve_load.QUICK_CLIENTS, serve_load.QUICK_MAX_TOKENS
    assert load["requests"] == load["complete_requests"] == clients * serve_load.QUICK_ROUNDS
    assert load["tokens"] == load["requests"] * tokens
    assert load["aggregate_tokens_per_s"] > 0 and load["server_exit_code"] == 0
    for key in ("latency_ms", "ttft_ms"):
        assert 0 < load[key]["p50"] <= load[key]["p99"]
    assert load["ttft_ms"]["p99"] <= load["latency_ms"]["p99"]
    (row,) = results["rows"]
    assert row["name"] == f"serve {clients} streaming clients" and row["error"] is None
    assert "tokens/s" in done.stdout and "server exit code 0" in done.stdout
