"""Record-level DP: DP-SGD on each client's own data, and the ledgers that keep every client's spend.

A client's privacy spend accumulates over every round in which it actually trains, so the accountant's
history (noise multiplier, sample rate, steps) is the state that must survive rounds and restarts.
``PrivacyLedger`` is that state in a form that can be stored in Flower's ``context.state`` or a file and
fed back into an Opacus accountant; ``ServerPrivacyLedger`` is the server's own account of every client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant

from fedsvd.privacy.accountants import PrivacyConfigError, check_accountant
from fedsvd.privacy.accounting import PrivacyEvent, epsilon_by_accountant, epsilon_of
from fedsvd.privacy.budget import within_budget


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
    # Every client's epsilon under each accountant as last reported, keyed by what its history is made of: it only
    # changes when the client trains, and the report lists every client after every round. Without it, a
    # federation with more distinct histories than the accountants' cache holds would recompute all of them.
    _reported: dict[int, tuple[tuple[float, float, int], dict[str, float]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

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
        next_round = (sigma, rate, self.steps_per_round)
        return within_budget(self.history(partition), next_round, self.delta, self.accountant, target_epsilon)

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
            made_of = (sigma, rate, len(history))
            if partition not in self._reported or self._reported[partition][0] != made_of:
                self._reported[partition] = (made_of, epsilon_by_accountant(history, self.delta))
            clients[str(partition)] = {
                "noise_multiplier": sigma,
                "sample_rate": rate,
                "rounds": self.rounds.get(partition, []),
                "history": [list(event) for event in history],
                "steps": sum(steps for _, _, steps in history),
                "epsilon": dict(self._reported[partition][1]),
            }
        return {
            "mechanism": "DP-SGD (Poisson-sampled Gaussian mechanism, per-sample clipping)",
            "accountant": self.accountant,
            "delta": self.delta,
            "guarantee": GUARANTEE,
            "clients": clients,
        }
