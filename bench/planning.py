"""Planning a federation, as ratios measured side by side in one run.

1. One RDP evaluation of the sampled Gaussian mechanism at all of fedsvd's orders: Opacus's term-by-term sums
   against fedsvd's vectorised ones (``fedsvd.accounting.rdp_per_step``), which every calibration step, budget
   check and privacy report goes through.
2. One PRV epsilon: Opacus's accountant, which sizes its grid with its term-by-term RDP, against fedsvd's
   (``fedsvd.accounting.epsilon_of``), the same epsilon from Opacus's PRV parts with the grid sized by the
   vectorised RDP; at a large client's sample rate and at a small client's of a 1,000-client federation. A
   PRV calibration, a PRV budget check and every privacy report's PRV column go through it.
3. The whole plan (split, partitions, every client's noise calibration) of 1,000 Dirichlet(0.5) clients on the
   default data against 10 clients. Target: at most 2x.

Usage: python bench/planning.py
"""

from __future__ import annotations

import statistics
import time
import warnings

from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from fedsvd import federation
from fedsvd.config import ExperimentConfig
from fedsvd.privacy import accounting, calibration


def seconds(run: object, repeats: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        run()  # type: ignore[operator]
    return (time.perf_counter() - started) / repeats


def rdp_ratio() -> str:
    sigmas = [0.8 + 0.01 * k for k in range(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_s = seconds(
            lambda: [compute_rdp(q=0.01, noise_multiplier=s, steps=1, orders=accounting.RDP_ORDERS) for s in sigmas]
        )
        accounting.rdp_per_step.cache_clear()
        ours_s = seconds(lambda: [accounting.rdp_per_step(s, 0.01) for s in sigmas])
    return (
        f"RDP at {len(accounting.RDP_ORDERS)} orders, Opacus / fedsvd: {opacus_s / len(sigmas) * 1e3:.1f} ms / "
        f"{ours_s / len(sigmas) * 1e3:.1f} ms = {opacus_s / ours_s:.0f}x"
    )


def prv_ratio(sigma: float, sample_rate: float, steps: int = 5, delta: float = 1e-5) -> str:
    history = [(sigma, sample_rate, steps)]
    eps_error = accounting._prv_eps_error(accounting.epsilon_of(history, delta, "rdp"), history)
    opacus = PRVAccountant()
    opacus.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_s = seconds(lambda: opacus.get_epsilon(delta, eps_error=eps_error))
        accounting.rdp_per_step.cache_clear()
        accounting._epsilon.cache_clear()  # nothing kept from the RDP epsilon above: fedsvd's starts cold
        ours_s = seconds(lambda: accounting.epsilon_of(history, delta, "prv"))
    return (
        f"PRV epsilon (q = {sample_rate:.3g}, sigma = {sigma:.3g}, {steps} steps), Opacus / fedsvd: "
        f"{opacus_s * 1e3:.0f} ms / {ours_s * 1e3:.0f} ms = {opacus_s / ours_s:.1f}x"
    )


def plan_seconds(cfg: ExperimentConfig) -> float:
    # Nothing cached from an earlier plan: each measurement loads, splits and calibrates from scratch.
    federation.federation_data.cache_clear()
    federation.client_plan.cache_clear()
    calibration.calibrate_noise_multiplier.cache_clear()
    accounting.rdp_per_step.cache_clear()
    return seconds(lambda: federation.plan_federation(cfg))


def planning_ratio(repeats: int = 3) -> str:
    small = ExperimentConfig(num_clients=10, rounds=2, batch_size=4)
    large = small.replace(num_clients=1000, min_partition_size=4)
    plan_seconds(small)  # warm-up: the corpus is read from disk once
    # Medians of alternating runs, so that load on a shared machine hits both alike.
    times = [(plan_seconds(small), plan_seconds(large)) for _ in range(repeats)]
    small_s, large_s = (statistics.median(column) for column in zip(*times, strict=True))
    sizes = sorted(plan.num_examples for plan in federation.plan_federation(large))
    ratio = large_s / small_s
    return (
        f"plan of 1,000 / 10 Dirichlet(0.5) clients (min_partition_size 4; sizes {sizes[0]}-{sizes[-1]}, "
        f"{len(set(sizes))} distinct): {large_s:.1f} s / {small_s:.1f} s = {ratio:.1f}x (target <= 2x) "
        f"{'ok' if ratio <= 2 else 'MISSED'}"
    )


def main() -> None:
    print(rdp_ratio(), flush=True)
    print(prv_ratio(1.71, 4 / 11), flush=True)  # a client of 11 examples, batch 4
    print(prv_ratio(0.6, 0.01), flush=True)
    print(planning_ratio(), flush=True)


if __name__ == "__main__":
    main()
