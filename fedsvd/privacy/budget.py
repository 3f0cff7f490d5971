"""The budget rule, the one the server applies before it selects a client and the client before it trains: a
round may run only if the whole history with that round added stays at or below the target epsilon."""

from __future__ import annotations

from collections.abc import Iterable

from fedsvd.privacy.accounting import PrivacyEvent, epsilon_of


def within_budget(
    history: Iterable[PrivacyEvent], next_round: PrivacyEvent, delta: float, accountant: str, target_epsilon: float
) -> bool:
    """Whether ``history`` followed by ``next_round`` spends at most ``target_epsilon`` at ``delta``."""
    return epsilon_of([*history, next_round], delta, accountant) <= target_epsilon
