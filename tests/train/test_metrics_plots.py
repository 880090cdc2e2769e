"""MetricsLogger (metrics.jsonl + TensorBoard), resume truncation, and plot_run PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hybridlm.train.metrics import MetricsLogger, read_metrics
from hybridlm.train.plots import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(step: int, moe: bool = False, val: bool = False) -> dict:
    r = {"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3 * step, "tokens_per_s": 1000.0 + step}
    if val:
        r["val_loss"] = 5.5 - 0.1 * step
    if moe:
        r["expert_load"] = [[0.25, 0.25, 0.3, 0.2], [0.4, 0.2, 0.2, 0.2]]
        r["router_entropy"] = [1.3, 1.2]
        r["aux_loss"] = 0.01
    return r


def _write_run(run_dir: Path, steps: range, moe: bool = False) -> None:
    with MetricsLogger(run_dir) as logger:
        for s in steps:
            logger.log(_record(s, moe=moe, val=s % 2 == 0))


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path)
    for s in (1, 2, 3):
        rec = _record(s, moe=True)
        rec["grad_norm"] = torch.tensor(0.5 * s)  # tensors are converted
        logger.log(rec)
    logger.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["grad_norm"] == pytest.approx(1.0)
    assert records[0]["expert_load"][1] == [0.4, 0.2, 0.2, 0.2]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    loss = _scalars(tmp_path, "loss")
    assert [s for s, _ in loss] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([4.9, 4.8, 4.7])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lr", "tokens_per_s", "grad_norm", "aux_loss", "expert_load/layer1/expert0",
            "expert_load/layer0/expert3", "router_entropy/layer1"} <= tags
    assert "step" not in tags


def test_logger_rejects_bad_records(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match="tokens_per_s"):
            logger.log({"step": 1, "loss": 1.0, "lr": 1e-3})
        with pytest.raises(ValueError, match="int"):
            logger.log({"step": 1.5, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0})
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(_record(1))


def test_resume_truncates_stale_steps_and_appends(tmp_path):
    _write_run(tmp_path, range(1, 6))  # steps 1..5 written, checkpoint was at step 3
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss"')  # torn line from a crash mid-write
    with MetricsLogger(tmp_path, resume_step=3) as logger:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        for s in (4, 5, 6):
            logger.log(_record(s) | {"loss": 100.0 + s})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records[3:]] == [104.0, 105.0, 106.0]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    loss = dict(_scalars(tmp_path, "loss"))  # TensorBoard purges the stale steps 4, 5
    assert sorted(loss) == [1, 2, 3, 4, 5, 6]
    assert loss[4] == pytest.approx(104.0) and loss[2] == pytest.approx(4.8)


def test_fresh_logger_replaces_old_run(tmp_path):
    _write_run(tmp_path, range(1, 4))
    _write_run(tmp_path, range(1, 3))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, enabled=False, resume_step=2)
    logger.log(_record(1))
    logger.log({"anything": "goes"})
    logger.close()
    assert not run_dir.exists()


def test_read_metrics_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path)


def _check_pngs(paths: list[Path], names: set[str], out_dir: Path) -> None:
    assert {p.name for p in paths} == names
    for p in paths:
        assert p.parent == out_dir
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_run_basic(tmp_path):
    _write_run(tmp_path, range(1, 8))
    paths = plot_run(tmp_path)
    _check_pngs(paths, {"loss.png", "lr.png", "tokens_per_s.png"}, tmp_path / "plots")
    assert not (tmp_path / "plots" / "expert_load.png").exists()


def test_plot_run_with_moe_fields(tmp_path):
    _write_run(tmp_path, range(1, 8), moe=True)
    out = tmp_path / "figs"
    paths = plot_run(tmp_path, out_dir=out)
    _check_pngs(paths, {"loss.png", "lr.png", "tokens_per_s.png", "expert_load.png",
                        "router_entropy.png"}, out)


def test_plot_run_errors(tmp_path):
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no step records"):
        plot_run(tmp_path)
