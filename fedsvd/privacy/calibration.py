"""The noise multiplier that spends a target epsilon over a planned number of steps: one numerical search per
(target, delta, sample rate, steps), whoever asks for it (each client's DP-SGD, the federation's client-level
noise)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

from fedsvd.privacy.accountants import PrivacyConfigError, check_accountant
from fedsvd.privacy.accounting import epsilon_of

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


# The config keys a calibration's errors name, by guarantee: (epsilon, delta, what sets the steps, the switch).
LEVEL_KEYS = {
    "record": ("epsilon", "delta", "rounds or local_steps", "dp"),
    "client": ("client_epsilon", "client_delta", "rounds", "client_dp"),
}


@functools.lru_cache(maxsize=256)  # a numerical search; every method of a comparison asks for the same plans
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, level: str = "record"
) -> float:
    """The noise multiplier with which ``steps`` steps of the Poisson-sampled Gaussian mechanism at
    ``sample_rate`` spend ``target_epsilon``: DP-SGD steps of one client (``level = "record"``) or the
    federation's rounds under client-level DP (``"client"``, which only changes the keys errors name).

    Called once per plan; the result stays fixed for the whole run so that the accountant's history stays
    comparable across rounds. The spent epsilon, as ``epsilon_of`` reports it, is at most the target and within
    0.5 % (at most 0.005) of it.
    """
    check_accountant(accountant)
    keys = LEVEL_KEYS[level]
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyConfigError(f"{keys[0]} = {target_epsilon!r} is not allowed: must be a finite number > 0")
    tolerance = min(0.005, 0.005 * target_epsilon)

    def spent_rdp(sigma: float) -> float:
        return _trial_epsilon(sigma, sample_rate, steps, delta, "rdp")

    # For PRV the RDP answer is only the start of the search: a coarse one will do.
    rdp_tolerance = tolerance if accountant == "rdp" else 0.02 * target_epsilon
    sigma_rdp = _solve_noise_multiplier(spent_rdp, target_epsilon, rdp_tolerance, keys, start=1.0, factor=2.0)
    if accountant == "rdp":
        return sigma_rdp

    # PRV is tighter than RDP, so it needs less noise: search downwards from the RDP answer, which keeps every
    # evaluation near the target (far-off noise multipliers make large PRV grids).
    def spent(sigma: float) -> float:
        return _trial_epsilon(sigma, sample_rate, steps, delta, accountant)

    return _solve_noise_multiplier(spent, target_epsilon, tolerance, keys, start=sigma_rdp, factor=1.25)


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
    keys: tuple[str, str, str, str],
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
                f"{keys[0]} = {target:g} is too small to reach with any noise multiplier up to "
                f"{MAX_NOISE_MULTIPLIER:g}; raise {keys[0]} (or {keys[1]}, or lower {keys[2]})"
            )
        hi = min(hi * factor, MAX_NOISE_MULTIPLIER)
        e_hi = spent(hi)
    lo, e_lo = hi, e_hi
    while e_lo <= target:
        if target - e_lo <= tolerance:
            return lo
        if lo <= MIN_NOISE_MULTIPLIER:
            raise PrivacyConfigError(
                f"{keys[0]} = {target:g} is not allowed: it needs a noise multiplier below "
                f"{MIN_NOISE_MULTIPLIER:g}, noise too weak to protect anything; lower {keys[0]}, or set {keys[3]} = "
                "false for a run without this guarantee"
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
