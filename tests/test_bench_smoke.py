"""`python -m bench.all --quick --device cpu` runs every benchmark at tiny sizes: the JSON it
writes has the documented schema, the table it prints names every row, and `bench.report`
turns the JSON into RESULTS.md's Markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench.all import BENCHMARKS, SCHEMA
from bench.peers import transformers_module
from bench.report import COLUMNS

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"benchmark", "name", "unit", "value", "spread", "peer_name", "peer", "peer_spread",
            "ratio", "note", "error", "peer_error", "extra"}


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    done = run_module("bench.all", "--quick", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def check_rate(rate: float | None, spread: list[float] | None, where: str) -> None:
    assert rate is not None and rate > 0, where
    low, high = spread
    assert 0 < low <= rate <= high, f"{where}: spread {spread} must bracket {rate}"


def test_json_names_the_run(quick_run):
    results, _ = quick_run
    assert results["schema"] == SCHEMA
    assert results["quick"] is True
    assert results["benchmarks"] == list(BENCHMARKS)
    assert results["device"]["type"] == "cpu"
    assert results["versions"]["torch"] == torch.__version__
    assert set(results["versions"]) >= {"python", "torch", "triton", "transformers"}
    assert results["command"].startswith("python -m bench.all --quick --device cpu --out ")
    assert results["date"].endswith("+00:00")


def test_every_row_has_a_rate_and_its_spread(quick_run):
    results, _ = quick_run
    rows = results["rows"]
    assert {row["benchmark"] for row in rows} == set(BENCHMARKS)
    for row in rows:
        where = f"{row['benchmark']}: {row['name']}"
        assert set(row) == ROW_KEYS, where
        if row["error"] is not None:
            # Compiling a model may fail on today's code; the row then says why and the run
            # goes on. Every other measurement must succeed.
            assert "compiled" in row["name"], f"{where}: {row['error']}"
            assert row["value"] is None
            continue
        check_rate(row["value"], row["spread"], where)
        if row["peer"] is not None:
            check_rate(row["peer"], row["peer_spread"], where + " (peer)")
            assert row["ratio"] == pytest.approx(row["value"] / row["peer"])


def test_peer_cells_follow_whether_transformers_is_installed(quick_run):
    results, _ = quick_run
    hf_rows = [row for row in results["rows"] if (row["peer_name"] or "").startswith("HF ")]
    assert {row["benchmark"] for row in hf_rows} == {"train_187m", "mamba_mixer", "moe_layer"}
    if transformers_module() is None:
        assert all(row["peer"] is None and row["peer_error"].startswith("n/a")
                   for row in hf_rows)
    else:  # measured, or (the long Mamba row) left out on purpose
        assert all(row["peer"] is not None or row["peer_error"].startswith("n/a")
                   for row in hf_rows)


def test_table_lists_every_row(quick_run):
    results, stdout = quick_run
    lines = stdout.splitlines()
    assert [cell.strip() for cell in lines[0].split(" | ")] == list(COLUMNS)
    assert len(lines) == 1 + len(results["rows"])
    printed = {line.split(" | ")[0].strip() for line in lines[1:]}
    assert printed == {row["name"] for row in results["rows"]}


def test_report_writes_markdown(quick_run, tmp_path):
    results, _ = quick_run
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    done = run_module("bench.report", str(path))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert f"- versions: python {results['versions']['python']}, torch {torch.__version__}" in text
    assert "| name | hybridlm | IQR | peer | ratio | unit | note |" in text
    for row in results["rows"]:
        assert f"| {row['name']} |" in text
    assert "this run used the quick sizes" in text


def test_a_target_reads_its_row_or_else_its_fallback():
    from bench.report import TARGETS, target_lines

    mla = next(t for t in TARGETS if t.fallback)
    row = {"value": 1.0, "ratio": 0.7}
    goal_line = [line for line in target_lines([{"name": mla.row, **row}])
                 if line[0] == mla.goal]
    assert goal_line == [[mla.goal, "0.70x", "met"]]
    older = [line for line in target_lines([{"name": mla.fallback, **row, "ratio": 0.1}])
             if line[0] == mla.goal]
    assert older == [[mla.goal, f"0.10x ({mla.fallback})", "not met"]]
    assert next(line for line in target_lines([]) if line[0] == mla.goal)[2] == "not measured"


def test_report_refuses_a_missing_file_in_one_line():
    done = run_module("bench.report", "/nonexistent/results.json")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        "/nonexistent/results.json: [Errno 2] No such file or directory: "
        "'/nonexistent/results.json'")
    assert "Traceback" not in done.stderr
