"""Epsilon of a DP-SGD-style history: (noise multiplier, sample rate, steps) entries of the Poisson-sampled
Gaussian mechanism, composed over every entry and never per round.

Two Opacus accountants are supported, and both give upper bounds on epsilon:

- ``"rdp"`` (default): Renyi DP over ``RDP_ORDERS``; fast, and typically 10-30 % above the exact epsilon
  at epsilon 1-10 (relatively more at a small epsilon). The sampled Gaussian mechanism's RDP is computed
  here for all orders at once (``rdp_per_step``; Opacus sums term by term in Python), and kept per (noise
  multiplier, sample rate): RDP adds up over steps, so an epsilon after any number of rounds costs one
  conversion, never a recomposition of the history.
- ``"prv"``: numerical composition of privacy loss random variables (Gopi et al. 2021); close to exact. Its
  discretisation error is chosen per history (``_prv_eps_error``): the bound stays within about 0.5 % of the
  exact epsilon (a little more for a small epsilon after many steps) and its FFT grid stays small. Opacus's
  PRV parts compose the history; the grid's extent comes from ``rdp_per_step`` (Opacus sizes it with its
  term-by-term RDP, most of a PRV epsilon's cost).

Opacus's ``"gdp"`` accountant is refused (``fedsvd.privacy.accountants``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy import special

from fedsvd.privacy.accountants import ACCOUNTANTS, PrivacyConfigError, check_accountant

# RDP orders to optimise over: Opacus's defaults stop at 63, which is too low at the small noise multipliers
# that a generous epsilon calibrates to (the bound then is valid but loose, and Opacus warns). The extra
# orders are the ones Google's dp-accounting also uses.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
# Opacus's RDP orders, the first ones of RDP_ORDERS: its PRV accountant sizes its grid with an RDP epsilon at
# these, and the same grid gives the same PRV epsilon.
_OPACUS_ORDERS = RDPAccountant.DEFAULT_ALPHAS

# A fractional order's series is summed until its terms fall below exp(-30), as Mironov et al. (2019) and
# Opacus do; its first block of terms has this many (the next ones twice as many as the one before).
_SERIES_BLOCK = 64
_SERIES_CUTOFF = -30.0

# PRV discretisation error, eps_error = max(PRV_RELATIVE_EPS_ERROR * RDP epsilon, PRV_EPS_ERROR_PER_ROOT_STEP *
# sqrt(steps)); PRV's answer is its upper bound, which lies about eps_error above the exact epsilon. The RDP
# epsilon of the same history is a cheap upper bound on the exact one, so the first term keeps the bound within
# about 0.1-0.5 % of exact. Opacus's grid has about 30 * sqrt(steps) / eps_error points, so the second term
# caps it near 600k points (a few 100 ms); it only binds for a small epsilon after many steps (e.g. 0.2 after
# 1000 steps: 0.8 %). Opacus's fixed default (0.01) is 30 % of a small epsilon and needlessly fine at a large one.
PRV_RELATIVE_EPS_ERROR = 1e-3
PRV_EPS_ERROR_PER_ROOT_STEP = 5e-5

# One accountant entry: (noise multiplier, sample rate, steps), exactly as Opacus stores its history.
PrivacyEvent = tuple[float, float, int]


def epsilon_of(history: Iterable[PrivacyEvent], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of a (possibly heterogeneous) DP-SGD history under the named accountant.

    0 for a history without steps (Opacus's PRV accountant raises on one).
    """
    check_accountant(accountant)
    return _epsilon(tuple(_merged(history)), delta, accountant)


def epsilon_by_accountant(history: Iterable[PrivacyEvent], delta: float) -> dict[str, float]:
    """Epsilon at ``delta`` of one history under every supported accountant: ``{"rdp": ..., "prv": ...}``.

    Both are upper bounds on the same guarantee; PRV is the tighter one.
    """
    events = tuple(_merged(history))
    return {accountant: _epsilon(events, delta, accountant) for accountant in ACCOUNTANTS}


# Every round the server asks for every client's epsilon, and most histories have not changed since the last.
@functools.lru_cache(maxsize=4096)
def _epsilon(events: tuple[PrivacyEvent, ...], delta: float, accountant: str) -> float:
    if not events:
        return 0.0
    rdp_epsilon = _rdp_epsilon(events, delta)
    if accountant == "rdp":
        return rdp_epsilon
    return _prv_epsilon(list(events), delta, _prv_eps_error(rdp_epsilon, events))


def _merged(history: Iterable[PrivacyEvent]) -> list[PrivacyEvent]:
    """The history with steps of equal (sigma, q) added up and step-free entries dropped.

    Composition is commutative, so this changes no epsilon, but the accountants' cost grows with the number
    of entries (not with the steps in one entry), and a history restored over many rounds can be fragmented.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in history:
        if count > 0 and rate > 0:
            key = (float(sigma), float(rate))
            steps[key] = steps.get(key, 0) + int(count)
    return [(sigma, rate, count) for (sigma, rate), count in steps.items()]


def _rdp_epsilon(events: Iterable[PrivacyEvent], delta: float) -> float:
    """RDP epsilon of a merged history: per-step RDP times steps, summed, converted at the best order (the
    same sum and conversion as Opacus's RDP accountant)."""
    rdp = sum(rdp_per_step(sigma, rate) * steps for sigma, rate, steps in events)
    epsilon, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return max(0.0, float(epsilon))


@functools.lru_cache(maxsize=4096)
def rdp_per_step(sigma: float, sample_rate: float) -> np.ndarray:
    """RDP of one step of the Poisson-sampled Gaussian mechanism at every order of ``RDP_ORDERS`` (read-only).

    The formulas are those of Mironov, Talwar & Zhang (2019), section 3.3, as in Opacus and dp-accounting:
    a binomial sum for integer orders, two series with erfc weights for fractional ones. Each is evaluated for
    all its orders at once, as one array of (order, term): a calibration evaluates this a few dozen times.
    """
    if sample_rate == 0:
        rdp = np.zeros(len(RDP_ORDERS))
    elif sigma == 0:
        rdp = np.full(len(RDP_ORDERS), np.inf)
    elif sample_rate == 1:
        rdp = _ORDERS / (2 * sigma**2)
    else:
        log_a = np.empty(len(RDP_ORDERS))
        log_a[_INTEGER] = _log_a_integer(sample_rate, sigma, _ORDERS[_INTEGER])
        log_a[~_INTEGER] = _log_a_fractional(sample_rate, sigma, _ORDERS[~_INTEGER])
        rdp = log_a / (_ORDERS - 1)
    rdp.setflags(write=False)
    return rdp


_ORDERS = np.asarray(RDP_ORDERS, dtype=float)
_INTEGER = np.equal(np.round(_ORDERS), _ORDERS)


def _log_a_integer(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """log A_alpha for integer orders alpha (0 < q < 1): log of sum_i binom(alpha, i) q^i (1 - q)^(alpha - i)
    exp((i^2 - i) / (2 sigma^2)), one row per order."""
    log_binomial = _integer_log_binomials()
    i = np.arange(log_binomial.shape[1], dtype=float)
    alpha = orders[:, None]
    terms = log_binomial + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
    return _signed_log_sum_exp(terms, np.ones_like(terms))


@functools.cache
def _integer_log_binomials() -> np.ndarray:
    """log binom(alpha, i) for every integer order alpha (rows) and i up to the largest order, -inf past alpha."""
    alpha = _ORDERS[_INTEGER][:, None]
    i = np.arange(int(alpha.max()) + 1, dtype=float)[None, :]
    with np.errstate(invalid="ignore"):  # gammaln of a negative integer past alpha; masked out
        log_binomial = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
    log_binomial = np.where(i <= alpha, log_binomial, -np.inf)
    log_binomial.setflags(write=False)
    return log_binomial


def _log_a_fractional(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """log A_alpha for fractional orders (0 < q < 1): two series with signed binomial coefficients, each summed
    until its terms fall below exp(_SERIES_CUTOFF), the first such term included (as Opacus does). The terms
    come in blocks, each twice as long as the one before, for the orders whose series is still open (at a large
    q and a small sigma the low orders need thousands of terms, the high ones a few dozen), and are summed as
    they come."""
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    sums = [_RunningLogSum(len(orders)), _RunningLogSum(len(orders))]
    rows = np.arange(len(orders))  # the orders whose series is still open
    start, length = 0, _SERIES_BLOCK
    while rows.size:
        alpha = orders[rows, None]
        position = np.arange(length)[None, :]
        i = (start + position).astype(float)
        j = alpha - i
        sign, log_coefficient = (array[rows] for array in _fractional_log_binomials(start, length))
        log_s0 = (
            log_coefficient + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
            + special.log_ndtr((z0 - i) / sigma)
        )  # fmt: skip
        log_s1 = (
            log_coefficient + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
            + special.log_ndtr((j - z0) / sigma)
        )  # fmt: skip
        small = np.maximum(log_s0, log_s1) < _SERIES_CUTOFF
        ends_here = small.any(axis=1)
        last = np.where(ends_here, small.argmax(axis=1), length)  # the first small term is the series' last
        kept = position <= last[:, None]
        for running, log_terms in zip(sums, (log_s0, log_s1), strict=True):
            running.add(rows, np.where(kept, log_terms, -np.inf), sign)
        rows = rows[~ends_here]
        start, length = start + length, 2 * length
    return np.logaddexp(sums[0].value(), sums[1].value())


class _RunningLogSum:
    """Per row, log(sum(signs * exp(terms))) over blocks of terms added as they come, without overflow: the sum
    is kept relative to the largest term so far and rescaled when a larger one arrives."""

    def __init__(self, rows: int) -> None:
        self.peak = np.full(rows, -np.inf)
        self.scaled = np.zeros(rows)

    def add(self, rows: np.ndarray, log_terms: np.ndarray, signs: np.ndarray) -> None:
        peak = np.maximum(self.peak[rows], log_terms.max(axis=1))
        rescale = np.exp(self.peak[rows] - peak)
        self.scaled[rows] = self.scaled[rows] * rescale + np.sum(signs * np.exp(log_terms - peak[:, None]), axis=1)
        self.peak[rows] = peak

    def value(self) -> np.ndarray:
        return self.peak + np.log(self.scaled)


@functools.cache
def _fractional_log_binomials(start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Sign and log |binom(alpha, i)| for every fractional order alpha (rows) and the ``length`` terms i from
    ``start``; they depend on neither q nor sigma."""
    alpha = _ORDERS[~_INTEGER][:, None]
    coefficient = special.binom(alpha, np.arange(start, start + length, dtype=float)[None, :])
    with np.errstate(divide="ignore"):  # a coefficient that underflows to 0 is a term of exp(-inf)
        log_coefficient = np.log(np.abs(coefficient))
    sign = np.sign(coefficient)
    for array in (sign, log_coefficient):
        array.setflags(write=False)
    return sign, log_coefficient


def _signed_log_sum_exp(log_terms: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Row by row, log(sum(signs * exp(log_terms))) for positive sums, without overflow."""
    peak = log_terms.max(axis=1, keepdims=True)
    return peak[:, 0] + np.log(np.sum(signs * np.exp(log_terms - peak), axis=1))


def _prv_epsilon(events: list[PrivacyEvent], delta: float, eps_error: float) -> float:
    """Opacus's PRV upper bound on epsilon (``PRVAccountant.get_epsilon`` with this ``eps_error`` and its default
    ``delta_error``), from Opacus's own PRV parts, with the grid's half-width sized by ``_prv_domain_half_width``."""
    delta_error = delta / 1000
    steps = [count for _, _, count in events]
    half_width = _prv_domain_half_width(events, eps_error, delta_error)
    mesh = eps_error / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    with warnings.catch_warnings():
        # At sample rate 1 (client-level rounds without amplification) Opacus's PRV evaluates log(1 - q) = -inf
        # in the branch of an np.where it then discards: the result is right, the warning only noise.
        warnings.filterwarnings("ignore", "divide by zero encountered in log", RuntimeWarning)
        discrete = [
            discretize(
                TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(rate, sigma), domain.t_min, domain.t_max),
                domain,
            )
            for sigma, rate, _ in events
        ]
        composed = compose_heterogeneous(dprvs=discrete, num_self_compositions=steps)
        _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return max(0.0, float(upper))


def _prv_domain_half_width(events: list[PrivacyEvent], eps_error: float, delta_error: float) -> float:
    """The half-width of the privacy-loss grid, as Opacus's ``compute_safe_domain_size`` sizes it: the larger of
    the whole history's RDP epsilon at delta_error / 4 and each single step's at delta_error / (8 * steps), plus
    3. Opacus computes both with its term-by-term RDP, which took over 90 % of a PRV epsilon at a large sample
    rate (1.7 s of 1.8 s at q = 0.36); here they come from ``rdp_per_step`` at Opacus's own orders."""
    total_steps = sum(count for _, _, count in events)
    orders = len(_OPACUS_ORDERS)
    whole = sum(rdp_per_step(sigma, rate)[:orders] * count for sigma, rate, count in events)
    widest, _ = get_privacy_spent(orders=_OPACUS_ORDERS, rdp=whole, delta=delta_error / 4)
    for sigma, rate, _ in events:
        step, _ = get_privacy_spent(
            orders=_OPACUS_ORDERS, rdp=rdp_per_step(sigma, rate)[:orders], delta=delta_error / (8 * total_steps)
        )
        widest = max(widest, step)
    return max(float(widest), eps_error) + 3


def _prv_eps_error(rdp_epsilon: float, events: Iterable[PrivacyEvent]) -> float:
    """PRV's ``eps_error`` for a history, given its RDP epsilon (see ``PRV_RELATIVE_EPS_ERROR``)."""
    if not math.isfinite(rdp_epsilon):
        raise PrivacyConfigError("the RDP epsilon of this history is infinite; PRV cannot size its grid")
    steps = sum(count for _, _, count in events)
    return max(PRV_RELATIVE_EPS_ERROR * rdp_epsilon, PRV_EPS_ERROR_PER_ROOT_STEP * math.sqrt(steps))
