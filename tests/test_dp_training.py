"""DP-SGD on a LoRA model: clipping, updates that really happen, accounting across rounds, empty batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, rdp
from opacus.accountants import RDPAccountant

from clients.trainer import DpSgdSettings, train_local
from fedsvd.model import build_lora_model, get_arrays, set_trainable, shared_parameters
from fedsvd.privacy.accounting import RDP_ORDERS, epsilon_of
from fedsvd.privacy.calibration import calibrate_noise_multiplier
from fedsvd.privacy.record_level import PrivacyLedger

CPU = torch.device("cpu")
DELTA = 1e-5


def _model(tiny_bert: Path):
    model = build_lora_model(str(tiny_bert), 2, 4, 4.0, ("query", "value"), seed=0)
    # B starts at zero; give it values so that A receives gradients too in the clipping test.
    with torch.no_grad():
        for name, parameter in shared_parameters(model, train_head=True).items():
            if name.endswith("lora_B.weight"):
                parameter.normal_(0, 0.5)
    return model


def _tokens(count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, 25, (count, 12), generator=generator),
        "attention_mask": torch.ones(count, 12, dtype=torch.long),
        "labels": torch.randint(0, 2, (count,), generator=generator),
    }


def _trainable_keys(model, factors=("lora_A", "lora_B")) -> list[str]:
    keys = [k for k in shared_parameters(model, True) if any(f in k for f in factors) or "classifier" in k]
    return set_trainable(model, keys, train_head=True)


def test_without_noise_every_per_sample_gradient_is_clipped_to_clip_norm(tiny_bert: Path) -> None:
    # float64 so that updates of size lr * C / n are far above the parameters' rounding error.
    model = _model(tiny_bert).double()
    keys = _trainable_keys(model)
    tokens = _tokens(8)
    params = dict(shared_parameters(model, True))
    clip, lr, count = 1e-3, 1.0, len(tokens["labels"])

    # Independent reference: one backward pass per example, flat clipping over all trainable tensors.
    expected_sum = {k: torch.zeros_like(params[k]) for k in keys}
    norms = []
    for i in range(count):
        model.zero_grad(set_to_none=True)
        batch = {k: v[i : i + 1] for k, v in tokens.items() if k != "labels"}
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, tokens["labels"][i : i + 1])
        loss.backward()
        grads = {k: params[k].grad.detach().clone() for k in keys}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        norms.append(norm.item())
        for k in keys:
            expected_sum[k] += grads[k] * min(1.0, clip / (norm.item() + 1e-6))
    model.zero_grad(set_to_none=True)
    assert min(norms) > 10 * clip, "the test must actually clip"

    before = {k: params[k].detach().clone() for k in keys}
    ledger = PrivacyLedger("rdp")
    train_local(
        model, tokens, steps=1, lr=lr, sample_rate=1.0, seed=0, device=CPU,
        dp=DpSgdSettings(noise_multiplier=0.0, clip_norm=clip), ledger=ledger,
    )  # fmt: skip
    after = {k: params[k].detach().clone() for k in keys}

    total_update_sq = 0.0
    for k in keys:
        update = before[k] - after[k]
        expected = lr * expected_sum[k] / count
        assert torch.linalg.norm(update - expected) <= 1e-5 * torch.linalg.norm(expected), k
        total_update_sq += float((update**2).sum())
    # Each of the n clipped gradients has norm C, so the mean update can be at most lr * C.
    assert total_update_sq**0.5 <= lr * clip * (1 + 1e-4)


def test_lora_b_weights_change_after_a_dp_step(tiny_bert: Path) -> None:
    """Guards against the known silent failure where Opacus + PEFT leaves LoRA weights untouched."""
    model = build_lora_model(str(tiny_bert), 2, 4, 4.0, ("query", "value"), seed=0)
    keys = _trainable_keys(model, factors=("lora_B",))
    before = get_arrays(model, True)
    train_local(
        model, _tokens(64), steps=2, lr=0.5, sample_rate=0.25, seed=1, device=CPU,
        dp=DpSgdSettings(noise_multiplier=1.0, clip_norm=1.0), ledger=PrivacyLedger("rdp"),
    )  # fmt: skip
    after = get_arrays(model, True)
    b_keys = [k for k in keys if k.endswith("lora_B.weight")]
    assert b_keys
    for k in b_keys:
        assert not torch.equal(before[k], after[k]), k
    frozen_a = [k for k in before if k.endswith("lora_A.weight")]
    for k in frozen_a:
        assert torch.equal(before[k], after[k]), f"{k} is frozen and must not move"


def test_accountant_restored_across_rounds_equals_one_accountant(tiny_bert: Path) -> None:
    model = build_lora_model(str(tiny_bert), 2, 4, 4.0, ("query", "value"), seed=0)
    _trainable_keys(model, factors=("lora_B",))
    tokens = _tokens(100)
    sigma, q = 1.1, 0.1
    record = PrivacyLedger("rdp").to_record()
    epsilons = []
    for round_index in range(3):
        ledger = PrivacyLedger.from_record(record)  # what a client restores from its persistent state
        train_local(
            model, tokens, steps=5, lr=0.1, sample_rate=q, seed=round_index, device=CPU,
            dp=DpSgdSettings(sigma, 1.0), ledger=ledger,
        )  # fmt: skip
        record = ledger.to_record()
        epsilons.append(ledger.epsilon(DELTA))

    single = RDPAccountant()
    for _ in range(15):
        single.step(noise_multiplier=sigma, sample_rate=q)
    assert PrivacyLedger.from_record(record).steps == 15
    assert epsilons[-1] == pytest.approx(single.get_epsilon(DELTA, alphas=RDP_ORDERS), rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2], "epsilon is cumulative, never per round"

    independent = rdp.RdpAccountant()
    independent.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), 15)
    assert epsilons[-1] == pytest.approx(independent.get_epsilon(DELTA), rel=5e-3)


def test_empty_poisson_batch_makes_a_counted_noise_only_step(tiny_bert: Path) -> None:
    model = build_lora_model(str(tiny_bert), 2, 4, 4.0, ("query", "value"), seed=0)
    _trainable_keys(model, factors=("lora_B",))
    before = get_arrays(model, True)
    ledger = PrivacyLedger("rdp")
    # With q = 1e-4 and 20 examples, every batch is empty with probability > 99.8%.
    result = train_local(
        model, _tokens(20), steps=3, lr=0.5, sample_rate=1e-4, seed=0, device=CPU,
        dp=DpSgdSettings(1.0, 1.0), ledger=ledger,
    )  # fmt: skip
    assert result.examples_seen == 0
    assert ledger.steps == 3
    after = get_arrays(model, True)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_B.weight"))


def test_calibrated_noise_meets_the_target_epsilon() -> None:
    sigma = calibrate_noise_multiplier(6.0, DELTA, 0.02, 200, "rdp")
    spent = epsilon_of([(sigma, 0.02, 200)], DELTA, "rdp")
    assert 5.95 <= spent <= 6.0
    assert epsilon_of([(sigma * 0.9, 0.02, 200)], DELTA, "rdp") > 6.0
