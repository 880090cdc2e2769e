"""PNG plots of a run's metrics.jsonl (schema in :mod:`hybridlm.train.metrics`).

``plot_run(run_dir)`` writes into ``RUN_DIR/plots/``:

* ``loss.png``            training loss and held-out ``val_loss`` vs step
* ``lr.png``              learning rate vs step
* ``tokens_per_s.png``    throughput vs step
* ``expert_load.png``     (records with ``expert_load``) one panel per routed layer, one line per
                          expert's token fraction, dashed line at the uniform share 1/E
* ``router_entropy.png``  (records with ``router_entropy``) one line per layer

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend is touched.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from hybridlm.outputs import PLOTS, claim_output, staged_dir
from hybridlm.train.metrics import METRICS_FILE, read_metrics


def _new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7.0, 4.0)):
    """A matplotlib Figure on an Agg canvas and its axes (squeezed like plt.subplots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a number under ``key``."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.savefig(path, dpi=110)
    written.append(path)


def _line_plot(records: list[dict[str, Any]], key: str, title: str, ylabel: str,
               path: Path, written: list[Path]) -> None:
    fig, axes = _new_figure()
    ax = axes[0, 0]
    ax.plot(*_series(records, key), color="tab:blue")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    _save(fig, path, written)


def _plot_loss(records: list[dict[str, Any]], path: Path, written: list[Path]) -> None:
    fig, axes = _new_figure()
    ax = axes[0, 0]
    # Expert-choice training losses see later tokens: say so where they are compared.
    causal = all(r.get("loss_causal", True) for r in records)
    label = "train loss" if causal else "train loss (not causal: expert choice)"
    ax.plot(*_series(records, "loss"), label=label, color="tab:blue", alpha=0.8)
    val_steps, val = _series(records, "val_loss")
    if val_steps:
        ax.plot(val_steps, val, "o-", label="held-out loss", color="tab:orange", markersize=3)
    ax.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path, written)


def _per_layer(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[list[Any]]]:
    """Steps and per-layer lists of the records carrying a non-empty list under ``key``."""
    rows = [r for r in records if isinstance(r.get(key), list) and r[key]]
    return [r["step"] for r in rows], [r[key] for r in rows]


def _column(rows: list[list[Any]], i: int, e: int | None = None) -> list[float]:
    """Layer ``i`` (expert ``e``) of each row, nan where a row lacks it."""
    out = []
    for row in rows:
        v = row[i] if i < len(row) else None
        if e is not None:
            v = v[e] if isinstance(v, list) and e < len(v) else None
        out.append(float(v) if isinstance(v, (int, float)) else math.nan)
    return out


def _plot_expert_load(records: list[dict[str, Any]], path: Path, written: list[Path]) -> None:
    steps, rows = _per_layer(records, "expert_load")
    n_layers = max(len(r) for r in rows)
    ncols = min(4, n_layers)
    nrows = math.ceil(n_layers / ncols)
    fig, axes = _new_figure(nrows, ncols, size=(3.6 * ncols + 1.0, 2.8 * nrows + 0.6))
    for i in range(nrows * ncols):
        ax = axes[i // ncols, i % ncols]
        if i >= n_layers:
            ax.set_visible(False)
            continue
        n_exp = max((len(r[i]) for r in rows if i < len(r) and isinstance(r[i], list)),
                    default=0)
        for e in range(n_exp):
            ax.plot(steps, _column(rows, i, e), linewidth=1, label=f"expert {e}")
        if n_exp:
            ax.axhline(1.0 / n_exp, color="black", linestyle="--", linewidth=1,
                       label=f"uniform 1/{n_exp}")
        ax.set(title=f"routed layer {i}", xlabel="step", ylabel="token fraction")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if 0 < len(handles) <= 33:  # one shared legend: expert colors are the same in every panel
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle("Expert load (fraction of tokens per expert)")
    _save(fig, path, written)


def _plot_router_entropy(records: list[dict[str, Any]], path: Path,
                         written: list[Path]) -> None:
    steps, rows = _per_layer(records, "router_entropy")
    fig, axes = _new_figure()
    ax = axes[0, 0]
    n_layers = max(len(r) for r in rows)
    for i in range(n_layers):
        ax.plot(steps, _column(rows, i), linewidth=1, label=f"layer {i}")
    ax.set(title="Router entropy", xlabel="step", ylabel="mean entropy (nats)")
    ax.grid(alpha=0.3)
    if n_layers <= 24:
        ax.legend(fontsize=7, ncols=2)
    _save(fig, path, written)


def plot_run(run_dir: str | os.PathLike[str],
             out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Plot ``RUN_DIR/metrics.jsonl`` into ``out_dir`` (default ``RUN_DIR/plots``).

    Returns the written PNG paths. Raises ValueError when metrics.jsonl is missing or empty.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise ValueError(f"cannot plot {run_dir}: it {what}; give a run directory (the --out "
                         "of `hybridlm train`)")
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError as err:
        raise ValueError(f"cannot plot {run_dir}: no {METRICS_FILE} there") from err
    records = sorted((r for r in records if isinstance(r.get("step"), int)),
                     key=lambda r: r["step"])
    if not records:
        raise ValueError(f"cannot plot {run_dir}: {METRICS_FILE} holds no step records")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    # Plots are redrawn from the metrics, so earlier plots are replaced (whole, once the new
    # ones are drawn); a directory holding anything but PNGs is refused.
    claim_output(out, PLOTS, overwrite=True, flag="")
    with staged_dir(out, replace=True) as staging:
        written = _draw_all(records, staging)
    return [out / path.name for path in written]


def _draw_all(records: list[dict[str, Any]], out: Path) -> list[Path]:
    written: list[Path] = []
    _plot_loss(records, out / "loss.png", written)
    _line_plot(records, "lr", "Learning rate", "learning rate", out / "lr.png", written)
    _line_plot(records, "tokens_per_s", "Throughput", "tokens / s", out / "tokens_per_s.png",
               written)
    if _per_layer(records, "expert_load")[0]:
        _plot_expert_load(records, out / "expert_load.png", written)
    if _per_layer(records, "router_entropy")[0]:
        _plot_router_entropy(records, out / "router_entropy.png", written)
    return written
