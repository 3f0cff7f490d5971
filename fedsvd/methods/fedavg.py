"""FedAvg of LoRA factors (FedIT, vanilla federated LoRA)."""

from __future__ import annotations

from typing import ClassVar

from fedsvd.methods.base import FederatedLoraMethod


class FedAvgLora(FederatedLoraMethod):
    """Clients train A and B; the server averages each factor separately.

    Inexact by design: the product of the averages ``B̄ Ā`` differs from the average of the products
    ``sum_k p_k B_k A_k`` as soon as clients' factors differ. Kept as the baseline that FedSVD fixes.
    """

    name: ClassVar[str] = "fedavg"
