"""The server's privacy ledger: its own epsilon for every client, and what makes a report untrustworthy."""

from __future__ import annotations

import pytest
from dp_accounting import dp_event, rdp

from fedsvd.privacy import record_level
from fedsvd.privacy.accounting import RDP_ORDERS, epsilon_by_accountant
from fedsvd.privacy.record_level import PrivacyLedger, ServerPrivacyLedger

DELTA = 1e-5


def _ledger() -> ServerPrivacyLedger:
    return ServerPrivacyLedger("rdp", DELTA, steps_per_round=5, plans={0: (1.0, 0.02), 1: (0.8, 0.05)})


def test_epsilon_follows_only_the_rounds_a_client_trained() -> None:
    ledger = _ledger()
    for server_round in (1, 3, 4):
        ledger.record_training(0, server_round)
    ledger.record_training(1, 2)
    assert ledger.history(0) == [(1.0, 0.02, 5)] * 3
    independent = rdp.RdpAccountant(RDP_ORDERS)
    independent.compose(dp_event.PoissonSampledDpEvent(0.02, dp_event.GaussianDpEvent(1.0)), 15)
    assert ledger.epsilon(0) == pytest.approx(independent.get_epsilon(DELTA), rel=5e-3)
    assert ledger.epsilon(1) > 0 and ledger.history(1) == [(0.8, 0.05, 5)]


def test_a_client_report_matching_its_own_accountant_is_accepted_and_a_per_round_one_is_not() -> None:
    ledger = _ledger()
    client = PrivacyLedger("rdp")
    for server_round in (1, 2):
        ledger.record_training(0, server_round)
        client.history.append((1.0, 0.02, 5))
    assert ledger.mismatch(0, client.epsilon(DELTA)) is None
    # A client that reset its accountant reports only the last round: that under-reports and is refused.
    fresh = PrivacyLedger("rdp", [(1.0, 0.02, 5)])
    reason = ledger.mismatch(0, fresh.epsilon(DELTA))
    assert reason is not None and "differs from the server ledger" in reason


def test_report_has_every_client_with_both_accountants() -> None:
    ledger = _ledger()
    ledger.record_training(1, 1)
    report = ledger.report()
    assert report["delta"] == DELTA and "guarantee" in report
    clients = report["clients"]
    assert set(clients) == {"0", "1"}
    assert clients["0"]["epsilon"] == {"rdp": 0.0, "prv": 0.0} and clients["0"]["steps"] == 0
    assert clients["1"]["rounds"] == [1] and clients["1"]["steps"] == 5
    assert 0 < clients["1"]["epsilon"]["prv"] <= clients["1"]["epsilon"]["rdp"]


def test_each_report_computes_only_the_epsilons_of_clients_that_trained_since_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger = ServerPrivacyLedger("rdp", DELTA, steps_per_round=5, plans={p: (1.0 + p / 10, 0.02) for p in range(4)})
    ledger.record_training(0, 1)
    ledger.record_training(1, 1)
    ledger.report()
    computed: list[list[tuple[float, float, int]]] = []

    def counted(history: list[tuple[float, float, int]], delta: float) -> dict[str, float]:
        computed.append(list(history))
        return epsilon_by_accountant(history, delta)

    monkeypatch.setattr(record_level, "epsilon_by_accountant", counted)
    ledger.record_training(1, 2)
    ledger.record_training(2, 2)
    ledger.record_training(0, 1)  # a round counted once: client 0's history is unchanged
    report = ledger.report()
    assert computed == [ledger.history(1), ledger.history(2)]
    for partition in range(4):  # every epsilon is still cumulative, as a ledger that never reported before says
        fresh = epsilon_by_accountant(ledger.history(partition), DELTA)
        assert report["clients"][str(partition)]["epsilon"] == fresh
