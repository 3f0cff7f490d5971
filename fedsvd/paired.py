"""Paired statistics for runs that share each seed's federation, and what a held-out set can resolve.

Every run of a seed trains on the same partitions, client sampling and noise streams, so the difference between
two runs on one seed is the methods' own, and the seed-to-seed spread of that difference is usually far smaller than the
spread of either run. Everything here works on those per-seed differences:

- ``mean_ci95``: mean and the half-width of the two-sided 95 % Student-t interval, mean ± t(0.975, n-1) s / √n.
  A run is called better or worse only when this interval excludes zero (the paired t-test at alpha 0.05).
- ``sign_flip_p_value``: the exact two-sided sign-flip permutation test of the mean difference. Under the null
  hypothesis the run and the reference are exchangeable within a seed, so each difference is as likely to carry
  either sign; the p-value is the share of the 2^n sign patterns whose |sum| reaches the observed one. It needs
  no normality (which three seeds cannot check), keeps the magnitudes that Wilcoxon's signed-rank test reduces to
  ranks, and handles zero and tied differences (two runs often score the same on a seed) without the correction
  the signed-rank test needs. Its price: the smallest p it can give is 2 / 2^n, so below 6 seeds it can never
  reach 0.05, whatever the difference.
- ``detectable_difference`` and ``seeds_needed``: the smallest true mean difference a paired t-test at alpha
  0.05 detects with power 0.8 at n seeds, and the fewest seeds that detect a given one, from the t-test's exact
  power (noncentral t, noncentrality d · √n / s), taking the observed SD of the differences s as the true one
  (a planning figure: with few seeds s itself is uncertain).
- ``accuracy_se``, ``paired_accuracy_se`` and ``resolution``: the held-out set's own sampling error, for
  telling apart a difference between two models from one between two draws of the held-out examples.

No Flower, no plotting: the report imports this, and the tests check it against brute force and SciPy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.8
# 2^20 sign patterns are enumerated exactly (in blocks of 2^16); more seeds than this use a Monte Carlo estimate.
EXACT_MAX_SEEDS = 20
_BLOCK_BITS = 16
MONTE_CARLO_PATTERNS = 2**16
# seeds_needed gives up beyond this many seeds: a difference that needs more is not worth running for.
MOST_SEEDS = 100_000
Z_975 = float(stats.norm.ppf(0.975))

BETTER, WORSE, NOT_SHOWN = "better", "worse", "no difference shown"
ONE_SEED, IDENTICAL = "one seed: no interval", "identical on every seed"
UNDER_ONE_EXAMPLE = "under one held-out example"
WITHIN_NOISE = "within held-out noise"
BEYOND_NOISE = "beyond held-out noise"


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% Student-t confidence interval (nan for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(half)


def _sign_patterns(bits: int) -> np.ndarray:
    """Every vector of ``bits`` signs (+1 / -1), one per row: 2^bits rows."""
    return 1.0 - 2.0 * ((np.arange(2**bits)[:, None] >> np.arange(bits)) & 1)


def sign_flip_p_value(differences: Sequence[float], max_exact: int = EXACT_MAX_SEEDS) -> tuple[float, bool]:
    """Two-sided p-value of the sign-flip permutation test of mean zero, and whether it is exact.

    Exact (all 2^n sign patterns) up to ``max_exact`` differences; beyond, the share of
    ``MONTE_CARLO_PATTERNS`` random patterns from a fixed generator, counted as (hits + 1) / (patterns + 1) so
    that it is still a valid p-value.
    """
    values = np.asarray(differences, dtype=float)
    observed = abs(values.sum())
    # Sums equal to the observed one but for rounding must count as reaching it (the mirror pattern always does).
    reach = observed - 1e-9 * max(1.0, float(np.abs(values).sum()))
    if values.size <= max_exact:
        block = min(values.size, _BLOCK_BITS)
        low = _sign_patterns(block) @ values[:block]
        rest = values.size - block
        high = _sign_patterns(rest) @ values[block:] if rest else np.zeros(1)
        hits = sum(int(np.count_nonzero(np.abs(low + offset) >= reach)) for offset in high)
        return hits / 2**values.size, True
    signs = np.random.default_rng(0).choice((-1.0, 1.0), size=(MONTE_CARLO_PATTERNS, values.size))
    hits = int(np.count_nonzero(np.abs(signs @ values) >= reach))
    return (hits + 1) / (MONTE_CARLO_PATTERNS + 1), False


def smallest_p_value(seeds: int) -> float:
    """The smallest p the exact sign-flip test can give on ``seeds`` non-zero differences: 2 / 2^n."""
    return min(1.0, 2.0 / 2**seeds)


def t_test_power(difference: float, sd: float, seeds: int, alpha: float = ALPHA) -> float:
    """Probability that a two-sided paired t-test at ``alpha`` over ``seeds`` seeds rejects "no difference" when
    the true mean difference is ``difference`` and the differences' SD is ``sd``: the test statistic follows a
    noncentral t with n - 1 degrees of freedom and noncentrality difference · √n / sd."""
    df, critical = seeds - 1, stats.t.ppf(1 - alpha / 2, seeds - 1)
    noncentrality = difference * math.sqrt(seeds) / sd
    # The lower tail as the upper tail of the mirrored distribution: SciPy's cdf far below a large
    # noncentrality returns nan where this returns the (negligible) probability.
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality))


def detectable_difference(sd: float, seeds: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a paired t-test at ``alpha`` detects with probability ``power`` over
    ``seeds`` seeds whose differences have standard deviation ``sd`` (nan below 2 seeds: no spread to use).

    Solved exactly on the noncentral t (as G*Power does). The textbook shortcut (t(1 - alpha/2, n-1) +
    t(power, n-1)) · sd / √n is a little smaller at few seeds: at 3 seeds it has only 0.77 power, not 0.8.
    """
    if seeds < 2:
        return math.nan
    if sd == 0:
        return 0.0
    # Half the shortcut's difference has far less power than asked for, twice it far more: a bracket.
    shortcut = (stats.t.ppf(1 - alpha / 2, seeds - 1) + stats.t.ppf(power, seeds - 1)) * sd / math.sqrt(seeds)
    return float(
        optimize.brentq(lambda d: t_test_power(d, sd, seeds, alpha) - power, shortcut / 2, 2 * shortcut, xtol=1e-12)
    )


def seeds_needed(difference: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest seeds (at least 2) at which a paired t-test detects ``difference`` with probability ``power``;
    None beyond ``MOST_SEEDS``."""
    if not difference > 0:
        raise ValueError(f"difference must be positive, got {difference}")
    if sd == 0:
        return 2
    # A z-test that knew the SD would need ((z(1 - alpha/2) + z(power)) · sd / difference)^2 seeds and the t-test
    # needs more: start there. Power only grows with n, so the first n that reaches it is the answer.
    known_sd = ((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd / difference) ** 2
    for seeds in range(max(2, math.floor(known_sd)), MOST_SEEDS + 1):
        if t_test_power(difference, sd, seeds, alpha) >= power:
            return seeds
    return None


def accuracy_se(accuracy: float, examples: int) -> float:
    """Binomial standard error of an accuracy measured on ``examples`` held-out examples: √(p(1-p)/N)."""
    return math.sqrt(accuracy * (1 - accuracy) / examples)


def paired_accuracy_se(accuracy_a: float, accuracy_b: float, examples: int) -> float:
    """Upper bound on the standard error of the difference of two accuracies scored on the SAME examples.

    Per example the difference d_i = x_a,i - x_b,i is -1, 0 or 1, and Var(d_i) = P(the two disagree) - (p_a -
    p_b)^2. Which examples each model gets right is not logged, so the disagreement is bounded by the marginals
    alone (Fréchet): at most min(p_a + p_b, 2 - p_a - p_b), reached when the two models are right on as few
    common examples as their accuracies allow. The bound holds as well for means of accuracies over rounds on the
    same examples (last-k mean, area under the curve), whose per-example terms lie in [0, 1]. Two models trained
    from one base on one data set usually agree far more, so their true SE is smaller: with per-example
    predictions, McNemar's test would resolve smaller differences. The common √2 · SE assumes independent
    models, which is no bound: negatively correlated errors make the difference noisier.
    """
    disagreement = min(accuracy_a + accuracy_b, 2 - accuracy_a - accuracy_b)
    return math.sqrt(max(disagreement - (accuracy_a - accuracy_b) ** 2, 0.0) / examples)


@dataclass(frozen=True)
class Resolution:
    """How a difference of accuracies compares with what ``examples`` held-out examples can resolve."""

    examples: int
    in_examples: float  # |difference| x examples: how many held-out examples the difference amounts to
    noise: float  # 1.96 x the bound on the difference's standard error
    label: str


def resolution(difference: float, accuracy_a: float, accuracy_b: float, examples: int) -> Resolution:
    """Label a difference ``UNDER_ONE_EXAMPLE`` (below 1/N), ``WITHIN_NOISE`` (below 1.96 x
    ``paired_accuracy_se``) or ``BEYOND_NOISE``. One seed's held-out set is the yardstick, never n of them: with
    a hub task every seed scores the same held-out examples, and their noise does not average out over seeds."""
    noise = Z_975 * paired_accuracy_se(accuracy_a, accuracy_b, examples)
    size = abs(difference) * examples
    # A difference of exactly one example, computed in floating point, must not fall just below 1.
    label = UNDER_ONE_EXAMPLE if size < 1 - 1e-9 else WITHIN_NOISE if abs(difference) < noise else BEYOND_NOISE
    return Resolution(examples, size, noise, label)


@dataclass(frozen=True)
class PairedDifference:
    """One run against the reference on one metric: the per-seed differences (run - reference) and their
    summary."""

    differences: tuple[float, ...]
    mean: float
    half_width: float  # of the 95% Student-t interval; nan for one seed
    sd: float  # sample SD of the differences; nan for one seed
    p_value: float  # sign-flip test
    exact: bool  # whether p_value enumerated every sign pattern

    @property
    def seeds(self) -> int:
        return len(self.differences)

    @property
    def has_spread(self) -> bool:
        """Whether the differences vary from seed to seed: one seed cannot, and equal differences on every seed
        give the planning figures nothing to work with (any difference would "need" 2 seeds)."""
        return self.seeds > 1 and self.sd > 0

    @property
    def verdict(self) -> str:
        """Better or worse only when the 95% interval excludes zero."""
        if not any(self.differences):
            return IDENTICAL
        if math.isnan(self.half_width):
            return ONE_SEED
        if self.mean - self.half_width > 0:
            return BETTER
        if self.mean + self.half_width < 0:
            return WORSE
        return NOT_SHOWN


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> PairedDifference:
    """Compare a run's per-seed ``values`` with the reference's on the same seeds, in the same order."""
    if len(values) != len(reference) or not values:
        raise ValueError(f"need one value per seed on both sides, got {len(values)} and {len(reference)}")
    differences = tuple(value - base for value, base in zip(values, reference, strict=True))
    mean, half = mean_ci95(differences)
    sd = statistics.stdev(differences) if len(differences) > 1 else math.nan
    p_value, exact = sign_flip_p_value(differences)
    return PairedDifference(differences, mean, half, sd, p_value, exact)
