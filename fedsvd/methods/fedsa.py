"""FedSA-LoRA (ICLR 2025): share A, keep B personal.

The paper's observation is that A learns what is general across clients and B what is client-specific.
Clients train both factors; the server averages A, which every client adopts, while each client keeps its
own B from one round to the next (client state that survives rounds, like its privacy accountant).

Clients also send B, but only so that the server can report a global model (global A with the averaged B)
on its held-out set; no client ever trains from the averaged B once it has its own (a client that has not
trained yet starts from the server's B, which is zero in round 1). The personalised
score (each client's own B with the global A, on a held-out slice of its own data) is the one the method
is designed for.
"""

from __future__ import annotations

from typing import ClassVar

from fedsvd.methods.base import B_ONLY, FederatedLoraMethod


class FedSaLora(FederatedLoraMethod):
    """Clients train A and B; A is averaged and shared, B stays with each client."""

    name: ClassVar[str] = "fedsa"
    personal_factors: ClassVar[frozenset[str]] = B_ONLY
