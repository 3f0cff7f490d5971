"""Per-client privacy accounting for DP-SGD.

A client's privacy spend accumulates over every round in which it actually trains, so the accountant's
history (noise multiplier, sample rate, steps) is the state that must survive rounds and restarts.
``PrivacyLedger`` is that state in a form that can be stored in Flower's ``context.state`` or a file and
fed back into an Opacus accountant; epsilon is always computed from the whole history, never per round.

Two Opacus accountants are supported, and both give upper bounds on epsilon:

- ``"rdp"`` (default): Renyi DP over ``RDP_ORDERS``; fast, and typically 10-30 % above the exact epsilon
  at epsilon 1-10 (relatively more at a small epsilon). The sampled Gaussian mechanism's RDP is computed
  here, vectorised over each order's series (``rdp_per_step``; Opacus sums term by term in Python, 0.3 s per
  evaluation), and kept per (noise multiplier, sample rate): RDP adds up over steps, so a client's epsilon
  after any number of rounds costs one conversion, never a recomposition of its history.
- ``"prv"``: numerical composition of privacy loss random variables (Gopi et al. 2021); close to exact. Its
  discretisation error is chosen per history (``_prv_options``): the bound stays within about 0.5 % of the
  exact epsilon (a little more for a small epsilon after many steps) and its FFT grid stays small.

Opacus's ``"gdp"`` accountant is refused: it is a central-limit approximation, not a bound, and under-reports
epsilon at the small sample rates of DP-SGD.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy import special

# RDP orders to optimise over: Opacus's defaults stop at 63, which is too low at the small noise multipliers
# that a generous epsilon calibrates to (the bound then is valid but loose, and Opacus warns). The extra
# orders are the ones Google's dp-accounting also uses.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
# A fractional order's series is summed until its terms fall below exp(-30), as Mironov et al. (2019) and
# Opacus do; its first block of terms has this many (the next ones twice as many as the one before).
_SERIES_BLOCK = 64
_SERIES_CUTOFF = -30.0

# The accountants this module computes with (fedsvd.config.ACCOUNTANTS lists the same names), and the ones it
# refuses, with the reason.
ACCOUNTANTS = ("rdp", "prv")
REFUSED_ACCOUNTANTS = {
    "gdp": "Opacus's GDP accountant is a CLT approximation that under-reports epsilon at small sample rates; "
    "use 'rdp' or 'prv'",
}

# PRV discretisation error, eps_error = max(PRV_RELATIVE_EPS_ERROR * RDP epsilon, PRV_EPS_ERROR_PER_ROOT_STEP *
# sqrt(steps)); PRV's answer is its upper bound, which lies about eps_error above the exact epsilon. The RDP
# epsilon of the same history is a cheap upper bound on the exact one, so the first term keeps the bound within
# about 0.1-0.5 % of exact. Opacus's grid has about 30 * sqrt(steps) / eps_error points, so the second term
# caps it near 600k points (a few 100 ms); it only binds for a small epsilon after many steps (e.g. 0.2 after
# 1000 steps: 0.8 %). Opacus's fixed default (0.01) is 30 % of a small epsilon and needlessly fine at a large one.
PRV_RELATIVE_EPS_ERROR = 1e-3
PRV_EPS_ERROR_PER_ROOT_STEP = 5e-5

# Calibration gives up beyond this noise multiplier (the target epsilon is then unreachably small).
MAX_NOISE_MULTIPLIER = 1e6
# ... and below this one: a target epsilon that needs less noise is refused, not run as "DP". At noise multiplier
# sigma one DP-SGD step on a sampled record is (1 / sigma)-GDP (Dong, Roth & Su 2019), and their trade-off curves
# show mu = 6 as already close to no privacy; at sigma = 0.1 (mu = 10) a membership test with a false-positive rate
# of 1e-6 finds the record with probability Phi(10 - 4.75) > 0.9999999 in every step that samples it. The noise
# is then under a tenth of the clip norm: what such an epsilon certifies is DP on paper only. The floor sits
# well below what the targets of practice calibrate to (the defaults give 0.46-0.74; epsilon 50 still gives 0.15
# for a single full-batch step), so it refuses targets like epsilon = 1e6, whose noise would print as 0.00.
MIN_NOISE_MULTIPLIER = 0.1

# One accountant entry: (noise multiplier, sample rate, steps), exactly as Opacus stores its history.
PrivacyEvent = tuple[float, float, int]


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot give the promised guarantee; the message names the client."""


def check_delta(delta: float, num_examples: int, client: str) -> None:
    """Refuse a delta that is not below 1 / n: such a delta allows leaking one whole record outright."""
    if num_examples <= 0:
        raise PrivacyConfigError(f"{client} has no training examples")
    if delta >= 1.0 / num_examples:
        raise PrivacyConfigError(
            f"delta = {delta:g} must be below 1 / n_k = {1.0 / num_examples:.3g} for {client} "
            f"(n_k = {num_examples}); lower delta"
        )


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate q = expected batch / n, from the client's real number of examples."""
    return min(1.0, batch_size / num_examples)


def check_batch_size(batch_size: int, num_examples: int, client: str) -> None:
    """Refuse an expected batch above a client's examples: its sample rate would be cut to 1, so that client
    trains on full batches, not on the batch size the config states and the privacy plan is read for."""
    if batch_size > num_examples:
        raise PrivacyConfigError(
            f"batch_size = {batch_size} is not allowed: must be <= {num_examples}, the training examples of {client} "
            "(the smallest client); a larger expected batch needs a sample rate batch_size / n_k above 1"
        )


@functools.lru_cache(maxsize=256)  # a numerical search; every method of a comparison asks for the same plans
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier with which ``steps`` DP-SGD steps at ``sample_rate`` spend ``target_epsilon``.

    Called once per client with the planned total number of local steps; the result stays fixed for the
    whole run so that the accountant's history stays comparable across rounds. The spent epsilon, as
    ``epsilon_of`` reports it, is at most the target and within 0.5 % (at most 0.005) of it.
    """
    check_accountant(accountant)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyConfigError(f"epsilon = {target_epsilon!r} is not allowed: must be a finite number > 0")
    tolerance = min(0.005, 0.005 * target_epsilon)

    def spent_rdp(sigma: float) -> float:
        return _trial_epsilon(sigma, sample_rate, steps, delta, "rdp")

    # For PRV the RDP answer is only the start of the search: a coarse one will do.
    rdp_tolerance = tolerance if accountant == "rdp" else 0.02 * target_epsilon
    sigma_rdp = _solve_noise_multiplier(spent_rdp, target_epsilon, rdp_tolerance, start=1.0, factor=2.0)
    if accountant == "rdp":
        return sigma_rdp

    # PRV is tighter than RDP, so it needs less noise: search downwards from the RDP answer, which keeps every
    # evaluation near the target (far-off noise multipliers make large PRV grids).
    def spent(sigma: float) -> float:
        return _trial_epsilon(sigma, sample_rate, steps, delta, accountant)

    return _solve_noise_multiplier(spent, target_epsilon, tolerance, start=sigma_rdp, factor=1.25)


def _trial_epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon at one noise multiplier the calibration tries. Its bracketing tries sigmas far from the answer on
    purpose, where Opacus warns that the optimal RDP order lies at the end of the orders: the bound there is only
    looser (the answer, if anything, more noisy), and the warnings would bury the command's own output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return epsilon_of([(sigma, sample_rate, steps)], delta, accountant)


def _solve_noise_multiplier(
    spent: Callable[[float], float],
    target: float,
    tolerance: float,
    start: float,
    factor: float,
    max_evaluations: int = 60,
) -> float:
    """The noise multiplier sigma with ``target - tolerance <= spent(sigma) <= target``, for a ``spent`` that
    falls with sigma. Bracket from ``start`` in steps of ``factor`` (> 1) within [MIN_NOISE_MULTIPLIER,
    MAX_NOISE_MULTIPLIER], then the Illinois variant of regula falsi on (log sigma, log epsilon), which needs a
    handful of evaluations where bisection needs 15-20.

    Always returns a sigma with ``spent(sigma) <= target``; only its tightness depends on convergence. Every loop
    is bounded: a target that needs a sigma outside the range is a PrivacyConfigError.
    """
    hi, e_hi = start, spent(start)
    while e_hi > target:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise PrivacyConfigError(
                f"epsilon = {target:g} is too small to reach with any noise multiplier up to "
                f"{MAX_NOISE_MULTIPLIER:g}; raise epsilon (or delta, or lower rounds or local_steps)"
            )
        hi = min(hi * factor, MAX_NOISE_MULTIPLIER)
        e_hi = spent(hi)
    lo, e_lo = hi, e_hi
    while e_lo <= target:
        if target - e_lo <= tolerance:
            return lo
        if lo <= MIN_NOISE_MULTIPLIER:
            raise PrivacyConfigError(
                f"epsilon = {target:g} is not allowed: it needs a noise multiplier below {MIN_NOISE_MULTIPLIER:g}, "
                "noise too weak to protect anything; lower epsilon, or set dp = false for a non-private run"
            )
        hi, e_hi = lo, e_lo
        lo = max(lo / factor, MIN_NOISE_MULTIPLIER)
        e_lo = spent(lo)

    def gap(eps: float) -> float:
        return math.log(max(eps, 1e-300)) - math.log(target)

    x_lo, f_lo, x_hi, f_hi = math.log(lo), gap(e_lo), math.log(hi), gap(e_hi)
    side = 0  # which end moved last: Illinois halves the other end's gap when the same end moves twice
    for _ in range(max_evaluations):
        if target - e_hi <= tolerance:
            break
        x = (x_lo * f_hi - x_hi * f_lo) / (f_hi - f_lo)
        if not x_lo < x < x_hi:
            x = (x_lo + x_hi) / 2
        sigma = math.exp(x)
        eps = spent(sigma)
        if eps > target:
            x_lo, f_lo = x, gap(eps)
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            x_hi, f_hi, e_hi, hi = x, gap(eps), eps, sigma
            if side == 1:
                f_lo /= 2
            side = 1
    return hi


def check_accountant(accountant: str) -> None:
    """Refuse an accountant this module does not compute with; for ``"gdp"`` say why."""
    if accountant in REFUSED_ACCOUNTANTS:
        raise PrivacyConfigError(f"accountant = {accountant!r} is not allowed: {REFUSED_ACCOUNTANTS[accountant]}")
    if accountant not in ACCOUNTANTS:
        allowed = ", ".join(ACCOUNTANTS)
        raise PrivacyConfigError(f"accountant = {accountant!r} is not allowed: must be one of: {allowed}")


@dataclass
class PrivacyLedger:
    """The complete DP-SGD history of one client under one accountant, and the rounds it was spent in."""

    accountant: str
    history: list[PrivacyEvent] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon over every recorded step (0 before the first step)."""
        return epsilon_of(self.history, delta, self.accountant)

    def new_accountant(self) -> IAccountant:
        """An Opacus accountant that continues this history; hand it back with ``record``."""
        check_accountant(self.accountant)
        accountant = create_accountant(self.accountant)
        accountant.history = list(self.history)
        return accountant

    def record(self, accountant: IAccountant, server_round: int | None = None) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in accountant.history]
        if server_round is not None:
            self.rounds.append(server_round)

    def to_record(self) -> dict[str, list[float] | list[int] | str]:
        """Flat lists, the shape Flower's ConfigRecord and JSON both store."""
        return {
            "accountant": self.accountant,
            "noise_multiplier": [s for s, _, _ in self.history],
            "sample_rate": [q for _, q, _ in self.history],
            "steps": [n for _, _, n in self.history],
            "rounds": list(self.rounds),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> PrivacyLedger:
        sigmas, rates, steps = (list(record[key]) for key in ("noise_multiplier", "sample_rate", "steps"))  # type: ignore[call-overload]
        if not len(sigmas) == len(rates) == len(steps):
            raise ValueError("privacy record has lists of different lengths")
        events = zip(map(float, sigmas), map(float, rates), map(int, steps), strict=True)
        rounds = [int(r) for r in record.get("rounds", [])]  # type: ignore[attr-defined]
        return cls(str(record["accountant"]), list(events), rounds)


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
    return _opacus_epsilon(list(events), delta, accountant, **_prv_options(rdp_epsilon, events))


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


def _opacus_epsilon(events: list[PrivacyEvent], delta: float, accountant: str, **options: object) -> float:
    opacus_accountant = create_accountant(accountant)
    opacus_accountant.history = list(events)
    return max(0.0, float(opacus_accountant.get_epsilon(delta=delta, **options)))


def _prv_options(rdp_epsilon: float, events: Iterable[PrivacyEvent]) -> dict[str, float]:
    """Keyword options for Opacus's PRV ``get_epsilon``, given the history and its RDP epsilon: ``eps_error``
    (see ``PRV_RELATIVE_EPS_ERROR``); its ``delta_error`` keeps Opacus's default, delta / 1000."""
    if not math.isfinite(rdp_epsilon):
        raise PrivacyConfigError("the RDP epsilon of this history is infinite; PRV cannot size its grid")
    steps = sum(count for _, _, count in events)
    return {"eps_error": max(PRV_RELATIVE_EPS_ERROR * rdp_epsilon, PRV_EPS_ERROR_PER_ROOT_STEP * math.sqrt(steps))}


GUARANTEE = (
    "Record-level (epsilon, delta)-DP for each client's local training data, with respect to adding or removing "
    "one record, from DP-SGD with Poisson sampling, per-sample clipping and Gaussian noise; epsilon composes over "
    "every round in which the client trained. Not covered: the server's evaluation data, hyper-parameter search "
    "across runs, and the use of a non-cryptographic random number generator for the noise."
)


@dataclass
class ServerPrivacyLedger:
    """The server's own account of every client's spend, built from what it asked each client to run.

    It does not trust the clients' reports: each round it recomputes a client's cumulative epsilon from its
    planned noise multiplier and sample rate and the steps of every round it trained, and a report that
    disagrees by more than ``tolerance`` (relative) marks the update as not to be aggregated.
    """

    accountant: str
    delta: float
    steps_per_round: int
    plans: dict[int, tuple[float, float]]  # partition -> (noise multiplier, sample rate)
    tolerance: float = 1e-3
    rounds: dict[int, list[int]] = field(default_factory=dict)

    def history(self, partition: int) -> list[PrivacyEvent]:
        sigma, rate = self.plans[partition]
        return [(sigma, rate, self.steps_per_round)] * len(self.rounds.get(partition, []))

    def epsilon(self, partition: int) -> float:
        return epsilon_of(self.history(partition), self.delta, self.accountant)

    def record_training(self, partition: int, server_round: int) -> None:
        """A client was instructed to train in this round: it has spent the round, whether or not its reply
        arrives or is aggregated. Recording a round twice counts it once: a round re-run after a resume sends the
        same arrays and the same noise seed, so the client releases the very same output again."""
        rounds = self.rounds.setdefault(partition, [])
        if server_round not in rounds:
            rounds.append(server_round)
            rounds.sort()

    def can_train(self, partition: int, target_epsilon: float) -> bool:
        """Whether one more round keeps this client at or below its target epsilon."""
        sigma, rate = self.plans[partition]
        next_round = [*self.history(partition), (sigma, rate, self.steps_per_round)]
        return epsilon_of(next_round, self.delta, self.accountant) <= target_epsilon

    def mismatch(self, partition: int, reported_epsilon: float) -> str | None:
        """Why the client's reported epsilon cannot be trusted, or None if it agrees with the ledger."""
        expected = self.epsilon(partition)
        if abs(reported_epsilon - expected) > self.tolerance * max(expected, 1e-12):
            return f"reported epsilon {reported_epsilon:.6g} differs from the server ledger's {expected:.6g}"
        return None

    def report(self) -> dict[str, object]:
        """Everything privacy.json holds: per client, its full history and final epsilon under RDP and PRV."""
        clients = {}
        for partition in sorted(self.plans):
            sigma, rate = self.plans[partition]
            history = self.history(partition)
            clients[str(partition)] = {
                "noise_multiplier": sigma,
                "sample_rate": rate,
                "rounds": self.rounds.get(partition, []),
                "history": [list(event) for event in history],
                "steps": sum(steps for _, _, steps in history),
                "epsilon": epsilon_by_accountant(history, self.delta),
            }
        return {
            "mechanism": "DP-SGD (Poisson-sampled Gaussian mechanism, per-sample clipping)",
            "accountant": self.accountant,
            "delta": self.delta,
            "guarantee": GUARANTEE,
            "clients": clients,
        }
