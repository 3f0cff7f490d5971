"""Paired statistics (fedsvd.paired) and the paired part of the comparison report, on fake result directories."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_compare import PNG_MAGIC, RUNS, fake_run, write

from fedsvd.cli import main
from fedsvd.compare import load_comparison, run_dir
from fedsvd.config import ConfigError
from fedsvd.paired import (
    BETTER,
    BEYOND_NOISE,
    IDENTICAL,
    NOT_SHOWN,
    ONE_SEED,
    UNDER_ONE_EXAMPLE,
    WITHIN_NOISE,
    WORSE,
    accuracy_se,
    detectable_difference,
    mean_ci95,
    paired_accuracy_se,
    paired_difference,
    resolution,
    seeds_needed,
    sign_flip_p_value,
    smallest_p_value,
    t_test_power,
)
from fedsvd.report import PAIRED_CSV, PAIRED_PLOT, PLOTS, SUMMARY_CSV, SUMMARY_MD, render, seed_scores
from fedsvd.results import SUMMARY_JSON

# --- the statistics --------------------------------------------------------------------------------------


def brute_force_p(differences: list[float]) -> float:
    observed = abs(sum(differences))
    patterns = list(itertools.product((1, -1), repeat=len(differences)))
    reached = sum(
        abs(sum(s * d for s, d in zip(signs, differences, strict=True))) >= observed - 1e-12 for signs in patterns
    )
    return reached / len(patterns)


@pytest.mark.parametrize("seeds", [1, 2, 3, 5, 8])
def test_sign_flip_p_value_is_the_exact_count_and_scipys(seeds: int) -> None:
    rng = random.Random(seeds)
    for _ in range(5):
        differences = [rng.gauss(0.01, 0.02) for _ in range(seeds)]
        p_value, exact = sign_flip_p_value(differences)
        assert exact and p_value == pytest.approx(brute_force_p(differences), abs=1e-12)
        if seeds == 1:
            continue  # SciPy needs two observations; one difference always has p = 1
        scipy_p = stats.permutation_test(
            (np.array(differences),), np.mean, permutation_type="samples", n_resamples=np.inf
        ).pvalue
        assert p_value == pytest.approx(scipy_p, abs=1e-12)


def test_sign_flip_counts_ties_and_zero_differences() -> None:
    """Accuracies on a held-out set are multiples of 1/N: equal differences, and zeros, are common."""
    tied = [1 / 223, 1 / 223, -1 / 223, 0.0]
    assert sign_flip_p_value(tied)[0] == pytest.approx(brute_force_p(tied))
    assert sign_flip_p_value([0.0, 0.0, 0.0])[0] == 1.0


def test_the_smallest_p_value_cannot_reach_005_below_six_seeds() -> None:
    for seeds in range(1, 9):
        same_sign = [0.01 * (i + 1) for i in range(seeds)]
        assert sign_flip_p_value(same_sign)[0] == pytest.approx(smallest_p_value(seeds)) == min(1, 2 / 2**seeds)
        assert (smallest_p_value(seeds) < 0.05) == (seeds >= 6)


def test_sign_flip_beyond_the_exact_limit_is_a_close_monte_carlo_estimate() -> None:
    rng = random.Random(7)
    differences = [rng.gauss(0.005, 0.02) for _ in range(14)]
    exact, _ = sign_flip_p_value(differences)
    estimate, was_exact = sign_flip_p_value(differences, max_exact=10)
    assert not was_exact and estimate == pytest.approx(exact, abs=0.01)  # 2^16 patterns: SE below 0.002


def test_mean_ci95_is_scipys_t_interval() -> None:
    values = [0.012, -0.004, 0.031, 0.008]
    mean, half = mean_ci95(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (mean - half, mean + half) == pytest.approx((low, high), rel=1e-12)
    assert math.isnan(mean_ci95([0.5])[1])


def test_detectable_difference_has_the_power_it_claims() -> None:
    """Simulated paired t-tests at the detectable difference reject 'no difference' about 80% of the time."""
    rng = np.random.default_rng(0)
    for seeds in (3, 6):
        difference = detectable_difference(0.02, seeds)
        samples = rng.normal(difference, 0.02, size=(20_000, seeds))
        rejected = stats.ttest_1samp(samples, 0.0, axis=1).pvalue < 0.05
        assert rejected.mean() == pytest.approx(0.8, abs=0.015)


def test_detectable_difference_shrinks_with_seeds_grows_with_spread_and_inverts_seeds_needed() -> None:
    differences = [detectable_difference(0.02, seeds) for seeds in range(2, 40)]
    assert all(later < earlier for earlier, later in itertools.pairwise(differences))
    assert detectable_difference(0.04, 5) == pytest.approx(2 * detectable_difference(0.02, 5))
    assert math.isnan(detectable_difference(0.02, 1))
    for seeds in (2, 3, 4, 6, 10, 25, 120):
        difference = detectable_difference(0.015, seeds)
        assert seeds_needed(difference * (1 + 1e-9), 0.015) == seeds
        assert seeds_needed(difference * (1 - 1e-6), 0.015) == seeds + 1
        assert t_test_power(difference, 0.015, seeds) == pytest.approx(0.8)
    assert seeds_needed(1e-6, 0.5) is None, "beyond the most seeds worth running"
    with pytest.raises(ValueError, match="positive"):
        seeds_needed(0.0, 0.01)


def test_binomial_se_and_the_bound_for_a_difference_on_the_same_examples() -> None:
    assert accuracy_se(0.9, 223) == pytest.approx(math.sqrt(0.9 * 0.1 / 223))
    rng = random.Random(3)
    for _ in range(200):
        p_a, p_b = rng.random(), rng.random()
        # Every joint distribution of (right a, right b) with these marginals: P(both right) in its Fréchet range.
        low, high = max(0.0, p_a + p_b - 1), min(p_a, p_b)
        both = rng.uniform(low, high)
        disagree = p_a + p_b - 2 * both
        true_se = math.sqrt((disagree - (p_a - p_b) ** 2) / 100)
        assert true_se <= paired_accuracy_se(p_a, p_b, 100) + 1e-12
        # Attained at the lower Fréchet bound: the bound is as small as knowing only the accuracies allows.
        worst = math.sqrt((p_a + p_b - 2 * low - (p_a - p_b) ** 2) / 100)
        assert worst == pytest.approx(paired_accuracy_se(p_a, p_b, 100))


def test_resolution_labels_a_difference_by_the_held_out_examples() -> None:
    examples = 223
    assert resolution(0.5 / examples, 0.9, 0.9, examples).label == UNDER_ONE_EXAMPLE
    exact_one = resolution((201 - 200) / examples, 201 / examples, 200 / examples, examples)
    assert exact_one.in_examples == pytest.approx(1.0) and exact_one.label == WITHIN_NOISE
    assert exact_one.noise == pytest.approx(1.959964 * paired_accuracy_se(201 / 223, 200 / 223, 223), rel=1e-6)
    assert resolution(0.2, 0.9, 0.7, examples).label == BEYOND_NOISE


def test_verdict_needs_an_interval_that_excludes_zero() -> None:
    assert paired_difference([0.85, 0.86, 0.84], [0.80, 0.80, 0.80]).verdict == BETTER
    assert paired_difference([0.75, 0.76, 0.74], [0.80, 0.80, 0.80]).verdict == WORSE
    assert paired_difference([0.81, 0.79, 0.80], [0.80, 0.80, 0.80]).verdict == NOT_SHOWN
    assert paired_difference([0.90], [0.80]).verdict == ONE_SEED
    assert paired_difference([0.8, 0.7], [0.8, 0.7]).verdict == IDENTICAL
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([0.8], [0.8, 0.7])


# --- comparison files ------------------------------------------------------------------------------------


def test_comparison_file_reference_and_last_k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    comparison = load_comparison(write(tmp_path / "c.toml", f'reference = "b"\nlast_k = 2\n{RUNS}'))
    assert (comparison.reference, comparison.last_k) == ("b", 2)
    assert comparison.to_record()["reference"] == "b" and comparison.to_record()["last_k"] == 2
    plain = load_comparison(write(tmp_path / "plain.toml", RUNS))
    assert (plain.reference, plain.last_k) == (None, 3)
    for text, message in [
        ('reference = "c"', r"reference = 'c' is not allowed: must name one of the runs \(a, b\)"),
        ("reference = 1", "reference = 1 is not allowed"),
        ("last_k = 0", "last_k = 0 is not allowed: must be an integer >= 1"),
        ("last_k = 1.5", "last_k = 1.5 is not allowed"),
    ]:
        path = write(tmp_path / "bad.toml", f"{text}\n{RUNS}")
        with pytest.raises(ConfigError, match=message) as err:
            load_comparison(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    out = tmp_path / "out"
    path = write(tmp_path / "bad.toml", f'reference = "c"\n{RUNS}')
    assert main(["compare", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "reference = 'c'" in err and not out.exists()


# --- the paired report -----------------------------------------------------------------------------------

HELD_OUT = 223


def finished_run(directory: Path, accuracies: list[float], **summary: object) -> None:
    """A fake finished run (test_compare's), with summary.json fields it lacks, e.g. the held-out size."""
    fake_run(directory, accuracies, bytes_up=100)
    path = directory / SUMMARY_JSON
    path.write_text(json.dumps({**json.loads(path.read_text()), **summary}))


def paired_comparison(tmp_path: Path, reference: str | None = "ref", recorded: bool = True) -> Path:
    """Three seeds of a reference, a run ahead of it on every seed and one that is not, all on 223 examples
    (without a record of their size when not ``recorded``)."""
    runs = ["ref", "ahead", "even", "twin"]
    record = {"source": "c.toml", "base": {}, "seeds": [0, 1, 2], "target_accuracy": None, "reference": reference,
              "last_k": 2, "runs": [{"name": name, "method": "ffa", "overrides": {}} for name in runs]}  # fmt: skip
    (tmp_path / "comparison.json").write_text(json.dumps(record))
    summary = {"held_out_examples": HELD_OUT, "majority_accuracy": 0.5} if recorded else {}
    for seed, base in enumerate([150, 160, 170]):
        curve = [100, base - 20, base - 10, base]  # held-out examples right, round by round
        offsets = {"ref": 0, "ahead": 40 + seed, "even": [-5, 5, 0][seed], "twin": 0}
        for name, offset in offsets.items():
            accuracies = [(right + (offset if r else 0)) / HELD_OUT for r, right in enumerate(curve)]
            finished_run(run_dir(tmp_path, name, seed), accuracies, **summary)
    return tmp_path


def test_seed_scores_last_k_mean_and_area_under_the_curve() -> None:
    rows = [{"round": r, "accuracy": a} for r, a in enumerate([0.5, None, 0.7, 0.8, 0.6])]
    scores = seed_scores(rows, {"final_accuracy": 0.6, "held_out_examples": 200}, last_k=2)
    assert scores.final_accuracy == 0.6 and scores.last_k_accuracy == pytest.approx((0.8 + 0.6) / 2)
    # Trapezoids over the scored rounds 0, 2, 3, 4 (round 1 was not scored), divided by the 4 rounds spanned.
    assert scores.accuracy_auc == pytest.approx((2 * (0.5 + 0.7) / 2 + (0.7 + 0.8) / 2 + (0.8 + 0.6) / 2) / 4)
    assert scores.held_out_examples == 200
    assert seed_scores(rows, {"final_accuracy": 0.6}, 9).last_k_accuracy == pytest.approx((0.7 + 0.8 + 0.6) / 3)
    # A run written before summary.json recorded the held-out size: its last round scored on all of it says it.
    older = [{**row, "eval_examples": 180, "eval_sampled": False} for row in rows[:-1]]
    older.append({"round": 5, "accuracy": 0.6, "eval_examples": 50, "eval_sampled": True})
    assert seed_scores(older, {"final_accuracy": 0.6}, 2).held_out_examples == 180
    assert seed_scores(rows, {"final_accuracy": 0.6}, 2).held_out_examples is None


def test_paired_report_calls_a_consistent_lead_better_and_a_zero_mean_difference_not(tmp_path: Path) -> None:
    out = paired_comparison(tmp_path)
    lines, plots = render(out)
    with (out / PAIRED_CSV).open() as handle:
        paired = {(row["run"], row["score"]): row for row in csv.DictReader(handle)}
    assert {run for run, _ in paired} == {"ahead", "even", "twin"}
    ahead = paired["ahead", "final_accuracy"]
    differences = [40 / HELD_OUT, 41 / HELD_OUT, 42 / HELD_OUT]
    mean, half = mean_ci95(differences)
    assert float(ahead["mean_difference"]) == pytest.approx(mean) and float(ahead["ci95"]) == pytest.approx(half)
    assert ahead["verdict"] == BETTER and float(ahead["p_value"]) == pytest.approx(0.25)
    assert ahead["held_out_label"] == BEYOND_NOISE and float(ahead["difference_in_examples"]) == pytest.approx(41)
    assert float(ahead["detectable_difference"]) == pytest.approx(
        detectable_difference(statistics.stdev(differences), 3)
    )
    assert int(ahead["seeds_for_0.01"]) == seeds_needed(0.01, statistics.stdev(differences))
    assert (
        paired["ahead", "last_k_accuracy"]["verdict"] == BETTER and paired["ahead", "accuracy_auc"]["verdict"] == BETTER
    )
    even = paired["even", "final_accuracy"]
    assert float(even["mean_difference"]) == pytest.approx(0) and even["verdict"] == NOT_SHOWN
    assert float(even["p_value"]) == pytest.approx(1.0) and even["held_out_label"] == UNDER_ONE_EXAMPLE
    assert paired["twin", "final_accuracy"]["verdict"] == IDENTICAL

    by_run = {line["run"]: line for line in lines}
    ref = by_run["ref"]
    assert ref["last_k_accuracy_mean"] == pytest.approx(
        statistics.fmean([(b - 10 + b) / 2 / HELD_OUT for b in (150, 160, 170)])
    )
    assert (
        ref["eval_se"] == pytest.approx(accuracy_se(160 / HELD_OUT, HELD_OUT)) and ref["held_out_examples"] == HELD_OUT
    )
    with (out / SUMMARY_CSV).open() as handle:
        assert float(next(csv.DictReader(handle))["accuracy_auc_mean"]) == pytest.approx(ref["accuracy_auc_mean"])

    markdown = (out / SUMMARY_MD).read_text()
    assert "## Paired with `ref`" in markdown and "| ahead | final acc | 3 |" in markdown
    assert "below 6 seeds it cannot reach 0.05" in markdown and "### What these seeds can detect" in markdown
    assert "last-2 acc" in markdown and "majority class scores 0.5000" in markdown
    assert sorted(path.name for path in plots) == sorted([*PLOTS.values(), PAIRED_PLOT])
    for path in plots:
        assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 10_000


def test_report_of_older_runs_says_what_it_does_not_know(tmp_path: Path) -> None:
    """No reference in the record, no held-out size or majority class in summary.json: the report still renders."""
    out = paired_comparison(tmp_path, reference=None, recorded=False)
    lines, plots = render(out)
    markdown = (out / SUMMARY_MD).read_text()
    assert "No paired analysis" in markdown and "--reference RUN" in markdown
    assert "majority class scores unknown" in markdown and "| unknown |" in markdown
    assert not (out / PAIRED_CSV).exists() and PAIRED_PLOT not in [path.name for path in plots]
    assert all(line["eval_se"] is None for line in lines)
    render(out, reference="ref")
    with (out / PAIRED_CSV).open() as handle:
        assert {row["held_out_label"] for row in csv.DictReader(handle)} == {"unknown"}


def test_report_cli_prints_the_paired_table_and_refuses_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = paired_comparison(tmp_path, reference=None)
    assert main(["report", str(out), "--reference", "even", "--last-k", "1", "--difference", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "## Paired with `even`" in printed and "| ref | last-1 acc | 3 |" in printed
    assert "seeds for 0.05" in printed and "seeds for 0.01" not in printed and PAIRED_PLOT in printed
    for option, message in [
        (["--reference", "nope"], "--reference = 'nope' is not allowed: must name one of the runs (ref, ahead"),
        (["--last-k", "0"], "--last-k = 0 is not allowed"),
        (["--difference", "0"], "--difference = 0.0 is not allowed"),
    ]:
        assert main(["report", str(out), *option]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedsvd: error: ") and message in err and "\n" not in err
