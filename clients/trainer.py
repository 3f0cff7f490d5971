"""Local DP-SGD training with Opacus (no Flower here, so it can be tested on its own).

The pieces of Opacus's ``PrivacyEngine.make_private`` are assembled by hand for one reason: the engine
derives the sample rate from the loader as ``1 / len(loader)``, which is not ``batch / n_k``. Building the
Poisson loader, the grad-sample module, the DP optimizer and the accountant hook directly keeps the sample
rate that is accounted for exactly the one that is sampled with.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import TensorDataset

from fedsvd.model import trim_padding
from fedsvd.privacy.record_level import PrivacyLedger


@dataclass(frozen=True)
class DpSgdSettings:
    """Clipping and noise of one client; the noise multiplier is fixed for the whole run."""

    noise_multiplier: float
    clip_norm: float


@dataclass(frozen=True)
class LocalTrainingResult:
    mean_loss: float
    steps: int
    examples_seen: int


def _endless(loader: DPDataLoader) -> Iterator[list[torch.Tensor]]:
    while True:
        yield from loader


def train_local(
    model: torch.nn.Module,
    tokens: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
    sample_rate: float,
    seed: int,
    device: torch.device,
    dp: DpSgdSettings | None = None,
    ledger: PrivacyLedger | None = None,
    server_round: int | None = None,
) -> LocalTrainingResult:
    """Run ``steps`` steps of (DP-)SGD on the parameters of ``model`` that require grad.

    Batches are Poisson samples at ``sample_rate`` in both modes, so ``dp=None`` differs only by the
    missing clipping and noise. With ``dp`` set, every step, including one on an empty batch, is recorded
    in ``ledger``, which must hold this client's whole earlier history (and ``server_round`` is added to its
    rounds). Everything random (batches, noise, dropout) is drawn from ``seed`` alone, so a round re-run after
    a resume, in another process, trains exactly as the first time.
    """
    if dp is not None and ledger is None:
        raise ValueError("DP training needs the client's privacy ledger")
    keys = list(tokens)
    dataset = TensorDataset(*(tokens[key] for key in keys))
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=torch.Generator().manual_seed(seed))
    expected_batch_size = max(1, round(sample_rate * len(dataset)))

    model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: the method and config train nothing")
    optimizer: torch.optim.Optimizer = torch.optim.SGD(trainable, lr=lr)
    forward: torch.nn.Module = model
    accountant = None
    if dp is not None:
        assert ledger is not None
        forward = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        noise_generator = torch.Generator(device=device).manual_seed(seed + 1)
        optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clip_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=noise_generator,
        )
        accountant = ledger.new_accountant()
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))

    losses: list[float] = []
    seen = 0
    batches = _endless(loader)
    # Dropout draws from the global generator, whose state would otherwise depend on what this worker ran before.
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type):
        torch.manual_seed(seed + 2)
        try:
            for _ in range(steps):
                values = next(batches)
                batch = trim_padding({key: value.to(device) for key, value in zip(keys, values, strict=True)})
                labels = batch.pop("labels")
                optimizer.zero_grad(set_to_none=True)
                if len(labels) == 0:
                    _empty_step(optimizer, trainable, private=dp is not None)
                    continue
                logits = forward(**batch).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                seen += len(labels)
        finally:
            if isinstance(forward, GradSampleModule):
                # Unwrapping removes the hooks: the cached model is wrapped again next round.
                forward.to_standard_module()
            optimizer.zero_grad(set_to_none=True)
    if ledger is not None and accountant is not None:
        ledger.record(accountant, server_round)
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return LocalTrainingResult(mean_loss=mean_loss, steps=steps, examples_seen=seen)


def _empty_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], private: bool) -> None:
    """An empty Poisson batch is still a step of the mechanism: add noise only, and let it be accounted.

    BERT's forward cannot take a zero-length batch, so zero per-sample gradients are set by hand.
    """
    if not private:
        return
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()
