"""The table of a bench run: plain text for the terminal, Markdown for bench/RESULTS.md.

    python -m bench.report results.json [more.json ...] > bench/RESULTS.md

Reads the JSON that `python -m bench.all --out` writes, so RESULTS.md is never edited by
hand. Further files complete the first with the benchmarks it lacks (a run cut short by its
time limit, finished by `--only` on the same machine); each run's date and command are listed,
and ratios only ever compare figures of one run, since every row carries its own peer. The
Markdown adds the run's device, versions and command, and the issue's targets, each with its
measured figure and whether it is met.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The order of the benchmarks (bench/all.py runs them in another).
ORDER = ("ceilings", "train_187m", "train_nexus", "mamba_mixer", "moe_layer", "mla_decode",
         "generate", "serve_load")
COLUMNS = ("name", "hybridlm", "peer", "ratio", "unit", "note")


@dataclass(frozen=True)
class Target:
    """A goal on one full-size row: its `ratio` (hybridlm / peer) or its `value` at least
    `threshold`. `fallback`: the row read when `row` is not in the run (a run made before
    `row` existed)."""

    goal: str
    row: str
    field: str
    threshold: float
    fallback: str | None = None


TARGETS = (
    Target("187m compiled >= 2x HF Llama eager", "187m compiled vs HF eager", "ratio", 2.0),
    Target("187m compiled >= 1.2x HF Llama compiled", "187m train step, compiled", "ratio", 1.2),
    Target("187m eager >= 1.3x HF Llama eager", "187m train step, eager", "ratio", 1.3),
    Target("nexus-small >= 5x 27,600 tokens/s", "nexus-small train step, compiled", "value",
           138_000),
    Target("Mamba mixer >= 2M tokens/s at B8 L2048", "Mamba mixer fwd+bwd B8 L2048", "value",
           2_000_000),
    Target("Mamba mixer at L8192 within 20% of L2048", "Mamba mixer L8192 vs L2048", "ratio", 0.8),
    Target("learned top-2 >= 80% of dense", "learned top-2 E8 ff2816 vs dense", "ratio", 0.8),
    Target("token-routed >= 90% of dense", "token-routed E4 ff5632 vs dense", "ratio", 0.9),
    Target("learned top-2 above HF Mixtral", "learned top-2 E8 ff2816 vs HF Mixtral", "ratio", 1.0),
    Target("token-routed above HF Mixtral", "token-routed E4 ff5632 vs HF Mixtral", "ratio", 1.0),
    # The step as the engine runs it on a GPU: a CUDA graph (the eager row waits on the host).
    Target("MLA decode >= 60% of copy bandwidth", "MLA decode absorbed, CUDA graph B8 S32768",
           "ratio", 0.6, fallback="MLA decode absorbed B8 S32768"),
    Target("187m engine >= 1,000 tokens/s at batch 1", "decode 187m engine B1", "value", 1000),
    Target("187m engine >= 50,000 tokens/s at batch 128", "decode 187m engine B128", "value",
           50_000),
    Target("187m engine >= 20x HF generate at batch 1", "decode 187m engine B1", "ratio", 20.0),
    *(Target(f"nexus-small within 2x of 187m at batch {b}", f"decode nexus-small vs 187m B{b}",
             "ratio", 0.5) for b in (1, 8, 32, 128)),
)


def number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def cells(row: dict[str, Any]) -> list[str]:
    """The table's cells of one JSON row (COLUMNS)."""
    ours = number(row["value"])
    if row["error"]:
        ours = "skipped" if row["error"].startswith("skipped") else "error"
    if row["peer_name"] is None:
        peer = "—"
    elif row["peer"] is None:
        peer_error = row["peer_error"] or ""
        peer = ("n/a" if peer_error.startswith("n/a") else
                "skipped" if peer_error.startswith("skipped") else "error")
    else:
        peer = number(row["peer"])
    ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    notes = [f"vs {row['peer_name']}"] if row["peer_name"] else []
    notes += [text for text in (row["note"], row["error"], row["peer_error"]) if text]
    if "mfu" in row["extra"]:
        mfu = f"MFU {row['extra']['mfu']:.1%}"
        if "peer_mfu" in row["extra"]:
            mfu += f" (peer {row['extra']['peer_mfu']:.1%})"
        notes.append(mfu)
    if row["extra"].get("ttft_ms") is not None:
        ttft = f"TTFT {number(row['extra']['ttft_ms'])} ms"
        if row["extra"].get("peer_ttft_ms") is not None:
            ttft += f" (peer {number(row['extra']['peer_ttft_ms'])} ms)"
        notes.append(ttft)
    return [row["name"], ours, peer, ratio, row["unit"], "; ".join(notes)]


def ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(rows, key=lambda row: rank.get(row["benchmark"], len(ORDER)))  # stable


def text_table(rows: list[dict[str, Any]]) -> str:
    lines = [list(COLUMNS)] + [cells(row) for row in ordered(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS) - 1)]
    return "\n".join(
        " | ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]])
        for line in lines
    )


def markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    return ([f"| {' | '.join(header)} |", f"| {' | '.join('---' for _ in header)} |"]
            + [f"| {' | '.join(escape(c) for c in line)} |" for line in lines])


def target_lines(rows: list[dict[str, Any]]) -> list[list[str]]:
    by_name = {row["name"]: row for row in rows}
    lines = []
    for target in TARGETS:
        row = by_name.get(target.row)
        fell_back = row is None and target.fallback in by_name
        row = by_name[target.fallback] if fell_back else row
        measured = None if row is None else row[target.field]
        shown = number(measured) if target.field == "value" else (
            "—" if measured is None else f"{measured:.2f}x")
        if fell_back:
            shown += f" ({target.fallback})"
        met = "not measured" if measured is None else (
            "met" if measured >= target.threshold else "not met")
        lines.append([target.goal, shown, met])
    return lines


def interquartile(row: dict[str, Any]) -> str:
    if row["spread"] is None:
        return "—"
    low, high = row["spread"]
    return f"{number(low)} – {number(high)}"


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run, with the rows of each benchmark it lacks taken from the later runs (the
    first run that has it); `later_runs` records where they came from."""
    results = {**runs[0], "rows": list(runs[0]["rows"]),
               "benchmarks": list(runs[0]["benchmarks"]), "later_runs": [],
               "first_run_benchmarks": list(runs[0]["benchmarks"])}
    for run in runs[1:]:
        added = [name for name in run["benchmarks"] if name not in results["benchmarks"]]
        if not added:
            continue
        results["rows"] += [row for row in run["rows"] if row["benchmark"] in added]
        results["benchmarks"] += added
        results["later_runs"].append({"date": run["date"], "command": run["command"],
                                      "device": run["device"]["name"], "benchmarks": added})
    return results


def markdown(results: dict[str, Any]) -> str:
    device, versions = results["device"], results["versions"]
    later = [f"- then {', '.join(run['benchmarks'])} on {run['device']}, {run['date']}: "
             f"`{run['command']}`" for run in results.get("later_runs", [])]
    rows = ordered(results["rows"])
    spread = [[*cells(row)[:2], interquartile(row), *cells(row)[2:]] for row in rows]
    header = [*COLUMNS[:2], "IQR", *COLUMNS[2:]]
    missing = [name for name in ORDER if name not in results["benchmarks"]]
    text = [
        "# Benchmark results",
        "",
        "Generated by `python -m bench.report` from the JSON of `python -m bench.all` (one run,",
        "completed by the later runs listed, if any); every peer was measured in the same",
        "process as the row it compares with. Rates are medians (higher is better),",
        "IQR the interquartile range of hybridlm's timed repeats.",
        "",
        f"- device: {device['name']} ({device['type']})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None),
        f"- date: {results['date']}",
        f"- command: `{results['command']}`" + (" (quick sizes)" if results["quick"] else ""),
        f"- benchmarks: {', '.join(results.get('first_run_benchmarks', results['benchmarks']))}"
        f" ({results['elapsed_s']:.0f} s)",
        *later,
        *([f"- not in this run: {', '.join(missing)}"] if missing else []),
        "",
        *markdown_table(header, spread),
        "",
        "## Targets",
        "",
        *(["The targets apply to full-size runs; this run used the quick sizes."]
          if results["quick"]
          else markdown_table(["target", "measured", "status"], target_lines(rows))),
    ]
    return "\n".join(text) + "\n"


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path,
                        help="JSON of `bench.all --out` (or bench.generate / bench.serve_load); "
                             "later files complete the first")
    args = parser.parse_args(argv)
    runs = []
    for path in args.results:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"{path}: {err}")
    sys.stdout.write(markdown(combine(runs)))


if __name__ == "__main__":
    main()
