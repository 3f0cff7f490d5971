"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at its random initialisation, only B is federated."""

from __future__ import annotations

from typing import ClassVar

from fedsvd.methods.base import B_ONLY, FederatedLoraMethod


class FfaLora(FederatedLoraMethod):
    """Clients train B only and the server averages B; A never changes.

    Exact, because every client shares the same A: ``(sum_k p_k B_k) A == sum_k p_k B_k A``.
    """

    name: ClassVar[str] = "ffa"

    def trained_factors(self, server_round: int) -> frozenset[str]:
        """B in every round."""
        return B_ONLY
