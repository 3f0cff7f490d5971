"""Turn a comparison's result directories into a table (CSV + Markdown) and PNG plots.

Everything here reads only what the runs wrote (metrics.jsonl, summary.json), so ``fedsvd report`` can
re-render a comparison at any time, including while it is still running or after some runs failed.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from scipy import stats

from fedsvd.compare import run_dir
from fedsvd.results import SUMMARY_JSON, read_metrics

COMPARISON_JSON = "comparison.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PLOTS = {
    "accuracy": "accuracy_vs_round.png",
    "epsilon": "epsilon_vs_round.png",
    "uplink": "accuracy_vs_uplink.png",
}
SUMMARY_COLUMNS = (
    "run",
    "method",
    "seeds_done",
    "final_accuracy_mean",
    "final_accuracy_ci95",
    "best_accuracy_mean",
    "rounds_to_target_mean",
    "seeds_reaching_target",
    "final_local_accuracy_mean",
    "epsilon_max",
    "client_epsilon",
    "bytes_up_per_round",
    "bytes_down_per_round",
    "wall_seconds_mean",
)


@dataclass(frozen=True)
class RunResult:
    """Everything finished seeds of one run tell: per-seed metric rows, in seed order."""

    name: str
    method: str
    seeds: tuple[int, ...]
    rows: tuple[tuple[dict[str, Any], ...], ...]
    summaries: tuple[dict[str, Any], ...]
    missing: tuple[int, ...]


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% Student-t confidence interval (nan for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(half)


def load_results(out_dir: Path) -> tuple[dict[str, Any], list[RunResult]]:
    """The comparison record and, per run, the seeds that finished (a summary.json) and those that did not."""
    path = out_dir / COMPARISON_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a comparison directory (no {COMPARISON_JSON})")
    record = json.loads(path.read_text())
    results = []
    for run in record["runs"]:
        done, rows, summaries, missing = [], [], [], []
        for seed in record["seeds"]:
            directory = run_dir(out_dir, run["name"], seed)
            if (directory / SUMMARY_JSON).is_file():
                done.append(seed)
                rows.append(tuple(read_metrics(directory)))
                summaries.append(json.loads((directory / SUMMARY_JSON).read_text()))
            else:
                missing.append(seed)
        results.append(
            RunResult(run["name"], run["method"], tuple(done), tuple(rows), tuple(summaries), tuple(missing))
        )
    return record, results


def _first_round_reaching(rows: Sequence[Mapping[str, Any]], target: float) -> int | None:
    scored = (row for row in rows if row["round"] > 0 and row["accuracy"] is not None)
    return next((row["round"] for row in scored if row["accuracy"] >= target), None)


def _training_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [row for row in rows if row["round"] > 0]


def summarise(result: RunResult, target: float | None) -> dict[str, Any]:
    """One line of the summary table (values are None where nothing finished)."""
    line: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS)
    line.update(
        run=result.name,
        method=result.method,
        seeds_done=f"{len(result.seeds)}/{len(result.seeds) + len(result.missing)}",
    )
    if not result.seeds:
        return line
    finals = [summary["final_accuracy"] for summary in result.summaries]
    line["final_accuracy_mean"], line["final_accuracy_ci95"] = mean_ci95(finals)
    line["best_accuracy_mean"] = statistics.fmean(
        max(row["accuracy"] for row in rows if row["accuracy"] is not None) for rows in result.rows
    )
    if target is not None:
        reached = [r for rows in result.rows if (r := _first_round_reaching(rows, target)) is not None]
        line["seeds_reaching_target"] = f"{len(reached)}/{len(result.rows)}"
        line["rounds_to_target_mean"] = statistics.fmean(reached) if reached else None
    local = [s["final_local_accuracy"] for s in result.summaries if s.get("final_local_accuracy") is not None]
    line["final_local_accuracy_mean"] = statistics.fmean(local) if local else None
    line["epsilon_max"] = max(summary["epsilon_max"] for summary in result.summaries)
    client_level = [s["client_epsilon"] for s in result.summaries if s.get("client_epsilon") is not None]
    line["client_epsilon"] = max(client_level) if client_level else None
    training = [row for rows in result.rows for row in _training_rows(rows)]
    if training:
        line["bytes_up_per_round"] = statistics.fmean(row["bytes_up"] for row in training)
        line["bytes_down_per_round"] = statistics.fmean(row["bytes_down"] for row in training)
    line["wall_seconds_mean"] = statistics.fmean(summary["wall_seconds"] for summary in result.summaries)
    return line


def _format(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column.startswith("bytes"):
        return f"{value / 1024:,.1f} KiB"
    if column in ("rounds_to_target_mean", "wall_seconds_mean"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}" if "accuracy" in column else f"{value:.3f}"
    return str(value)


def write_tables(out_dir: Path, lines: Sequence[Mapping[str, Any]], record: Mapping[str, Any]) -> None:
    with (out_dir / SUMMARY_CSV).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_COLUMNS)
        writer.writerows([["" if line[c] is None else line[c] for c in SUMMARY_COLUMNS] for line in lines])
    target = record.get("target_accuracy")
    header = [
        "run", "method", "seeds", "final acc (mean ± 95% CI)", "best acc",
        f"rounds to {target:g}" if target else "rounds to target", "local acc", "max ε", "client ε",
        "up / round", "down / round", "run time s",
    ]  # fmt: skip
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in lines:
        final = _format(line["final_accuracy_mean"], "final_accuracy_mean")
        if line["final_accuracy_ci95"] is not None and not math.isnan(line["final_accuracy_ci95"]):
            final += f" ± {line['final_accuracy_ci95']:.4f}"
        to_target = _format(line["rounds_to_target_mean"], "rounds_to_target_mean")
        if line["seeds_reaching_target"]:
            to_target += f" ({line['seeds_reaching_target']})"
        formatted = {column: _format(line[column], column) for column in SUMMARY_COLUMNS}
        cells = [
            line["run"], line["method"], line["seeds_done"], final, formatted["best_accuracy_mean"], to_target,
            formatted["final_local_accuracy_mean"], formatted["epsilon_max"], formatted["client_epsilon"],
            formatted["bytes_up_per_round"],
            formatted["bytes_down_per_round"], formatted["wall_seconds_mean"],
        ]  # fmt: skip
        table.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(str(seed) for seed in record["seeds"])
    notes = [
        f"Comparison `{record['source']}`, seeds {seeds}. Accuracy is on the server's held-out set; "
        "'local acc' is the example-weighted mean over the clients' own held-out slices (FedSA-LoRA: each "
        "client's own B). 'max ε' is the largest record-level epsilon of any client, 'client ε' the federation's "
        "client-level epsilon ('-': that guarantee is off). 'best acc' peeks at the held-out set every round "
        "and is for reference only. "
        "Bytes are the training traffic of all sampled clients in a round; run time is the server's, per run, "
        "without process start-up.",
    ]
    (out_dir / SUMMARY_MD).write_text("\n".join(table) + "\n\n" + "\n".join(notes) + "\n")


def _per_round(result: RunResult, key: str) -> tuple[list[int], list[float], list[float]]:
    """Rounds with a value of ``key`` in every finished seed (rounds that were not scored have none), with its
    mean and 95% CI half-width across seeds."""
    common = sorted(
        set.intersection(*(set(row["round"] for row in rows if row.get(key) is not None) for rows in result.rows))
    )
    means, halves = [], []
    for server_round in common:
        values = [next(row[key] for row in rows if row["round"] == server_round) for rows in result.rows]
        mean, half = mean_ci95(values)
        means.append(mean)
        halves.append(0.0 if math.isnan(half) else half)
    return common, means, halves


def plot(out_dir: Path, results: Sequence[RunResult], record: Mapping[str, Any]) -> list[Path]:
    """The three comparison plots; runs without a finished seed are left out."""
    finished = [result for result in results if result.seeds]
    seeds = f"{len(record['seeds'])} seed{'s' if len(record['seeds']) > 1 else ''}"
    written = []

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in finished:
        rounds, means, halves = _per_round(result, "accuracy")
        (line,) = axes.plot(rounds, means, marker="o", markersize=3, label=result.name)
        lower = [mean - half for mean, half in zip(means, halves, strict=True)]
        upper = [mean + half for mean, half in zip(means, halves, strict=True)]
        axes.fill_between(rounds, lower, upper, color=line.get_color(), alpha=0.15, linewidth=0)
    if record.get("target_accuracy"):
        axes.axhline(record["target_accuracy"], color="grey", linestyle=":", linewidth=1, label="target")
    axes.set(title=f"Held-out accuracy per round (mean and 95% CI over {seeds})", xlabel="round", ylabel="accuracy")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    written.append(_save(figure, axes, out_dir / PLOTS["accuracy"]))

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in finished:
        rounds, means, _ = _per_round(result, "epsilon_max")
        axes.plot(rounds, means, marker="o", markersize=3, label=result.name)
    axes.set(title="Largest cumulative ε of any client", xlabel="round", ylabel="max ε (cumulative)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    written.append(_save(figure, axes, out_dir / PLOTS["epsilon"]))

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for result in finished:
        rounds, accuracy, _ = _per_round(result, "accuracy")
        every_round, uplink, _ = _per_round(result, "bytes_up")
        # Uploaded up to each round, every round counted, read off at the rounds that were scored.
        cumulative = dict(zip(every_round, itertools.accumulate(value / 2**20 for value in uplink), strict=True))
        axes.plot([cumulative[r] for r in rounds], accuracy, marker="o", markersize=3, label=result.name)
    axes.set(
        title=f"Accuracy against total client upload (mean over {seeds})",
        xlabel="cumulative uplink (MiB, all clients)",
        ylabel="accuracy",
    )
    written.append(_save(figure, axes, out_dir / PLOTS["uplink"]))
    return written


def _save(figure: plt.Figure, axes: plt.Axes, path: Path) -> Path:
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def render(out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Re-read a comparison directory and (re)write summary.csv, summary.md and the PNG plots."""
    record, results = load_results(out_dir)
    lines = [summarise(result, record.get("target_accuracy")) for result in results]
    write_tables(out_dir, lines, record)
    return lines, plot(out_dir, results, record)
