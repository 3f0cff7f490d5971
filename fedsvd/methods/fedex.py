"""FedEx-LoRA (ACL 2025): FedAvg of the factors, plus the error it makes folded into the base weights.

FedAvg of A and B replaces the exact ``sum_k p_k B_k A_k`` by ``B̄ Ā``. FedEx-LoRA keeps the averaged
factors (so clients continue from a low-rank adapter) and adds the residual
``s * (sum_k p_k B_k A_k - B̄ Ā)`` to the frozen base weight, so that ``base + s B̄ Ā`` equals
``base + s sum_k p_k B_k A_k`` exactly. The downlink then carries the full-rank base weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from fedsvd.methods.base import (
    ArrayDict,
    ClientUpdate,
    FederatedLoraMethod,
    base_weight_key,
    lora_pairs,
    mean_of_products,
)


class FedExLora(FederatedLoraMethod):
    """Clients train A and B; the server averages both and folds the averaging error into the base.

    Parameters
    ----------
    scaling
        The LoRA scaling ``s = alpha / r`` that multiplies ``B @ A`` in the forward pass.
    """

    name: ClassVar[str] = "fedex"
    options: ClassVar[tuple[str, ...]] = ("scaling",)
    merges_into_base: ClassVar[bool] = True
    client_level_refusal: ClassVar[str | None] = (
        "its residual needs the mean of each client's own product B_k A_k, which the noised average of the "
        "factors does not determine"
    )

    def __init__(self, scaling: float = 1.0) -> None:
        if not scaling > 0:
            raise ValueError(f"scaling must be > 0, got {scaling!r}")
        self.scaling = scaling

    def _after_average(self, arrays: ArrayDict, updates: Sequence[ClientUpdate], server_round: int) -> ArrayDict:
        for a_key, b_key in lora_pairs(arrays):
            base_key = base_weight_key(a_key)
            base = arrays[base_key]
            averaged = arrays[b_key].to(torch.float64) @ arrays[a_key].to(torch.float64)
            residual = mean_of_products(updates, a_key, b_key) - averaged
            arrays[base_key] = (base.to(torch.float64) + self.scaling * residual).to(base.dtype)
        return arrays

    def __repr__(self) -> str:
        return f"FedExLora(scaling={self.scaling})"
