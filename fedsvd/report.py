"""Turn a comparison's result directories into tables (CSV + Markdown) and PNG plots.

Everything here reads only what the runs wrote (metrics.jsonl, summary.json) and the comparison record, so
``fedsvd report`` can re-render a comparison at any time, including while it is still running or after some runs
failed. With a reference run, every other run is compared with it seed by seed (``fedsvd.paired``): runs of one
seed share partitions, client sampling and noise, so the paired differences see through the seed-to-seed spread
that swallows every difference between unpaired means.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fedsvd.compare import DEFAULT_LAST_K, check_last_k, check_reference, run_dir
from fedsvd.config import ConfigError
from fedsvd.paired import (
    ALPHA,
    EXACT_MAX_SEEDS,
    MONTE_CARLO_PATTERNS,
    MOST_SEEDS,
    POWER,
    PairedDifference,
    Resolution,
    accuracy_se,
    detectable_difference,
    mean_ci95,
    paired_difference,
    resolution,
    seeds_needed,
    smallest_p_value,
)
from fedsvd.results import SUMMARY_JSON, read_metrics

COMPARISON_JSON = "comparison.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PAIRED_CSV = "paired.csv"
# Written on every render; the paired plot only when the comparison has a reference run.
PLOTS = {
    "accuracy": "accuracy_vs_round.png",
    "epsilon": "epsilon_vs_round.png",
    "uplink": "accuracy_vs_uplink.png",
}
PAIRED_PLOT = "paired_difference.png"
# The differences the report says how many seeds would detect, unless told others.
DEFAULT_DIFFERENCES = (0.01, 0.02)
# The per-seed scores, all held-out accuracies (higher is better); the last two are less noisy than the final one.
SCORES = ("final_accuracy", "last_k_accuracy", "accuracy_auc")
SUMMARY_COLUMNS = (
    "run",
    "method",
    "seeds_done",
    "final_accuracy_mean",
    "final_accuracy_ci95",
    "last_k_accuracy_mean",
    "accuracy_auc_mean",
    "held_out_examples",
    "eval_se",
    "majority_accuracy",
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
# Line styles that keep runs apart where their curves run close: a marker per run, and a new dash pattern once
# the ten default colours come round again.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DASHES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class RunResult:
    """Everything finished seeds of one run tell: per-seed metric rows, in seed order."""

    name: str
    method: str
    seeds: tuple[int, ...]
    rows: tuple[tuple[dict[str, Any], ...], ...]
    summaries: tuple[dict[str, Any], ...]
    missing: tuple[int, ...]


@dataclass(frozen=True)
class SeedScores:
    """One finished seed of one run, reduced to the scores a comparison ranks by."""

    final_accuracy: float
    last_k_accuracy: float  # mean over the last k scored rounds after round 0
    accuracy_auc: float  # area under the accuracy curve over the rounds it spans, divided by that span
    held_out_examples: int | None  # N of the held-out set; None where the run did not record it


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


def _area_under(points: Sequence[tuple[int, float]]) -> float:
    """Trapezoid-rule area under (round, accuracy) points divided by the rounds they span: a mean accuracy over
    training that rewards learning early, in the same units as an accuracy."""
    area = sum((r1 - r0) * (a0 + a1) / 2 for (r0, a0), (r1, a1) in itertools.pairwise(points))
    return area / (points[-1][0] - points[0][0])


def _held_out_size(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> int | None:
    """How many examples the final accuracy was scored on. summary.json records it; for runs written before it
    did, the last round scored on the whole held-out set (not on the ``eval_sample``) says the same."""
    if summary.get("held_out_examples"):
        return int(summary["held_out_examples"])
    whole = [
        row["eval_examples"]
        for row in rows
        if row.get("accuracy") is not None and row.get("eval_examples") and not row.get("eval_sampled")
    ]
    return int(whole[-1]) if whole else None


def seed_scores(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], last_k: int) -> SeedScores:
    """The scores of one finished seed. Rounds the held-out set did not score (``eval_every``) are skipped; a
    run with too few scored rounds falls back to its final accuracy."""
    final = summary["final_accuracy"]
    scored = [(row["round"], row["accuracy"]) for row in rows if row.get("accuracy") is not None]
    trained = [accuracy for server_round, accuracy in scored if server_round > 0]
    return SeedScores(
        final_accuracy=final,
        last_k_accuracy=statistics.fmean(trained[-last_k:]) if trained else final,
        accuracy_auc=_area_under(scored) if len(scored) > 1 else final,
        held_out_examples=_held_out_size(rows, summary),
    )


def _scores_by_seed(result: RunResult, last_k: int) -> dict[int, SeedScores]:
    return {
        seed: seed_scores(rows, summary, last_k)
        for seed, rows, summary in zip(result.seeds, result.rows, result.summaries, strict=True)
    }


def _smallest_held_out(scores: Sequence[SeedScores]) -> int | None:
    """The held-out size to judge by: the smallest of the seeds', unknown if any seed did not record it."""
    sizes = [score.held_out_examples for score in scores]
    return None if not sizes or None in sizes else min(sizes)  # type: ignore[type-var]


def _first_round_reaching(rows: Sequence[Mapping[str, Any]], target: float) -> int | None:
    scored = (row for row in rows if row["round"] > 0 and row["accuracy"] is not None)
    return next((row["round"] for row in scored if row["accuracy"] >= target), None)


def _training_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [row for row in rows if row["round"] > 0]


def summarise(result: RunResult, target: float | None, last_k: int) -> dict[str, Any]:
    """One line of the summary table (values are None where nothing finished)."""
    line: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS)
    line.update(
        run=result.name,
        method=result.method,
        seeds_done=f"{len(result.seeds)}/{len(result.seeds) + len(result.missing)}",
    )
    if not result.seeds:
        return line
    scores = list(_scores_by_seed(result, last_k).values())
    line["final_accuracy_mean"], line["final_accuracy_ci95"] = mean_ci95([s.final_accuracy for s in scores])
    line["last_k_accuracy_mean"] = statistics.fmean(s.last_k_accuracy for s in scores)
    line["accuracy_auc_mean"] = statistics.fmean(s.accuracy_auc for s in scores)
    line["held_out_examples"] = _smallest_held_out(scores)
    if line["held_out_examples"]:
        line["eval_se"] = accuracy_se(line["final_accuracy_mean"], line["held_out_examples"])
    majority = [s["majority_accuracy"] for s in result.summaries if s.get("majority_accuracy") is not None]
    line["majority_accuracy"] = statistics.fmean(majority) if majority else None
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


@dataclass(frozen=True)
class PairedLine:
    """One run against the reference on one score, over the seeds both finished."""

    run: str
    score: str
    seeds: tuple[int, ...]
    paired: PairedDifference
    resolution: Resolution | None  # None: the held-out size was not recorded
    detectable: float  # nan below 2 seeds
    # Per difference asked about; None: beyond MOST_SEEDS. Empty when there is no spread to plan with.
    seeds_needed: dict[float, int | None]


def compare_with(
    reference: RunResult, results: Sequence[RunResult], last_k: int, differences: Sequence[float]
) -> list[PairedLine]:
    """Every other run against ``reference``, per score, on the seeds both have finished."""
    base = _scores_by_seed(reference, last_k)
    lines = []
    for result in results:
        if result.name == reference.name:
            continue
        own = _scores_by_seed(result, last_k)
        seeds = tuple(seed for seed in own if seed in base)
        if not seeds:
            continue
        examples = _smallest_held_out([own[s] for s in seeds] + [base[s] for s in seeds])
        for score in SCORES:
            values = [getattr(own[s], score) for s in seeds]
            reference_values = [getattr(base[s], score) for s in seeds]
            paired = paired_difference(values, reference_values)
            judged = (
                resolution(paired.mean, statistics.fmean(values), statistics.fmean(reference_values), examples)
                if examples
                else None
            )
            needed = {d: seeds_needed(d, paired.sd) for d in differences} if paired.has_spread else {}
            detectable = detectable_difference(paired.sd, len(seeds))
            lines.append(PairedLine(result.name, score, seeds, paired, judged, detectable, needed))
    return lines


def _score_label(score: str, last_k: int) -> str:
    return {"final_accuracy": "final acc", "last_k_accuracy": f"last-{last_k} acc", "accuracy_auc": "AUC"}[score]


def _format(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column.startswith("bytes"):
        return f"{value / 1024:,.1f} KiB"
    if column in ("rounds_to_target_mean", "wall_seconds_mean"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}" if "accuracy" in column or column == "eval_se" else f"{value:.3f}"
    return str(value)


def _csv_value(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _summary_markdown(lines: Sequence[Mapping[str, Any]], record: Mapping[str, Any], last_k: int) -> str:
    target = record.get("target_accuracy")
    header = [
        "run", "method", "seeds", "final acc (mean ± 95% CI)", f"last-{last_k} acc", "AUC", "eval SE (N)",
        "best acc", f"rounds to {target:g}" if target else "rounds to target", "local acc", "max ε", "client ε",
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
        known = line["eval_se"] is not None
        eval_se = f"{formatted['eval_se']} (N={line['held_out_examples']})" if known else "unknown"
        cells = [
            line["run"], line["method"], line["seeds_done"], final, formatted["last_k_accuracy_mean"],
            formatted["accuracy_auc_mean"], eval_se, formatted["best_accuracy_mean"], to_target,
            formatted["final_local_accuracy_mean"], formatted["epsilon_max"], formatted["client_epsilon"],
            formatted["bytes_up_per_round"], formatted["bytes_down_per_round"], formatted["wall_seconds_mean"],
        ]  # fmt: skip
        table.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(str(seed) for seed in record["seeds"])
    majority = sorted({f"{line['majority_accuracy']:.4f}" for line in lines if line["majority_accuracy"]})
    notes = (
        f"Comparison `{record['source']}`, seeds {seeds}. Accuracy is on the server's held-out set; always "
        f"predicting its majority class scores {' / '.join(majority) or 'unknown (not recorded by these runs)'}. "
        f"'last-{last_k} acc' is the mean over the last {last_k} scored rounds and 'AUC' the area under the "
        "accuracy curve (trapezoid rule over the scored rounds from round 0, divided by the rounds it spans: a "
        "mean accuracy over training); both are less noisy than the last round alone. 'eval SE' is the binomial "
        "standard error √(p(1-p)/N) of the final accuracy on the N held-out examples: what the held-out set "
        "alone can resolve. 'local acc' is the example-weighted mean over the clients' own held-out slices "
        "(FedSA-LoRA: each client's own B). 'max ε' is the largest record-level epsilon of any client, 'client ε' "
        "the federation's client-level epsilon ('-': that guarantee is off). 'best acc' peeks at the held-out "
        "set every round and is for reference only. Bytes are the training traffic of all sampled clients in a "
        "round; run time is the server's, per run, without process start-up."
    )
    return "\n".join(table) + "\n\n" + notes + "\n"


def _paired_markdown(
    reference: str | None,
    lines: Sequence[PairedLine] | None,
    last_k: int,
    differences: Sequence[float],
) -> str:
    """The paired table and, under it, what these seeds could detect and how many a difference would need."""
    if reference is None:
        return (
            'No paired analysis: the comparison names no reference run. Name one (`reference = "<run>"` in the '
            "comparison file, or `fedsvd report DIR --reference RUN`) to compare every run with it seed by seed.\n"
        )
    title = f"## Paired with `{reference}`: run - {reference} on the same seed\n\n"
    if not lines:
        return title + f"No seed finished by `{reference}` and another run yet.\n"
    header = [
        "run", "score", "seeds", "per seed", "mean ± 95% CI", "sign-flip p (smallest possible)", "verdict",
        "held-out resolution",
    ]  # fmt: skip
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in lines:
        paired = line.paired
        interval = f"{paired.mean:+.4f}" + ("" if math.isnan(paired.half_width) else f" ± {paired.half_width:.4f}")
        p_value = f"{paired.p_value:.3f} ({smallest_p_value(paired.seeds):.3f})" + ("" if paired.exact else " MC")
        if line.resolution is None:
            held_out = "unknown (held-out size not recorded)"
        else:
            judged = line.resolution
            held_out = (
                f"{judged.in_examples:.1f} of {judged.examples} examples, noise ±{judged.noise:.4f}: {judged.label}"
            )
        cells = [
            line.run, _score_label(line.score, last_k), str(paired.seeds),
            ", ".join(f"{d:+.4f}" for d in paired.differences), interval, p_value, paired.verdict, held_out,
        ]  # fmt: skip
        table.append("| " + " | ".join(cells) + " |")
    fewest = min(line.paired.seeds for line in lines)
    notes = [
        "A run is called better or worse only when the 95% Student-t interval of its per-seed differences "
        "excludes zero (a paired t-test at 5%). The p-value is the exact two-sided sign-flip permutation test "
        "over all 2^n sign patterns: it assumes no normal distribution (which a few seeds cannot check), keeps "
        "the sizes that Wilcoxon's signed-rank test reduces to ranks, and takes ties and zero differences as "
        "they come.",
    ]
    if fewest < 6:
        notes.append(
            f"With n seeds its smallest possible p is 2/2^n ({smallest_p_value(fewest):.3f} at {fewest}): below 6 "
            "seeds it cannot reach 0.05 whatever the difference, so read the interval, and run 6 seeds or more "
            "for a test that needs no normality."
        )
    if any(not line.paired.exact for line in lines):
        notes.append(
            f"'MC': more than {EXACT_MAX_SEEDS} seeds; p estimated from {MONTE_CARLO_PATTERNS:,} random sign patterns."
        )
    notes.append(
        "Held-out resolution: the mean difference in held-out examples, and the noise one held-out set of N "
        "examples leaves in a difference of two accuracies scored on it: 1.96 x √((min(p_a + p_b, 2 - p_a - "
        "p_b) - (p_a - p_b)²) / N), an upper bound on its standard error (which examples each model gets right "
        "is not logged; models that agree on most examples resolve smaller differences). A difference within "
        "it may be the held-out sample's, not the methods'."
    )
    detect_header = ["run", "score", "seeds", "SD of differences", "detectable difference"]
    detect_header += [f"seeds for {d:g}" for d in differences]
    detect = ["| " + " | ".join(detect_header) + " |", "|" + "---|" * len(detect_header)]
    for line in lines:
        needed = [_seeds_cell(line, difference) or "-" for difference in differences]
        cells = [
            line.run, _score_label(line.score, last_k), str(line.paired.seeds), _format(line.paired.sd, "eval_se"),
            _format(line.detectable, "eval_se") if line.paired.has_spread else "-", *needed,
        ]  # fmt: skip
        detect.append("| " + " | ".join(cells) + " |")
    detect_notes = (
        f"Detectable difference: the smallest true mean difference a paired t-test at alpha {ALPHA:g} finds with "
        f"power {POWER:g} at these seeds, from the test's exact power (noncentral t with n - 1 degrees of freedom "
        "and noncentrality d √n / SD), with the observed SD of the differences taken as the true one (a planning "
        "figure: a few seeds estimate the SD roughly). 'seeds for d': the fewest seeds that detect d with that "
        "power."
    )
    if not all(line.paired.has_spread for line in lines):
        detect_notes += " '-': one seed, or the same difference on every seed, leaves no spread to plan with."
    return (
        title
        + "\n".join(table)
        + "\n\n"
        + " ".join(notes)
        + "\n\n### What these seeds can detect\n\n"
        + "\n".join(detect)
        + "\n\n"
        + detect_notes
        + "\n"
    )


PAIRED_COLUMNS = (
    "run", "reference", "score", "last_k", "seeds", "differences", "mean_difference", "ci95", "ci_low", "ci_high",
    "p_value", "p_exact", "p_smallest", "verdict", "held_out_examples", "difference_in_examples", "held_out_noise",
    "held_out_label", "sd_difference", "detectable_difference",
)  # fmt: skip


def _paired_row(line: PairedLine, reference: str | None, last_k: int, differences: Sequence[float]) -> dict[str, Any]:
    """One row of paired.csv: PAIRED_COLUMNS, then the seeds each asked-about difference needs."""
    paired, judged = line.paired, line.resolution
    values = (
        line.run, reference, line.score, last_k, ";".join(str(s) for s in line.seeds),
        ";".join(f"{d:.6g}" for d in paired.differences), paired.mean, paired.half_width,
        paired.mean - paired.half_width, paired.mean + paired.half_width, paired.p_value, paired.exact,
        smallest_p_value(paired.seeds), paired.verdict, judged.examples if judged else None,
        judged.in_examples if judged else None, judged.noise if judged else None,
        judged.label if judged else "unknown", paired.sd, line.detectable,
    )  # fmt: skip
    row = dict(zip(PAIRED_COLUMNS, values, strict=True))
    row.update({_seeds_column(difference): _seeds_cell(line, difference) for difference in differences})
    return row


def _seeds_column(difference: float) -> str:
    return f"seeds_for_{difference:g}"


def _seeds_cell(line: PairedLine, difference: float) -> str:
    """How many seeds ``difference`` needs, as the tables show it ("": no spread to plan with)."""
    if not line.paired.has_spread:
        return ""
    needed = line.seeds_needed[difference]
    return f"> {MOST_SEEDS}" if needed is None else str(needed)


def write_tables(
    out_dir: Path,
    lines: Sequence[Mapping[str, Any]],
    record: Mapping[str, Any],
    last_k: int,
    reference: str | None,
    paired: Sequence[PairedLine] | None,
    differences: Sequence[float],
) -> None:
    """summary.csv, paired.csv (with a reference run) and summary.md, which holds both tables."""
    with (out_dir / SUMMARY_CSV).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_COLUMNS)
        writer.writerows([[_csv_value(line[c]) for c in SUMMARY_COLUMNS] for line in lines])
    if paired is not None:
        with (out_dir / PAIRED_CSV).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, [*PAIRED_COLUMNS, *map(_seeds_column, differences)])
            writer.writeheader()
            for line in paired:
                row = _paired_row(line, reference, last_k, differences)
                writer.writerow({column: _csv_value(value) for column, value in row.items()})
    markdown = (
        _summary_markdown(lines, record, last_k) + "\n" + _paired_markdown(reference, paired, last_k, differences)
    )
    (out_dir / SUMMARY_MD).write_text(markdown)


# --- plots -----------------------------------------------------------------------------------------------


def _per_round(result: RunResult, key: str) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...] | None]:
    """Rounds with a value of ``key`` in every finished seed (rounds that were not scored have none), with its
    mean and the 95% CI half-width across seeds (None below 2 seeds: no interval to draw)."""
    common = sorted(
        set.intersection(*(set(row["round"] for row in rows if row.get(key) is not None) for rows in result.rows))
    )
    per_round = [[next(row[key] for row in rows if row["round"] == r) for rows in result.rows] for r in common]
    summaries = [mean_ci95(values) for values in per_round]
    halves = tuple(half for _, half in summaries) if len(result.rows) > 1 else None
    return tuple(common), tuple(mean for mean, _ in summaries), halves


Series = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...] | None]  # x, y, CI half-widths or None


def _merge(series: Sequence[tuple[str, Series]], kind: str) -> list[tuple[str, Series]]:
    """Runs whose curves are identical (same method rules on the same seeds can give exactly the same numbers)
    become one line labelled with every run it stands for: drawn separately, the last would hide the others.
    ``kind``, if any, is said once per label."""
    names: dict[Series, list[str]] = {}
    for name, data in series:
        names.setdefault(data, []).append(name)
    merged = []
    for data, group in names.items():
        notes = ", ".join(note for note in (kind, "identical" if len(group) > 1 else "") if note)
        merged.append((textwrap.fill(", ".join(group) + (f" ({notes})" if notes else ""), 60), data))
    return merged


def _draw(
    axes: plt.Axes, series: Sequence[tuple[str, Series]], kind: str = "", dashes: str | None = None, shift: float = 0.0
) -> None:
    """One line per merged series, each with its own marker, and its 95% band where it has one. ``shift`` moves
    the lines apart along x by that much each (on a round axis), so that close but different curves stay visible."""
    merged = _merge(series, kind)
    for index, (label, (x, y, halves)) in enumerate(merged):
        x = [value + (index - (len(merged) - 1) / 2) * shift for value in x]
        linestyle = dashes or DASHES[index // 10 % len(DASHES)]
        (line,) = axes.plot(
            x, y, marker=MARKERS[index % len(MARKERS)], markersize=4, linestyle=linestyle, linewidth=1.3, label=label
        )
        if halves is not None:
            lower = [mean - half for mean, half in zip(y, halves, strict=True)]
            upper = [mean + half for mean, half in zip(y, halves, strict=True)]
            axes.fill_between(x, lower, upper, color=line.get_color(), alpha=0.15, linewidth=0)


def _seed_phrase(finished: Sequence[RunResult], band: bool) -> str:
    """What a plot's lines are over: the title must not promise a band that a single seed cannot have."""
    counts = sorted({len(result.seeds) for result in finished})
    if counts == [1]:
        return "1 seed" + (", no interval" if band else "")
    if len(counts) == 1:
        return f"mean{' and 95% CI' if band else ''} over {counts[0]} seeds"
    return "mean over finished seeds" + ("; 95% CI where a run has 2 or more" if band else "")


def _horizontal(axes: plt.Axes, values: Sequence[float], label: str, style: str) -> None:
    """Reference lines (targets, majority class), one per distinct value, labelled with it."""
    for value in sorted(set(values)):
        axes.axhline(value, color="dimgrey", linestyle=style, linewidth=1, label=f"{label} {value:.4g}")


def _majority(finished: Sequence[RunResult]) -> list[float]:
    return [round(s["majority_accuracy"], 4) for r in finished for s in r.summaries if s.get("majority_accuracy")]


def plot(out_dir: Path, results: Sequence[RunResult], record: Mapping[str, Any]) -> list[Path]:
    """The three comparison plots; runs without a finished seed are left out."""
    finished = [result for result in results if result.seeds]
    written = []

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    _draw(axes, [(result.name, _per_round(result, "accuracy")) for result in finished], shift=0.06)
    if record.get("target_accuracy"):
        _horizontal(axes, [record["target_accuracy"]], "target", ":")
    _horizontal(axes, _majority(finished), "majority class", "--")
    axes.set(
        title=f"Held-out accuracy per round\n{_seed_phrase(finished, band=True)}", xlabel="round", ylabel="accuracy"
    )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    written.append(_save(figure, axes, out_dir / PLOTS["accuracy"]))

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    record_level, client_level, without = [], [], []
    for result in finished:
        rounds, epsilon, _ = _per_round(result, "epsilon_max")
        if any(epsilon):
            record_level.append((result.name, (rounds, epsilon, None)))
        client_rounds, client_epsilon, _ = _per_round(result, "client_epsilon")
        if client_rounds:
            client_level.append((result.name, (client_rounds, client_epsilon, None)))
        if not any(epsilon) and not client_rounds:
            without.append(result.name)
    _draw(axes, record_level)
    _draw(axes, client_level, kind="client-level", dashes="--")
    if without:
        axes.plot([], [], linestyle="none", label=f"no DP: {', '.join(without)}")
    summaries = [summary for result in finished for summary in result.summaries]
    _horizontal(axes, [s["epsilon_target"] for s in summaries if s.get("epsilon_target")], "target ε", ":")
    targets = [s["client_epsilon_target"] for s in summaries if s.get("client_epsilon_target")]
    _horizontal(axes, targets, "target client-level ε", "-.")
    kinds = [
        kind
        for kind, drawn in (
            ("largest record-level ε of any client", record_level),
            ("client-level ε, dashed", client_level),
        )
        if drawn
    ]
    axes.set(
        title=f"Cumulative ε per round\n{'; '.join([*kinds, _seed_phrase(finished, band=False)])}",
        xlabel="round",
        ylabel="ε (cumulative)",
    )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    written.append(_save(figure, axes, out_dir / PLOTS["epsilon"]))

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    series = []
    for result in finished:
        rounds, accuracy, _ = _per_round(result, "accuracy")
        every_round, uplink, _ = _per_round(result, "bytes_up")
        # Uploaded up to each round, every round counted, read off at the rounds that were scored.
        cumulative = dict(zip(every_round, itertools.accumulate(value / 2**20 for value in uplink), strict=True))
        series.append((result.name, (tuple(cumulative[r] for r in rounds), accuracy, None)))
    _draw(axes, series)
    _horizontal(axes, _majority(finished), "majority class", "--")
    axes.set(
        title=f"Accuracy against total client upload\n{_seed_phrase(finished, band=False)}",
        xlabel="cumulative uplink (MiB, all clients)",
        ylabel="accuracy",
    )
    written.append(_save(figure, axes, out_dir / PLOTS["uplink"]))
    return written


def plot_paired(out_dir: Path, lines: Sequence[PairedLine], reference: str, last_k: int) -> Path:
    """Per score, per run: the difference to the reference on each seed (a dot, one colour per seed), their
    mean with its 95% interval, and the band within which the held-out set cannot tell the difference."""
    runs = list(dict.fromkeys(line.run for line in lines))
    seeds = sorted({seed for line in lines for seed in line.seeds})
    colours = plt.get_cmap("tab10" if len(seeds) <= 10 else "viridis")(range(len(seeds)))
    spread = min(0.06, 0.3 / len(seeds))
    titles = {
        "final_accuracy": "final accuracy",
        "last_k_accuracy": f"mean accuracy over the last {last_k} scored rounds",
        "accuracy_auc": "AUC (mean accuracy over training)",
    }
    figure, panels = plt.subplots(
        len(SCORES), 1, figsize=(max(7.0, 1.4 * len(runs) + 3), 2.9 * len(SCORES)), sharex=True, squeeze=False
    )
    for score, axes in zip(SCORES, panels[:, 0], strict=True):
        axes.axhline(0, color="black", linewidth=0.8)
        drawn: list[float] = []  # the differences and intervals: they, not the (often far wider) band, set the scale
        for line in (line for line in lines if line.score == score):
            position, paired = runs.index(line.run), line.paired
            drawn += [abs(d) for d in paired.differences]
            if not math.isnan(paired.half_width):
                drawn.append(abs(paired.mean) + paired.half_width)
            if line.resolution is not None:
                noise = line.resolution.noise
                axes.fill_between(
                    [position - 0.4, position + 0.4], -noise, noise, color="grey", alpha=0.15, linewidth=0,
                    label="held-out noise (bound, ±1.96 SE)",
                )  # fmt: skip
            interval = not math.isnan(paired.half_width)
            for seed, difference in zip(line.seeds, paired.differences, strict=True):
                index = seeds.index(seed)
                axes.plot(
                    position - 0.12 * interval + (index - (len(seeds) - 1) / 2) * spread, difference, "o", markersize=5,
                    color=colours[index], label=f"seed {seed}",
                )  # fmt: skip
            if interval:
                axes.errorbar(
                    position + 0.22, paired.mean, yerr=paired.half_width, fmt="D", color="black", markersize=5,
                    capsize=4, label="mean, 95% CI",
                )  # fmt: skip
            verdict = paired.verdict + (f"\n{line.resolution.label}" if line.resolution is not None else "")
            axes.annotate(
                verdict, (position, 1), xycoords=("data", "axes fraction"), xytext=(0, -3),
                textcoords="offset points", ha="center", va="top", fontsize=7.5,
            )  # fmt: skip
        axes.set_title(titles[score], fontsize=9.5)
        axes.set_ylabel(f"run - {reference}")
        # Symmetric about zero, with room above for the verdicts; a band wider than this fills the panel's column.
        extent = max(drawn, default=0.0) or 0.005
        axes.set_ylim(-1.3 * extent, 2.0 * extent)
        axes.grid(True, axis="y", alpha=0.3)
    bottom = panels[-1, 0]
    bottom.set_xticks(range(len(runs)), runs)
    bottom.set_xlim(-0.6, len(runs) - 0.4)
    # Every run labels what it draws (one with seeds another lacks, or the only one with an interval): one entry
    # per label, in the order they first appear.
    entries = {label: handle for handle, label in zip(*panels[0, 0].get_legend_handles_labels(), strict=True)}
    labels, handles = list(entries), list(entries.values())
    columns = min(len(handles), 5)
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    shown = (
        "per seed, and mean with 95% CI" if any(line.paired.seeds > 1 for line in lines) else "one seed: no interval"
    )
    figure.suptitle(f"Difference to {reference} on the same seed ({shown})", fontsize=11)
    legend_rows = math.ceil(len(handles) / columns)
    figure.tight_layout(rect=(0, 0.012 + 0.022 * legend_rows, 1, 1))
    path = out_dir / PAIRED_PLOT
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def _save(figure: plt.Figure, axes: plt.Axes, path: Path) -> Path:
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def render(
    out_dir: Path,
    reference: str | None = None,
    last_k: int | None = None,
    differences: Sequence[float] = DEFAULT_DIFFERENCES,
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Re-read a comparison directory and (re)write summary.csv, summary.md, paired.csv and the PNG plots.

    ``reference`` and ``last_k`` override the comparison's own (a directory written before it had them);
    ``differences`` are the differences the report says how many seeds would need to detect.

    Raises
    ------
    FileNotFoundError
        ``out_dir`` holds no comparison.
    ConfigError
        One line naming the option: a reference that is not a run, a ``last_k`` below 1, a difference outside
        (0, 1].
    """
    record, results = load_results(out_dir)
    if reference is not None:
        check_reference(reference, [result.name for result in results], "--reference")
    reference = reference or record.get("reference")
    last_k = record.get("last_k", DEFAULT_LAST_K) if last_k is None else check_last_k(last_k, "--last-k")
    for difference in differences:
        if not 0 < difference <= 1:
            raise ConfigError(f"--difference = {difference!r} is not allowed: must be in (0, 1]")
    lines = [summarise(result, record.get("target_accuracy"), last_k) for result in results]
    paired = None
    if reference is not None:
        base = next(result for result in results if result.name == reference)
        paired = compare_with(base, results, last_k, differences)
    write_tables(out_dir, lines, record, last_k, reference, paired, differences)
    plots = plot(out_dir, results, record)
    if paired:
        plots.append(plot_paired(out_dir, paired, reference, last_k))  # type: ignore[arg-type]
    return lines, plots
