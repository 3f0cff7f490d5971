"""RoLoRA (NeurIPS 2025): alternate between federating B and federating A.

Odd rounds train B with A frozen, even rounds train A with B frozen. In each round only one factor varies
across clients, so the average of the products equals the product of the averages: aggregation is exact
round by round, unlike FedAvg of both factors. Round 1 trains B because B starts at zero, where the
gradient of A vanishes.
"""

from __future__ import annotations

from typing import ClassVar

from fedsvd.methods.base import B_ONLY, FederatedLoraMethod

A_ONLY: frozenset[str] = frozenset({"A"})


class RoLora(FederatedLoraMethod):
    """Clients train B in odd rounds and A in even rounds; the server averages the trained half."""

    name: ClassVar[str] = "rolora"

    def trained_factors(self, server_round: int) -> frozenset[str]:
        """B in odd rounds (1, 3, ...), A in even rounds."""
        return B_ONLY if server_round % 2 == 1 else A_ONLY
