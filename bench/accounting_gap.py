"""Client-level DP against independent references: its epsilons against Google's dp-accounting, its noise
against the standard deviation it promises.

1. The calibrated client-level noise for Poisson and fixed-size client sampling: fedsvd's RDP epsilon against
   dp-accounting's RDP accountant, and its PRV epsilon against dp-accounting's PLD accountant (the tests assert
   0.5 %).
2. The noise of one released average, measured over 200,000 coordinates, against sigma * C / m.

Usage: python bench/accounting_gap.py
"""

from __future__ import annotations

import math

import torch
from dp_accounting import dp_event, pld, rdp

from fedsvd.methods import ClientUpdate
from fedsvd.privacy.accounting import RDP_ORDERS, epsilon_by_accountant
from fedsvd.privacy.client_level import ClientLevelPlan, noised_average, plan_client_level

DELTA = 1e-5
# (client sampling, clients, clients per round, rounds, target epsilon)
CASES = [
    ("poisson", 300, 6, 50, 2.0),
    ("poisson", 500, 10, 200, 8.0),
    ("fixed", 300, 6, 30, 8.0),
    ("fixed", 20, 5, 5, 4.0),
]


def accounting_gaps() -> None:
    worst = {"rdp": 0.0, "prv": 0.0}
    for sampling, clients, cohort, rounds, epsilon in CASES:
        plan = plan_client_level(
            num_clients=clients, sampling=sampling, cohort=cohort, clip_norm=1.0, rounds=rounds,
            target_epsilon=epsilon, delta=DELTA,
        )  # fmt: skip
        ours = epsilon_by_accountant([plan.round_event] * rounds, DELTA)
        gaussian = dp_event.GaussianDpEvent(plan.noise_multiplier)
        per_round = gaussian if plan.sample_rate == 1 else dp_event.PoissonSampledDpEvent(plan.sample_rate, gaussian)
        event = dp_event.SelfComposedDpEvent(per_round, rounds)
        google = {
            "rdp": rdp.RdpAccountant(RDP_ORDERS).compose(event).get_epsilon(DELTA),
            "prv": pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(DELTA),
        }
        gaps = {name: abs(ours[name] / google[name] - 1) for name in ours}
        worst = {name: max(worst[name], gaps[name]) for name in worst}
        print(
            f"{sampling:>7} sampling, {cohort} of {clients} per round, {rounds} rounds, target {epsilon:g}: "
            f"sigma {plan.noise_multiplier:.4f}; RDP {ours['rdp']:.4f} / dp-accounting RDP {google['rdp']:.4f} "
            f"({100 * gaps['rdp']:.3f} %), PRV {ours['prv']:.4f} / PLD {google['prv']:.4f} ({100 * gaps['prv']:.3f} %)"
        )
    print(f"largest gap: RDP {100 * worst['rdp']:.3f} %, PRV against PLD {100 * worst['prv']:.3f} % (tests: 0.5 %)")


def noise_std() -> None:
    shape = (400, 500)
    plan = ClientLevelPlan(clip_norm=2.0, noise_multiplier=1.3, sample_rate=0.1, denominator=4.0, rounds=1)
    # Two updates of all ones, each clipped to C: their sum over m is the released average's exact mean.
    updates = [ClientUpdate({"w": torch.ones(shape)}, 1) for _ in range(2)]
    released = noised_average({"w": torch.zeros(shape)}, updates, ["w"], plan, torch.Generator().manual_seed(3))
    noise = released["w"].double() - 2 * plan.clip_norm / math.sqrt(math.prod(shape)) / plan.denominator
    measured = float(noise.std())
    print(
        f"noise std over {noise.numel():,} coordinates: {measured:.5f} / expected sigma C / m = {plan.noise_std:.5f} "
        f"({100 * (measured / plan.noise_std - 1):+.2f} %)"
    )


def main() -> None:
    accounting_gaps()
    noise_std()


if __name__ == "__main__":
    main()
