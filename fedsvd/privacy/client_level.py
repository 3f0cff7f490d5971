"""Client-level DP (DP-FedAvg, McMahan et al. 2018): a guarantee about a whole client, not one of its records.

Each round, every sampled client's change (what it uploaded minus what it was sent, over every array it trained,
as one vector) is clipped to norm C; the clipped changes are summed, divided by a fixed denominator m, and
Gaussian noise of standard deviation sigma * C / m goes on every coordinate of that average. Only then does the
method's own server step run (``FederatedLoraMethod.aggregate_noised``): whatever it computes, FedSVD's new A
included, is post-processing of the noised average and costs no privacy.

Why a fixed denominator: adding or removing one client changes the sum by at most C, so the average moves by at
most C / m whatever the others sent. Dividing by the number of clients that replied would make the sensitivity
depend on that number.

- Poisson client sampling (each client takes part independently with probability q): m = q N, the expected cohort.
  A round is then the Poisson-sampled Gaussian mechanism with noise multiplier sigma and rate q, accounted with
  amplification by the same RDP as a DP-SGD step (McMahan et al. 2018 account DP-FedAvg this way). A round in
  which no client was sampled still releases noise, and is accounted like any other.
- Fixed-size sampling (m of the N clients, the strategy's default): m = the cohort size, and each round is accounted
  as the Gaussian mechanism without amplification (sample rate 1). That bound holds whatever the sampling, and is
  loose. Sampling without replacement does amplify (Wang, Balle & Kasiviswanathan 2019), but under replace-one
  adjacency with another bound, which is not used here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedsvd.config import CLIENT_SAMPLING
from fedsvd.methods.base import ClientUpdate
from fedsvd.privacy.accounting import PrivacyEvent, epsilon_by_accountant, epsilon_of
from fedsvd.privacy.budget import within_budget
from fedsvd.privacy.calibration import calibrate_noise_multiplier


@dataclass(frozen=True)
class ClientLevelPlan:
    """The client-level mechanism of one federation, fixed for the whole run."""

    clip_norm: float
    noise_multiplier: float
    # What a round is accounted with: q under Poisson sampling, 1 (no amplification) under fixed-size sampling.
    sample_rate: float
    # m: the expected cohort (Poisson) or the cohort size (fixed); the clipped sum is divided by it.
    denominator: float
    rounds: int

    @property
    def round_event(self) -> PrivacyEvent:
        """One round, as an accountant entry."""
        return (self.noise_multiplier, self.sample_rate, 1)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on every coordinate of the average."""
        return self.noise_multiplier * self.clip_norm / self.denominator


def plan_client_level(
    *,
    num_clients: int,
    sampling: str,
    cohort: float,
    clip_norm: float,
    rounds: int,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    accountant: str = "rdp",
) -> ClientLevelPlan:
    """The plan for ``rounds`` rounds: a given noise multiplier, or the one calibrated so that the planned rounds
    spend ``target_epsilon`` at ``delta``. ``cohort`` is the clients per round (fixed) or its expectation (Poisson,
    which samples each client with probability cohort / num_clients)."""
    if sampling not in CLIENT_SAMPLING:
        raise ValueError(f"client sampling {sampling!r}: must be one of {', '.join(CLIENT_SAMPLING)}")
    if not 0 < cohort <= num_clients:
        raise ValueError(f"a cohort of {cohort:g} clients needs 0 < cohort <= num_clients = {num_clients}")
    sample_rate = cohort / num_clients if sampling == "poisson" else 1.0
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give either a noise multiplier or a target epsilon, not both")
    if noise_multiplier is None:
        assert target_epsilon is not None and delta is not None
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, rounds, accountant, "client")
    return ClientLevelPlan(clip_norm, noise_multiplier, sample_rate, float(cohort), rounds)


def clipped_change(sent: Mapping[str, torch.Tensor], update: ClientUpdate, clip_norm: float) -> dict[str, torch.Tensor]:
    """The client's change over every array it uploaded, scaled as one vector to norm at most ``clip_norm``
    (float64). A change that is not finite counts as infinitely long: it is scaled to nothing."""
    change = {key: value.to(torch.float64) - sent[key].to(torch.float64) for key, value in update.arrays.items()}
    norm = math.sqrt(sum(float(torch.sum(delta * delta)) for delta in change.values()))
    scale = 0.0 if not math.isfinite(norm) else min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {key: delta * scale for key, delta in change.items()}


def noised_average(
    sent: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    keys: Sequence[str],
    plan: ClientLevelPlan,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """What the server may release for the uploaded ``keys``: the arrays sent plus the sum of the clipped changes
    divided by the plan's denominator, plus Gaussian noise of standard deviation ``plan.noise_std`` per coordinate
    (drawn from ``generator``, key by key in ``keys`` order). With no update at all it is the arrays sent plus
    noise. Each result has its sent array's dtype."""
    total = {key: torch.zeros(sent[key].shape, dtype=torch.float64) for key in keys}
    for update in updates:
        for key, delta in clipped_change(sent, update, plan.clip_norm).items():
            total[key] += delta
    released = {}
    for key in keys:
        noise = torch.normal(0.0, plan.noise_std, size=tuple(sent[key].shape), generator=generator, dtype=torch.float64)
        released[key] = (sent[key].to(torch.float64) + total[key] / plan.denominator + noise).to(sent[key].dtype)
    return released


def noise_generator(seed: int, server_round: int) -> torch.Generator:
    """The server's noise stream for one round: reproducible from (run seed, round) alone, so a resumed run draws
    the very noise the interrupted one would have, and independent of every client's stream."""
    stream = np.random.SeedSequence([seed, server_round, _SERVER_NOISE_STREAM]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(stream))


# Tells the server's noise streams apart from the clients' ones, which are derived from (seed, partition, round).
_SERVER_NOISE_STREAM = 2**31


@dataclass
class ClientLevelLedger:
    """The federation's client-level spend: one accounted round per noised average released.

    A round counts from the moment its clients are instructed, whatever then happens, and counting it twice
    (a round re-run after a resume releases the very same noised average) counts it once.
    """

    plan: ClientLevelPlan
    delta: float
    accountant: str
    target_epsilon: float
    rounds: list[int] = field(default_factory=list)

    def history(self, extra_rounds: int = 0) -> list[PrivacyEvent]:
        sigma, rate, _ = self.plan.round_event
        return [(sigma, rate, len(self.rounds) + extra_rounds)]

    def epsilon(self) -> float:
        return epsilon_of(self.history(), self.delta, self.accountant)

    def can_release(self) -> bool:
        """Whether one more round keeps the federation at or below its target."""
        return within_budget(self.history(), self.plan.round_event, self.delta, self.accountant, self.target_epsilon)

    def record_release(self, server_round: int) -> None:
        if server_round not in self.rounds:
            self.rounds.append(server_round)
            self.rounds.sort()

    def report(self) -> dict[str, object]:
        """The client-level part of privacy.json."""
        return {
            "mechanism": "Gaussian mechanism on the clipped update sum over a fixed denominator (DP-FedAvg)",
            "guarantee": CLIENT_LEVEL_GUARANTEE,
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "clip_norm": self.plan.clip_norm,
            "noise_multiplier": self.plan.noise_multiplier,
            "sample_rate": self.plan.sample_rate,
            "denominator": self.plan.denominator,
            "noise_std": self.plan.noise_std,
            "rounds": list(self.rounds),
            "epsilon": epsilon_by_accountant(self.history(), self.delta),
        }


CLIENT_LEVEL_GUARANTEE = (
    "Client-level (epsilon, delta)-DP for what the server releases, the sequence of global adapters, with respect "
    "to adding or removing one whole client with all its data, from clipping each client's update to the clip norm "
    "and adding Gaussian noise to their sum over a fixed denominator; epsilon composes over every round released. "
    "The server is trusted: it sees each client's update. Not covered: the server's evaluation data, the metrics "
    "clients report (training loss, per-client evaluation), hyper-parameter search across runs, and the use of a "
    "non-cryptographic random number generator for the noise."
)
