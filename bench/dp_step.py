"""Cost of privacy and of FedSVD's re-factorisation, as ratios measured side by side in one run.

1. One local DP-SGD step (Opacus hooks: per-sample gradients, clipping, noise) against the same step
   without DP, on the default model (all-MiniLM-L6-v2 + LoRA r=8 on query/value) and real review text.
2. FedSVD's thin re-factorisation (QR of B and A^T + SVD of the r x r core) against a full SVD of the
   d_out x d_in product, at the sizes of a RoBERTa-large layer.

Steps alternate between the two variants so that load on a shared machine hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from clients.trainer import DpSgdSettings, train_local
from fedsvd.data import held_out_split, load_texts, subset, tokenize
from fedsvd.methods.fedsvd import refactorize
from fedsvd.model import build_lora_model, load_tokenizer, set_trainable, shared_parameters
from fedsvd.privacy.record_level import PrivacyLedger

REPEATS = 5
BATCH = 32


def median_seconds(
    run: Callable[[], object],
    repeats: int = REPEATS,
    device: torch.device | None = None,
    before: Callable[[], object] | None = None,
) -> float:
    """Median wall time of ``repeats`` calls of ``run``, each after an untimed call of ``before`` if given; on CUDA
    the queued kernels are waited for before and after each call, so that a call is charged for exactly its own
    work."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def dp_step_seconds(
    model_name: str = "minilm",
    dataset: str = "rotten_tomatoes",
    device: torch.device | None = None,
    steps: int = 2,
) -> tuple[float, float]:
    """Median seconds of one local step without and with DP-SGD: LoRA r=8 on query/value and the head train,
    batches are Poisson samples of expected size ``BATCH`` from up to 2,000 examples at 64 tokens.

    Each timed call is one ``train_local`` of ``steps`` steps, so its set-up (loader, Opacus wrapping) is
    spread over them: few steps where a step is slow (CPU), more where it is fast (GPU).
    """
    device = torch.device("cpu") if device is None else device
    train, _ = held_out_split(load_texts(dataset), 0.1, seed=0)
    part = subset(train, range(min(2000, len(train))))
    tokens = tokenize(part, load_tokenizer(model_name), 64)
    model = build_lora_model(model_name, 2, 8, 8.0, ("query", "value"), seed=0, pooling="mean")
    trainable = [k for k in shared_parameters(model, True) if "lora_A" not in k]
    set_trainable(model, trainable, train_head=True)
    common = dict(steps=steps, lr=0.5, sample_rate=BATCH / len(part), seed=0, device=device)

    def plain() -> None:
        train_local(model, tokens, **common)

    def private() -> None:
        train_local(model, tokens, dp=DpSgdSettings(1.0, 2.0), ledger=PrivacyLedger("rdp"), **common)

    plain(), private()  # warm-up
    plain_times, private_times = [], []
    for _ in range(REPEATS):
        plain_times.append(median_seconds(plain, 1, device) / steps)
        private_times.append(median_seconds(private, 1, device) / steps)
    return statistics.median(plain_times), statistics.median(private_times)


def dp_step_ratio() -> None:
    p, d = dp_step_seconds()
    print(f"local step, batch {BATCH}: non-DP {p:.3f} s, DP-SGD {d:.3f} s, DP / non-DP = {d / p:.2f}x")


def refactorize_ratio(d_out: int = 1024, d_in: int = 1024, rank: int = 8) -> None:
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(d_out, rank, generator=generator)
    a = torch.randn(rank, d_in, generator=generator)

    def thin() -> None:
        refactorize(b, a)

    def full() -> None:
        u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
        _ = (u[:, :rank] * s[:rank]).float(), vh[:rank].float()

    thin(), full()
    t, f = median_seconds(thin), median_seconds(full)
    print(
        f"re-factorisation {d_out}x{d_in}, r={rank}: thin {t * 1e3:.2f} ms, full SVD {f * 1e3:.1f} ms, "
        f"full / thin = {f / t:.0f}x"
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    dp_step_ratio()
    refactorize_ratio()
