"""Per-client privacy accounting for DP-SGD.

A client's privacy spend accumulates over every round in which it actually trains, so the accountant's
history (noise multiplier, sample rate, steps) is the state that must survive rounds and restarts.
``PrivacyLedger`` is that state in a form that can be stored in Flower's ``context.state`` or a file and
fed back into an Opacus accountant; epsilon is always computed from the whole history, never per round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

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


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier with which ``steps`` DP-SGD steps at ``sample_rate`` spend ``target_epsilon``.

    Called once per client with the planned total number of local steps; the result stays fixed for the
    whole run so that the accountant's history stays comparable across rounds.
    """
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    )


@dataclass
class PrivacyLedger:
    """The complete DP-SGD history of one client under one accountant."""

    accountant: str
    history: list[PrivacyEvent] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon over every recorded step (0 before the first step)."""
        return epsilon_of(self.history, delta, self.accountant)

    def new_accountant(self) -> IAccountant:
        """An Opacus accountant that continues this history; hand it back with ``record``."""
        accountant = create_accountant(self.accountant)
        accountant.history = list(self.history)
        return accountant

    def record(self, accountant: IAccountant) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in accountant.history]

    def to_record(self) -> dict[str, list[float] | list[int] | str]:
        """Flat lists, the shape Flower's ConfigRecord and JSON both store."""
        return {
            "accountant": self.accountant,
            "noise_multiplier": [s for s, _, _ in self.history],
            "sample_rate": [q for _, q, _ in self.history],
            "steps": [n for _, _, n in self.history],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> PrivacyLedger:
        sigmas, rates, steps = (list(record[key]) for key in ("noise_multiplier", "sample_rate", "steps"))  # type: ignore[call-overload]
        if not len(sigmas) == len(rates) == len(steps):
            raise ValueError("privacy record has lists of different lengths")
        events = zip(map(float, sigmas), map(float, rates), map(int, steps), strict=True)
        return cls(str(record["accountant"]), list(events))


def epsilon_of(history: Iterable[PrivacyEvent], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of a (possibly heterogeneous) DP-SGD history under the named accountant."""
    events = list(history)
    if not events:
        return 0.0
    opacus_accountant = create_accountant(accountant)
    opacus_accountant.history = events
    return float(opacus_accountant.get_epsilon(delta=delta))
