"""The benchmark suite's own arithmetic: timing statistics, input rotation, the table's cells
and the targets' verdicts, each on numbers made up here."""

from __future__ import annotations

import pytest
import torch
from bench import report
from bench.all import parse_args
from bench.timing import Measured, Row, Timing, measure, peer_row

CPU = torch.device("cpu")


def test_rate_and_its_spread_come_from_the_timed_samples():
    timing = Timing([4.0, 1.0, 2.0, 3.0, 5.0])  # ms; median 3, quartiles 2 and 4
    value, (slow, fast) = timing.rate(work=6.0)
    assert value == pytest.approx(6.0 / 3e-3)
    assert slow == pytest.approx(6.0 / 4e-3) and fast == pytest.approx(6.0 / 2e-3)


def test_measure_rotates_inputs_after_the_warmup():
    seen = []
    timing = measure(seen.append, CPU, warmup=2, repeats=10, inputs=[("a",), ("b",), ("c",)])
    assert seen == ["a", "b", "c"] * 4
    assert len(timing.samples_ms) == 10


def test_quick_measure_warms_up_once():
    seen = []
    measure(lambda: seen.append(1), CPU, warmup=5, repeats=30, quick=True)
    assert len(seen) == 1 + 10


def test_fewer_than_ten_repeats_are_refused():
    with pytest.raises(ValueError, match="repeats=3 must be >= 10"):
        measure(lambda: None, CPU, repeats=3)


def row_dict(**fields) -> dict:
    base = dict(benchmark="moe_layer", name="x", unit="TFLOP/s", value=2.0, spread=(1.0, 3.0))
    return Row(**{**base, **fields}).to_dict()


def test_cells_show_missing_failed_and_absent_peers():
    absent = report.cells(row_dict())
    assert absent[1:5] == ["2", "—", "—", "TFLOP/s"]
    missing = report.cells(row_dict(peer_name="HF", peer_error="n/a: transformers is missing"))
    assert missing[2] == "n/a"
    failed = report.cells(row_dict(peer_name="HF", peer_error="RuntimeError: boom"))
    assert failed[2] == "error" and "RuntimeError: boom" in failed[5]
    measured = report.cells(row_dict(peer_name="HF", peer=0.5))
    assert measured[2:4] == ["0.5", "4.00x"] and measured[5].startswith("vs HF")


def test_failed_measurement_shows_error_not_a_number():
    row = peer_row("ceilings", "copy", "GB/s", (None, "OutOfMemoryError: no"), None)
    assert row.value is None and row.ratio is None
    assert report.cells(row.to_dict())[1] == "error"


def test_peer_row_keeps_both_extras():
    ours = Measured(10.0, (9.0, 11.0), {"mfu": 0.3})
    theirs = Measured(5.0, (4.0, 6.0), {"mfu": 0.2})
    row = peer_row("train_187m", "step", "tokens/s", (ours, None), "HF", (theirs, None))
    assert row.ratio == 2.0
    assert row.extra == {"mfu": 0.3, "peer_mfu": 0.2}
    assert "MFU 30.0% (peer 20.0%)" in report.cells(row.to_dict())[5]


def test_targets_are_met_at_their_threshold_and_not_below():
    target = report.TARGETS[0]
    verdicts = []
    for peer in (1.0, 1.01):  # ratio exactly 2.0, then just under it
        row = row_dict(name=target.row, value=2.0, peer_name="HF", peer=peer)
        verdicts.append(report.target_lines([row])[0][2])
    assert verdicts == ["met", "not met"]
    assert report.target_lines([])[0][2] == "not measured"


def test_table_follows_the_issue_order():
    rows = [row_dict(benchmark=b, name=b) for b in ("mla_decode", "ceilings", "train_187m")]
    assert [r["name"] for r in report.ordered(rows)] == ["ceilings", "train_187m", "mla_decode"]


def test_only_refuses_unknown_benchmarks(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--only", "ceilings,warp_drive"])
    assert "unknown benchmarks ['warp_drive']" in capsys.readouterr().err


def run_dict(benchmarks: list[str], value: float, date: str) -> dict:
    return {"date": date, "command": "python -m bench.all", "device": {"name": "gpu"},
            "benchmarks": benchmarks, "rows": [
                row_dict(benchmark=name, name=f"{name} row", value=value) for name in benchmarks]}


def test_later_runs_fill_only_the_benchmarks_the_first_lacks():
    first = run_dict(["ceilings", "train_187m"], 1.0, "d1")
    second = run_dict(["train_187m", "train_nexus"], 2.0, "d2")
    combined = report.combine([first, second])
    values = {row["benchmark"]: row["value"] for row in combined["rows"]}
    assert values == {"ceilings": 1.0, "train_187m": 1.0, "train_nexus": 2.0}
    assert combined["benchmarks"] == ["ceilings", "train_187m", "train_nexus"]
    assert combined["later_runs"] == [{"date": "d2", "command": "python -m bench.all",
                                       "device": "gpu", "benchmarks": ["train_nexus"]}]
    assert first["rows"] == [row_dict(benchmark=n, name=f"{n} row", value=1.0)
                             for n in ["ceilings", "train_187m"]]  # the input is not changed
