"""Training metrics: one JSON record per logged step, mirrored to TensorBoard.

A run directory gets

* ``RUN_DIR/metrics.jsonl`` -- one JSON object per line, one line per logged step, appended and
  flushed on every write (read it back with :func:`read_metrics`, plot it with
  :func:`hybridlm.train.plots.plot_run`);
* ``RUN_DIR/tensorboard/`` -- TensorBoard event files (``tensorboard --logdir RUN_DIR``).

Record schema
-------------
Required:

``step`` (int)            optimizer step the record describes (1-based, increasing)
``loss`` (float)          training loss of that step
``lr`` (float)            learning rate after the step
``tokens_per_s`` (float)  training throughput

Optional:

``val_loss`` (float)      held-out next-token loss (only on evaluation steps); always causal:
                          expert-choice layers are evaluated with token-choice routing
``loss_causal`` (bool)    whether ``loss`` is a causal language-model loss: false with
                          expert-choice layers, whose training routing sees later tokens, so
                          their ``loss`` must not be compared with other models' (use val_loss)
``grad_norm`` (float)     gradient norm before clipping
``mfu`` (float)           model FLOPs utilization, 0..1
``skipped_steps`` (int)   steps skipped so far (e.g. non-finite loss)
``aux_loss`` (float)      MoE load-balancing auxiliary loss
``expert_load``           list over MoE / token-routed layers of lists of per-expert token
                          fractions (each inner list sums to ~1; uniform is 1/E)
``router_entropy``        list over routed layers of the mean router entropy (nats)

Any other numeric field is accepted and logged too. In TensorBoard every numeric field becomes
the scalar of the same name; a list of numbers ``key`` becomes ``key/layer{i}`` and a list of
lists becomes ``key/layer{i}/expert{e}`` (so ``expert_load/layer0/expert3``,
``router_entropy/layer2``).

Resuming
--------
A run resumed from step ``S`` creates its logger with ``resume_step=S``: records with
``step > S`` (written after the checkpoint) are dropped from metrics.jsonl before appending, and
TensorBoard hides events past ``S`` (``purge_step``), so no step is ever duplicated or stale.
``resume_step=None`` starts fresh: an existing metrics.jsonl and old event files are removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REQUIRED_FIELDS = ("step", "loss", "lr", "tokens_per_s")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
    """Convert tensors / numpy values (and containers of them) to JSON-able Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())  # torch.Tensor, numpy array or scalar
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalars(key: str, value: Any) -> list[tuple[str, float]]:
    """TensorBoard (tag, value) pairs for one record field; non-numeric fields give none."""
    if _is_number(value):
        return [(key, float(value))]
    if isinstance(value, list):
        out: list[tuple[str, float]] = []
        for i, item in enumerate(value):
            if _is_number(item):
                out.append((f"{key}/layer{i}", float(item)))
            elif isinstance(item, list):
                out += [(f"{key}/layer{i}/expert{e}", float(x))
                        for e, x in enumerate(item) if _is_number(x)]
        return out
    return []


def _parse_lines(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn final line (crash mid-write) is ignored. A file
    that is not UTF-8 JSON objects, one per line, raises ValueError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): not a metrics "
                         "log, or a damaged one") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    records = []
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {n + 1} is not valid JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {n + 1} is a JSON {type(record).__name__}, not "
                             "a record object")
        records.append(record)
    return records


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of ``RUN_DIR/metrics.jsonl`` in file order (raises FileNotFoundError)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
    return _parse_lines(path)


class MetricsLogger:
    """Append step records to ``RUN_DIR/metrics.jsonl`` and ``RUN_DIR/tensorboard/``.

    Args:
        run_dir: the run directory (created if needed).
        enabled: False on non-zero ranks: the logger then touches no file and ``log`` is a no-op.
        resume_step: the step a resumed run restarts from; records past it are removed first.
            None starts a fresh log (existing metrics and event files are removed).
    """

    def __init__(self, run_dir: str | os.PathLike[str], enabled: bool = True,
                 resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._file = None
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "MetricsLogger writes TensorBoard event files and needs the `tensorboard` "
                "package: pip install tensorboard"
            ) from err
        if resume_step is not None and (not _is_number(resume_step) or resume_step < 0):
            raise ValueError(f"resume_step must be a non-negative int, got {resume_step!r}")
        tb_dir = self.run_dir / TENSORBOARD_DIR
        tb_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for old in tb_dir.glob("events.out.tfevents.*"):
                old.unlink()
            self.path.write_text("")
        else:
            self._truncate(int(resume_step))
        self._file = self.path.open("a")
        purge = None if resume_step is None else int(resume_step) + 1
        self._writer = SummaryWriter(str(tb_dir), purge_step=purge)

    def _truncate(self, resume_step: int) -> None:
        """Keep only records with ``step <= resume_step`` (atomic rewrite)."""
        if not self.path.is_file():
            self.path.write_text("")
            return
        kept = [r for r in _parse_lines(self.path) if not _is_number(r.get("step"))
                or r["step"] <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        """Write one step record (see the module docstring for the schema)."""
        if not self.enabled:
            return
        if self._file is None or self._writer is None:
            raise RuntimeError("MetricsLogger is closed")
        record = _plain(record)
        missing = [k for k in REQUIRED_FIELDS if k not in record]
        if missing:
            raise ValueError(f"metrics record lacks required field(s) {missing}: {record}")
        step = record["step"]
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"metrics record 'step' must be an int, got {step!r}")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key == "step":
                continue
            for tag, scalar in _scalars(key, value):
                self._writer.add_scalar(tag, scalar, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
