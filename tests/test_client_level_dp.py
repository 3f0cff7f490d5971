"""Client-level DP: clipping, the noise, noise before every method's server step, and its accounting."""

from __future__ import annotations

import math

import pytest
import torch
from dp_accounting import dp_event, pld, rdp

from fedsvd.methods import METHODS, ClientUpdate, build_method
from fedsvd.privacy.accounting import RDP_ORDERS, epsilon_by_accountant, epsilon_of
from fedsvd.privacy.client_level import ClientLevelPlan, clipped_change, noised_average, plan_client_level

CLIP = 0.5
KEYS = ("m.lora_A.weight", "m.lora_B.weight", "head.weight")
SHAPES = {"m.lora_A.weight": (2, 6), "m.lora_B.weight": (5, 2), "head.weight": (3, 5), "m.base_layer.weight": (5, 6)}


def _sent(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}


def _changed(sent: dict[str, torch.Tensor], keys: tuple[str, ...], size: float, seed: int) -> ClientUpdate:
    generator = torch.Generator().manual_seed(seed)
    return ClientUpdate({key: sent[key] + size * torch.randn(sent[key].shape, generator=generator) for key in keys}, 10)


def _norm(arrays: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((value.double() ** 2).sum()) for value in arrays.values()))


@pytest.mark.parametrize("size", [1e-4, 0.01, 1.0, 1e6])
def test_every_clipped_change_is_at_most_the_clip_norm_and_small_ones_are_kept(size: float) -> None:
    sent = _sent()
    for seed in range(20):
        update = _changed(sent, KEYS, size, seed)
        change = {key: update.arrays[key].double() - sent[key].double() for key in KEYS}
        clipped = clipped_change(sent, update, CLIP)
        assert _norm(clipped) <= CLIP * (1 + 1e-12)
        if _norm(change) <= CLIP:
            assert all(torch.equal(clipped[key], change[key]) for key in KEYS)
        else:  # scaled as one vector: the direction is kept
            scale = _norm(clipped) / _norm(change)
            assert all(torch.allclose(clipped[key], scale * change[key], rtol=1e-12, atol=0) for key in KEYS)


def test_the_noise_has_the_planned_standard_deviation_and_the_average_the_fixed_denominator() -> None:
    sent = {"big.weight": torch.zeros(400, 500)}
    plan = ClientLevelPlan(clip_norm=2.0, noise_multiplier=1.3, sample_rate=0.1, denominator=4.0, rounds=1)
    # Two clients whose changes (all ones, scaled to the clip norm) sum to 2 * C / sqrt(n) per coordinate.
    updates = [ClientUpdate({"big.weight": torch.ones(400, 500)}, 1) for _ in range(2)]
    released = noised_average(sent, updates, ["big.weight"], plan, torch.Generator().manual_seed(3))["big.weight"]
    expected_mean = 2 * plan.clip_norm / math.sqrt(400 * 500) / plan.denominator
    noise = released.double() - expected_mean
    assert plan.noise_std == pytest.approx(1.3 * 2.0 / 4.0)
    # 200,000 draws: the sample standard deviation is within 0.5 % of the planned one (its own error: 0.16 %).
    assert float(noise.std()) == pytest.approx(plan.noise_std, rel=5e-3)
    assert abs(float(noise.mean())) < 5 * plan.noise_std / math.sqrt(noise.numel())


def test_a_round_without_clients_releases_the_sent_arrays_plus_noise() -> None:
    sent = _sent()
    plan = ClientLevelPlan(clip_norm=CLIP, noise_multiplier=1.0, sample_rate=0.05, denominator=3.0, rounds=1)
    released = noised_average(sent, [], KEYS, plan, torch.Generator().manual_seed(0))
    assert set(released) == set(KEYS)
    assert all(0 < float((released[key] - sent[key]).abs().max()) < 10 * plan.noise_std for key in KEYS)


SUPPORTED = sorted(name for name, method in METHODS.items() if method.client_level_refusal is None)


@pytest.mark.parametrize("name", SUPPORTED)
def test_each_method_sees_only_the_noised_average(name: str) -> None:
    """Different client updates with the same clipped sum give the very same new global adapter; another sum
    gives another one."""
    method = build_method(name, scaling=1.0)
    sent = _sent()
    keys = tuple(sorted(method.uplink_keys(sent, 1)))
    plan = ClientLevelPlan(clip_norm=CLIP, noise_multiplier=0.8, sample_rate=0.1, denominator=2.0, rounds=1)
    small = [_changed(sent, keys, 1e-3, seed) for seed in (1, 2)]  # both well inside the clip norm
    # The same two changes, handed over by other clients: d1 + d2 = (d1 + e) + (d2 - e), e exactly representable.
    shift = {key: torch.full(sent[key].shape, 2.0**-12) for key in keys}
    moved = [
        ClientUpdate({key: small[0].arrays[key] + shift[key] for key in keys}, 99),
        ClientUpdate({key: small[1].arrays[key] - shift[key] for key in keys}, 1),
    ]

    def new_global(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        released = noised_average(sent, updates, keys, plan, torch.Generator().manual_seed(7))
        return method.aggregate_noised(sent, released, 1)

    first, second, other = new_global(small), new_global(moved), new_global(small[:1])
    assert first.keys() == second.keys() == sent.keys()
    assert all(torch.allclose(first[key], second[key], rtol=0, atol=1e-6) for key in first)
    assert any(not torch.allclose(first[key], other[key], rtol=0, atol=1e-6) for key in keys)


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(SUPPORTED)))
def test_methods_whose_server_step_needs_each_upload_are_refused_with_the_reason(name: str) -> None:
    method = build_method(name, scaling=1.0)
    sent = _sent()
    assert name in ("flora", "fedex")
    with pytest.raises(ValueError, match=rf"^method '{name}' cannot run under client-level DP: .+"):
        method.aggregate_noised(sent, {key: sent[key] for key in method.uplink_keys(sent, 1)}, 1)


def _client_level_event(sigma: float, rate: float, rounds: int) -> dp_event.DpEvent:
    mechanism = dp_event.GaussianDpEvent(sigma)
    per_round = mechanism if rate == 1.0 else dp_event.PoissonSampledDpEvent(rate, mechanism)
    return dp_event.SelfComposedDpEvent(per_round, rounds)


def _google_rdp(sigma: float, rate: float, rounds: int, delta: float) -> float:
    return rdp.RdpAccountant(orders=RDP_ORDERS).compose(_client_level_event(sigma, rate, rounds)).get_epsilon(delta)


def _google_pld(sigma: float, rate: float, rounds: int, delta: float) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    return accountant.compose(_client_level_event(sigma, rate, rounds)).get_epsilon(delta)


@pytest.mark.parametrize(
    ("sampling", "num_clients", "cohort", "rounds", "epsilon"),
    [
        ("poisson", 300, 6, 50, 2.0),
        ("poisson", 500, 10, 200, 8.0),
        ("fixed", 300, 6, 30, 8.0),
        ("fixed", 20, 5, 5, 4.0),
    ],
)
def test_calibrated_client_level_epsilon_matches_dp_accounting(
    sampling: str, num_clients: int, cohort: int, rounds: int, epsilon: float
) -> None:
    delta = 1e-5
    plan = plan_client_level(
        num_clients=num_clients, sampling=sampling, cohort=cohort, clip_norm=CLIP, rounds=rounds,
        target_epsilon=epsilon, delta=delta,
    )  # fmt: skip
    assert plan.sample_rate == (cohort / num_clients if sampling == "poisson" else 1.0)
    assert plan.denominator == cohort
    spent = epsilon_of([plan.round_event] * rounds, delta, "rdp")
    assert epsilon * (1 - 5e-3) <= spent <= epsilon
    assert spent == pytest.approx(_google_rdp(plan.noise_multiplier, plan.sample_rate, rounds, delta), rel=5e-3)
    tighter = epsilon_by_accountant([plan.round_event] * rounds, delta)["prv"]
    assert tighter == pytest.approx(_google_pld(plan.noise_multiplier, plan.sample_rate, rounds, delta), rel=5e-3)


def test_a_plan_takes_a_noise_multiplier_or_a_target_not_both() -> None:
    common = {"num_clients": 10, "sampling": "fixed", "cohort": 2, "clip_norm": CLIP, "rounds": 3}
    with pytest.raises(ValueError, match="either a noise multiplier or a target epsilon"):
        plan_client_level(**common, noise_multiplier=1.0, target_epsilon=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="either a noise multiplier or a target epsilon"):
        plan_client_level(**common)
    assert plan_client_level(**common, noise_multiplier=1.5).noise_std == pytest.approx(1.5 * CLIP / 2)
