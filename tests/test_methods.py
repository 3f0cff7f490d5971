"""Aggregation rules of every method (METHODS.md), and the SVD re-factorisation behind FedSVD."""

from __future__ import annotations

import inspect

import pytest
import torch

from fedsvd.methods import METHODS, ClientUpdate, FedSvd, build_method, refactorize
from fedsvd.methods.base import (
    ArrayDict,
    base_weight_key,
    change_norm,
    example_weights,
    factor_of,
    is_base_weight,
    is_lora_factor,
    lora_pairs,
    weighted_mean,
)
from fedsvd.methods.fedavg import FedAvgLora
from fedsvd.methods.fedex import FedExLora
from fedsvd.methods.fedsa import FedSaLora
from fedsvd.methods.fedsvd import prepare_a, refactorize_all
from fedsvd.methods.ffa import FfaLora
from fedsvd.methods.flora import FLora
from fedsvd.methods.rolora import RoLora

PREFIX = "base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
HEAD = "classifier.weight"
COUNTS = (10, 30, 60)
# Shapes (d_out, d_in, r): square, rectangular both ways, r = 1, r = 8, r > d_out.
SHAPES = [(16, 16, 1), (24, 12, 8), (12, 24, 8), (32, 20, 4), (5, 9, 8)]


def lora_keys(layer: int, module: str) -> tuple[str, str]:
    prefix = PREFIX.format(layer=layer, module=module)
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


MODULES = [lora_keys(0, "query"), lora_keys(0, "value"), lora_keys(1, "query")]
DIMS = {MODULES[0]: (16, 16), MODULES[1]: (16, 16), MODULES[2]: (12, 16)}
RANK = 4
SCALING = 2.5  # alpha / r, deliberately not 1 so that a missing factor s shows


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def assert_orthonormal_rows(a: torch.Tensor, atol: float = 1e-6) -> None:
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    torch.testing.assert_close(a.double() @ a.double().T, eye, atol=atol, rtol=0)


def global_arrays(gen: torch.Generator) -> ArrayDict:
    arrays: ArrayDict = {}
    for (a_key, b_key), (d_out, d_in) in DIMS.items():
        arrays[a_key] = torch.randn(RANK, d_in, generator=gen)
        arrays[b_key] = torch.randn(d_out, RANK, generator=gen)
    arrays[HEAD] = torch.randn(2, 16, generator=gen)
    return arrays


def with_base_weights(gen: torch.Generator, arrays: ArrayDict) -> ArrayDict:
    """Global arrays of a method that owns the base weights of the adapted modules."""
    bases = {base_weight_key(a_key): torch.randn(*DIMS[(a_key, b_key)], generator=gen) for a_key, b_key in MODULES}
    return {**arrays, **bases}


def mean_product(updates: list[ClientUpdate], a_key: str, b_key: str) -> torch.Tensor:
    """Reference ``sum_k p_k B_k A_k`` in float64, written independently of the library's helper."""
    total = sum(COUNTS)
    return sum(
        n / total * (u.arrays[b_key].double() @ u.arrays[a_key].double()) for n, u in zip(COUNTS, updates, strict=True)
    )


def uploads(gen: torch.Generator, glob: ArrayDict, keys: set[str]) -> list[ClientUpdate]:
    return [
        ClientUpdate({key: glob[key] + torch.randn(glob[key].shape, generator=gen) for key in keys}, n) for n in COUNTS
    ]


def expected_mean(updates: list[ClientUpdate], key: str) -> torch.Tensor:
    total = sum(COUNTS)
    return sum(n / total * u.arrays[key].double() for n, u in zip(COUNTS, updates, strict=True)).float()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# --- keys and weights ----------------------------------------------------------------------------


def test_key_helpers() -> None:
    a_key, b_key = MODULES[0]
    assert factor_of(a_key) == "A" and factor_of(b_key) == "B" and factor_of(HEAD) is None
    assert is_lora_factor(a_key) and not is_lora_factor(HEAD)
    base = base_weight_key(a_key)
    assert base.endswith(".query.base_layer.weight") and is_base_weight(base) and not is_lora_factor(base)
    keys = [key for pair in MODULES for key in reversed(pair)] + [HEAD]
    assert lora_pairs(keys) == sorted(MODULES)
    with pytest.raises(ValueError, match="without their partner"):
        lora_pairs([a_key, *MODULES[1]])
    with pytest.raises(ValueError, match="without their partner"):
        lora_pairs([b_key])


def test_example_weights() -> None:
    weights = example_weights([ClientUpdate({}, n) for n in COUNTS])
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match="zero client updates"):
        example_weights([])


# --- refactorize ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("d_out", "d_in", "r"), SHAPES)
def test_refactorize_preserves_product_and_orthonormalises(gen: torch.Generator, d_out: int, d_in: int, r: int) -> None:
    b, a = torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen)
    b_copy, a_copy = b.clone(), a.clone()
    b_new, a_new = refactorize(b, a)
    assert b_new.shape == b.shape and a_new.shape == a.shape
    assert b_new.dtype == torch.float32 and a_new.dtype == torch.float32
    assert rel_err(b_new @ a_new, b @ a) < 1e-5
    assert_orthonormal_rows(a_new)
    assert torch.equal(b, b_copy) and torch.equal(a, a_copy)


@pytest.mark.parametrize(("d_out", "d_in", "r"), [s for s in SHAPES if s[2] <= min(s[0], s[1])])
def test_refactorize_agrees_with_full_svd(gen: torch.Generator, d_out: int, d_in: int, r: int) -> None:
    b = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    a = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    b_new, a_new = refactorize(b, a)
    _, s, vh = torch.linalg.svd(b @ a)
    torch.testing.assert_close(torch.linalg.norm(b_new, dim=0), s[:r], rtol=1e-10, atol=1e-10)
    assert torch.all(torch.diff(torch.linalg.norm(b_new, dim=0)) <= 0)
    torch.testing.assert_close(a_new.T @ a_new, vh[:r].T @ vh[:r], rtol=0, atol=1e-10)


def test_refactorize_rank_larger_than_d_in(gen: torch.Generator) -> None:
    # Only d_in rows can be orthonormal in R^d_in; the rest are zero, so A_new has orthonormal columns.
    b, a = torch.randn(10, 8, generator=gen), torch.randn(8, 6, generator=gen)
    b_new, a_new = refactorize(b, a)
    assert rel_err(b_new @ a_new, b @ a) < 1e-5
    assert_orthonormal_rows(a_new[:6])
    assert torch.equal(a_new[6:], torch.zeros(2, 6)) and torch.equal(b_new[:, 6:], torch.zeros(10, 2))


@pytest.mark.parametrize(("d_out", "d_in", "r"), SHAPES)
def test_refactorize_zero_b(gen: torch.Generator, d_out: int, d_in: int, r: int) -> None:
    b_new, a_new = refactorize(torch.zeros(d_out, r), torch.randn(r, d_in, generator=gen))
    assert torch.equal(b_new, torch.zeros(d_out, r))
    assert_orthonormal_rows(a_new)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_refactorize_keeps_dtype(gen: torch.Generator, dtype: torch.dtype) -> None:
    b_new, a_new = refactorize(torch.randn(8, 3, generator=gen).to(dtype), torch.randn(3, 8, generator=gen).to(dtype))
    assert b_new.dtype == dtype and a_new.dtype == dtype


def test_refactorize_all_matches_one_pair_at_a_time_over_mixed_shapes(gen: torch.Generator) -> None:
    pairs = [(torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen)) for d_out, d_in, r in SHAPES]
    together = refactorize_all(pairs)
    for (b, a), (b_new, a_new) in zip(pairs, together, strict=True):
        b_one, a_one = refactorize(b, a)
        torch.testing.assert_close(b_new @ a_new, b_one @ a_one, rtol=1e-5, atol=1e-6)
        assert rel_err(b_new @ a_new, b @ a) < 1e-5
        assert_orthonormal_rows(a_new[: min(a.shape)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_ill_conditioned_a_is_still_orthonormalised(gen: torch.Generator, dtype: torch.dtype) -> None:
    """Past the Gram route's condition limit the module goes through QR: A_new stays orthonormal."""
    u, _ = torch.linalg.qr(torch.randn(64, 4, generator=gen, dtype=torch.float64))
    a = (torch.diag(torch.tensor([1.0, 1e-2, 1e-4, 1e-5], dtype=torch.float64)) @ u.T).to(dtype)
    b = torch.randn(48, 4, generator=gen, dtype=dtype)
    b_new, a_new = refactorize(b, a)
    assert_orthonormal_rows(a_new)
    assert rel_err(b_new.double() @ a_new.double(), b.double() @ a.double()) < 1e-5


def test_refactorize_rejects_mismatched_rank() -> None:
    with pytest.raises(ValueError, match="expected B"):
        refactorize(torch.zeros(4, 2), torch.zeros(3, 4))


# --- FedSVD --------------------------------------------------------------------------------------


def test_fedsvd_aggregate_is_exact_and_orthonormal(gen: torch.Generator) -> None:
    glob = global_arrays(gen)
    method = FedSvd()
    keys = method.uplink_keys(glob, 1)
    assert keys == {b for _, b in MODULES} | {HEAD}
    updates = uploads(gen, glob, keys)
    snapshot = {key: value.clone() for key, value in glob.items()}
    new = method.aggregate(glob, updates, server_round=1)
    for a_key, b_key in MODULES:
        b_bar = expected_mean(updates, b_key)
        assert rel_err(new[b_key] @ new[a_key], b_bar @ glob[a_key]) < 1e-5
        assert_orthonormal_rows(new[a_key])
    torch.testing.assert_close(new[HEAD], expected_mean(updates, HEAD))
    assert all(torch.equal(glob[key], snapshot[key]) for key in glob)


def test_fedsvd_prepared_while_clients_train_aggregates_bit_for_bit_as_unprepared(gen: torch.Generator) -> None:
    glob = global_arrays(gen)
    method = FedSvd()
    updates = uploads(gen, glob, method.uplink_keys(glob, 2))
    unprepared = method.aggregate(glob, updates, 2)
    method.prepare(glob, 2)
    prepared = method.aggregate(glob, updates, 2)
    assert prepared.keys() == unprepared.keys() and all(torch.equal(prepared[k], unprepared[k]) for k in prepared)
    # What was prepared for other A (another round's, a stale one) is not used: the result is that of the A given.
    other = global_arrays(gen)
    method.prepare(other, 2)
    assert all(torch.equal(method.aggregate(glob, updates, 2)[k], unprepared[k]) for k in unprepared)
    method.prepare(glob, 1)
    assert all(torch.equal(method.aggregate(glob, updates, 2)[k], unprepared[k]) for k in unprepared)


def test_refactorize_all_ignores_what_was_prepared_from_other_tensors(gen: torch.Generator) -> None:
    pairs = [(torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen)) for d_out, d_in, r in SHAPES]
    stale = prepare_a([torch.randn(a.shape, generator=gen) for _, a in pairs])
    for (b, a), (b_new, a_new) in zip(pairs, refactorize_all(pairs, stale), strict=True):
        assert rel_err(b_new @ a_new, b @ a) < 1e-5
        assert_orthonormal_rows(a_new[: min(a.shape)])


def test_fedsvd_rounds_without_svd(gen: torch.Generator) -> None:
    glob = global_arrays(gen)
    method = FedSvd(svd_every=2, svd_warmup=3)
    assert [r for r in range(1, 10) if method.svd_due(r)] == [5, 7, 9]
    for server_round in (1, 3, 4, 6):
        updates = uploads(gen, glob, method.uplink_keys(glob, server_round))
        new = method.aggregate(glob, updates, server_round)
        for a_key, b_key in MODULES:
            assert torch.equal(new[a_key], glob[a_key])
            torch.testing.assert_close(new[b_key], expected_mean(updates, b_key))


def test_fedsvd_never_equals_ffa(gen: torch.Generator) -> None:
    glob = global_arrays(gen)
    updates = uploads(gen, glob, FfaLora().uplink_keys(glob, 1))
    fedsvd, ffa = FedSvd(svd_every=0).aggregate(glob, updates, 1), FfaLora().aggregate(glob, updates, 1)
    assert fedsvd.keys() == ffa.keys() and all(torch.equal(fedsvd[k], ffa[k]) for k in ffa)


# --- FFA-LoRA and FedAvg ---------------------------------------------------------------------------


def test_ffa_keeps_a_and_averages_b(gen: torch.Generator) -> None:
    glob = global_arrays(gen)
    method = FfaLora()
    updates = uploads(gen, glob, method.uplink_keys(glob, 1))
    new = method.aggregate(glob, updates, 1)
    for a_key, b_key in MODULES:
        assert torch.equal(new[a_key], glob[a_key])
        torch.testing.assert_close(new[b_key], expected_mean(updates, b_key))
    with pytest.raises(ValueError, match="unexpected"):
        method.aggregate(glob, uploads(gen, glob, set(glob)), 1)


def test_fedavg_averages_both_factors(gen: torch.Generator) -> None:
    glob = global_arrays(gen)
    method = FedAvgLora()
    assert method.uplink_keys(glob, 1) == set(glob)
    updates = uploads(gen, glob, set(glob))
    new = method.aggregate(glob, updates, 1)
    for key in glob:
        torch.testing.assert_close(new[key], expected_mean(updates, key))


def test_fedavg_product_is_not_mean_of_products(gen: torch.Generator) -> None:
    # Documents FedAvg-LoRA's inexactness: B̄ Ā != sum_k p_k B_k A_k once clients' factors differ.
    glob = global_arrays(gen)
    updates = uploads(gen, glob, set(glob))
    new = FedAvgLora().aggregate(glob, updates, 1)
    a_key, b_key = MODULES[0]
    weights = example_weights(updates)
    mean_of_products = sum(float(p) * u.arrays[b_key] @ u.arrays[a_key] for p, u in zip(weights, updates, strict=True))
    assert rel_err(new[b_key] @ new[a_key], mean_of_products) > 0.1


# --- RoLoRA ------------------------------------------------------------------------------------------


def test_rolora_alternates_and_keeps_the_frozen_half_bit_identical(gen: torch.Generator) -> None:
    glob = global_arrays(gen)
    method = RoLora()
    a_keys, b_keys = {a for a, _ in MODULES}, {b for _, b in MODULES}
    assert [method.trained_factors(r) for r in (1, 2, 3, 4)] == [{"B"}, {"A"}, {"B"}, {"A"}]
    for server_round, trained, frozen in ((1, b_keys, a_keys), (2, a_keys, b_keys)):
        assert method.uplink_keys(glob, server_round) == trained | {HEAD}
        updates = uploads(gen, glob, trained | {HEAD})
        new = method.aggregate(glob, updates, server_round)
        for key in frozen:
            assert new[key] is glob[key]
        for key in trained:
            torch.testing.assert_close(new[key], expected_mean(updates, key))
        # Only one factor differs across clients, so the product of the averages is the average of the products.
        for a_key, b_key in MODULES:
            client_updates = [ClientUpdate({**glob, **u.arrays}, u.num_examples) for u in updates]
            assert rel_err(new[b_key].double() @ new[a_key].double(), mean_product(client_updates, a_key, b_key)) < 1e-5
        glob = new


# --- FedSA-LoRA --------------------------------------------------------------------------------------


def test_fedsa_averages_both_and_keeps_b_personal(gen: torch.Generator) -> None:
    glob = global_arrays(gen)
    method = FedSaLora()
    assert method.personal_factors == {"B"} and not method.merges_into_base
    assert method.uplink_keys(glob, 1) == set(glob)
    updates = uploads(gen, glob, set(glob))
    new = method.aggregate(glob, updates, 1)
    for key in glob:
        torch.testing.assert_close(new[key], expected_mean(updates, key))


# --- FLoRA and FedEx-LoRA: exact aggregation through the base weights ---------------------------------


def test_flora_merges_the_exact_sum_into_the_base_and_restarts_the_adapter(gen: torch.Generator) -> None:
    glob = with_base_weights(gen, global_arrays(gen))
    method = FLora(scaling=SCALING, seed=7)
    assert method.merges_into_base
    uplink = method.uplink_keys(glob, 1)
    assert uplink == set(global_arrays(gen)) and not any(is_base_weight(key) for key in uplink)
    updates = uploads(gen, glob, uplink)
    new = method.aggregate(glob, updates, 1)
    for a_key, b_key in MODULES:
        base = base_weight_key(a_key)
        expected = glob[base].double() + SCALING * mean_product(updates, a_key, b_key)
        # What clients compute next round: merged base + s * (fresh B = 0) @ A = the exact stacked model.
        actual = new[base].double() + SCALING * new[b_key].double() @ new[a_key].double()
        assert rel_err(actual, expected) < 1e-5
        assert not new[b_key].any()
        d_in = new[a_key].shape[1]
        assert new[a_key].abs().max() <= 1 / d_in**0.5 and new[a_key].std() > 0.1 / d_in**0.5
        assert not torch.equal(new[a_key], glob[a_key])
    torch.testing.assert_close(new[HEAD], expected_mean(updates, HEAD))
    again = FLora(scaling=SCALING, seed=7).aggregate(glob, updates, 1)
    next_round = FLora(scaling=SCALING, seed=7).aggregate(glob, updates, 2)
    a_key = MODULES[0][0]
    assert torch.equal(again[a_key], new[a_key]) and not torch.equal(next_round[a_key], new[a_key])


def test_fedex_folds_the_averaging_error_into_the_base(gen: torch.Generator) -> None:
    glob = with_base_weights(gen, global_arrays(gen))
    method = FedExLora(scaling=SCALING)
    uplink = method.uplink_keys(glob, 1)
    updates = uploads(gen, glob, uplink)
    new = method.aggregate(glob, updates, 1)
    for a_key, b_key in MODULES:
        base = base_weight_key(a_key)
        torch.testing.assert_close(new[a_key], expected_mean(updates, a_key))
        torch.testing.assert_close(new[b_key], expected_mean(updates, b_key))
        expected = glob[base].double() + SCALING * mean_product(updates, a_key, b_key)
        actual = new[base].double() + SCALING * new[b_key].double() @ new[a_key].double()
        assert rel_err(actual, expected) < 1e-5
        # The residual is real: FedAvg alone would be off by far more than rounding.
        assert rel_err(glob[base].double() + SCALING * new[b_key].double() @ new[a_key].double(), expected) > 1e-3


@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsvd", "fedsa", "rolora"])
def test_methods_without_base_merging_never_touch_base_weights(gen: torch.Generator, name: str) -> None:
    glob = with_base_weights(gen, global_arrays(gen))
    method = build_method(name)
    assert not method.merges_into_base
    for server_round in (1, 2):
        keys = method.uplink_keys(glob, server_round)
        new = method.aggregate(glob, uploads(gen, glob, keys), server_round)
        for a_key, _ in MODULES:
            assert new[base_weight_key(a_key)] is glob[base_weight_key(a_key)]


# --- validation ----------------------------------------------------------------------------------


def test_weighted_mean_validation() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="missing"):
        weighted_mean([ClientUpdate({"a": x}, 1), ClientUpdate({"b": x}, 1)])
    with pytest.raises(ValueError, match="shape mismatch for 'a'"):
        weighted_mean([ClientUpdate({"a": x}, 1), ClientUpdate({"a": torch.zeros(3, 2)}, 1)])
    with pytest.raises(ValueError, match="positive num_examples"):
        weighted_mean([ClientUpdate({"a": x}, 1), ClientUpdate({"a": x}, 0)])
    mean = weighted_mean([ClientUpdate({"a": x.double()}, 1), ClientUpdate({"a": x.double() + 4}, 3)])
    assert mean["a"].dtype == torch.float32 and torch.equal(mean["a"], torch.full((2, 3), 3.0))


def test_the_mean_is_its_defining_expression_bit_for_bit_and_every_change_norm_is_measured(
    gen: torch.Generator,
) -> None:
    sent = {"b": torch.randn(40, 4, generator=gen), "head": torch.randn(3, generator=gen)}
    updates = [
        ClientUpdate({key: value + scale * torch.randn(value.shape, generator=gen) for key, value in sent.items()}, n)
        for scale, n in ((1e-3, 7), (5e-2, 11), (1.0, 2))
    ]
    mean, norms = weighted_mean(updates), [change_norm(sent, update) for update in updates]
    weights = [n / 20 for n in (7, 11, 2)]
    for key in sent:
        # The plain expression the server's mean is defined by, in float64, rounded once to float32.
        expected = sum(w * update.arrays[key].double() for w, update in zip(weights, updates, strict=True))
        assert torch.equal(mean[key], expected.float())
    for update, norm in zip(updates, norms, strict=True):
        change = torch.cat([(update.arrays[key].double() - sent[key].double()).flatten() for key in sent])
        assert norm == pytest.approx(float(torch.linalg.vector_norm(change)), rel=1e-6)
    # NaN in one upload makes that norm non-finite, and leaves the others' norms as they were.
    poisoned = dict(updates[1].arrays)
    poisoned["head"] = poisoned["head"].clone()
    poisoned["head"][1] = float("nan")
    again = [change_norm(sent, update) for update in (updates[0], ClientUpdate(poisoned, 11), updates[2])]
    assert again[0] == norms[0] and again[2] == norms[2] and again[1] != again[1]


def test_aggregate_validation(gen: torch.Generator) -> None:
    glob = global_arrays(gen)
    method = FfaLora()
    keys = method.uplink_keys(glob, 1)
    with pytest.raises(ValueError, match="missing"):
        method.aggregate(glob, uploads(gen, glob, keys - {HEAD}), 1)
    bad_shape = [ClientUpdate({**u.arrays, HEAD: torch.zeros(3, 3)}, u.num_examples) for u in uploads(gen, glob, keys)]
    with pytest.raises(ValueError, match=r"shape mismatch for 'classifier\.weight'"):
        method.aggregate(glob, bad_shape, 1)
    with pytest.raises(ValueError, match="positive num_examples"):
        method.aggregate(glob, [ClientUpdate(u.arrays, 0) for u in uploads(gen, glob, keys)], 1)
    with pytest.raises(ValueError, match="zero client updates"):
        method.aggregate(glob, [], 1)


# --- registry ------------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(METHODS) == {"fedavg", "ffa", "fedsvd", "fedsa", "rolora", "flora", "fedex"}
    for name, cls in METHODS.items():
        assert cls.name == name
        # The declared options must be exactly the constructor's keyword parameters, or build_method drifts.
        params = inspect.signature(cls).parameters.values()
        assert tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD) == cls.options
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of: fedavg, fedex, fedsa, fedsvd, ffa, "):
        build_method("nope")
    assert isinstance(build_method("ffa", svd_every=3, svd_warmup=1), FfaLora)
    method = build_method("fedsvd", svd_every=2, svd_warmup=5)
    assert isinstance(method, FedSvd) and (method.svd_every, method.svd_warmup) == (2, 5)
    with pytest.raises(ValueError, match="svd_every"):
        build_method("fedsvd", svd_every=-1)
    with pytest.raises(ValueError, match="svd_warmup"):
        FedSvd(svd_warmup=-2)
    with pytest.raises(ValueError, match="unknown method option"):
        build_method("fedavg", rank=8)
    flora = build_method("flora", svd_every=1, scaling=0.5, seed=3)
    assert isinstance(flora, FLora) and (flora.scaling, flora.seed) == (0.5, 3)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="scaling"):
            build_method("fedex", scaling=bad)
