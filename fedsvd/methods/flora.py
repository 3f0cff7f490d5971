"""FLoRA (NeurIPS 2024): stack the clients' adapters, merge them into the base weights, start afresh.

Stacking the clients' ``B_k`` side by side and their ``p_k A_k`` on top of each other gives a rank
``sum_k r_k`` adapter whose product is exactly ``sum_k p_k B_k A_k``; FLoRA merges that product into the
frozen base weight of the module and hands every client a fresh LoRA (random A, B = 0) for the next round.
The price is the downlink: every round it carries the full-rank base weights of the adapted modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from fedsvd.methods.base import (
    ArrayDict,
    ClientUpdate,
    FederatedLoraMethod,
    base_weight_key,
    lora_pairs,
    mean_of_products,
)


def fresh_lora_a(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A new A as PEFT initialises it: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0).mul_(bound)


class FLora(FederatedLoraMethod):
    """Clients train A and B of a fresh adapter; the server merges ``s * sum_k p_k B_k A_k`` into the base.

    Parameters
    ----------
    scaling
        The LoRA scaling ``s = alpha / r`` that multiplies ``B @ A`` in the forward pass.
    seed
        Seeds the fresh A of every round (one independent stream per round), so runs are reproducible.
    """

    name: ClassVar[str] = "flora"
    options: ClassVar[tuple[str, ...]] = ("scaling", "seed")
    merges_into_base: ClassVar[bool] = True
    client_level_refusal: ClassVar[str | None] = (
        "its merge adds each client's own product B_k A_k to the base weights (the stacked factors), which the "
        "noised average of the factors does not determine"
    )

    def __init__(self, scaling: float = 1.0, seed: int = 0) -> None:
        if not scaling > 0:
            raise ValueError(f"scaling must be > 0, got {scaling!r}")
        self.scaling = scaling
        self.seed = seed

    def _after_average(self, arrays: ArrayDict, updates: Sequence[ClientUpdate], server_round: int) -> ArrayDict:
        # One independent stream per (run seed, round): the fresh adapters never repeat and always reproduce.
        round_seed = int(np.random.SeedSequence([self.seed, server_round]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(round_seed)
        for a_key, b_key in lora_pairs(arrays):
            base_key = base_weight_key(a_key)
            base = arrays[base_key]
            merged = base.to(torch.float64) + self.scaling * mean_of_products(updates, a_key, b_key)
            arrays[base_key] = merged.to(base.dtype)
            arrays[a_key] = fresh_lora_a(arrays[a_key].shape, generator).to(arrays[a_key].dtype)
            arrays[b_key] = torch.zeros_like(arrays[b_key])
        return arrays

    def __repr__(self) -> str:
        return f"FLora(scaling={self.scaling}, seed={self.seed})"
