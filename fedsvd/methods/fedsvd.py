"""FedSVD (Lee et al., NeurIPS 2025): FFA-LoRA plus a periodic SVD re-factorisation of each adapter.

Clients train B against the A the server sent; after averaging B the server rewrites every product
``B̄ A`` as ``(U_r S_r) V_r^T``. The product is unchanged (so aggregation stays exact), while A moves to the
principal directions of the aggregate update and keeps orthonormal rows, which bounds B's per-sample
gradient norm under DP-SGD. The rewrite is post-processing of privatised uploads and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from fedsvd.methods.base import B_ONLY, ArrayDict, ClientUpdate, FederatedLoraMethod, lora_pairs


def refactorize(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite ``B @ A`` as ``B_new @ A_new`` with ``A_new`` orthonormal rows, by a thin SVD.

    With ``B = Q1 R1`` and ``A^T = Q2 R2`` (reduced QR), ``B A = Q1 (R1 R2^T) Q2^T``, so the SVD of the
    small core ``R1 R2^T = Uk S Vk^T`` gives the SVD of the product: ``U = Q1 Uk``, ``V = Q2 Vk``. The
    ``d_out x d_in`` product is never formed: the cost is O((d_out + d_in) r^2) instead of
    O(d_out d_in min(d_out, d_in)) for a dense SVD.

    Parameters
    ----------
    B
        ``d_out x r`` LoRA B.
    A
        ``r x d_in`` LoRA A.

    Returns
    -------
    B_new, A_new
        ``B_new = U_r S_r`` (``d_out x r``, columns by descending singular value) and ``A_new = V_r^T``
        (``r x d_in``) with ``B_new @ A_new == B @ A`` up to rounding and ``A_new @ A_new.T == I_r``. Where
        the product has fewer than ``r`` singular directions (``B = 0``, rank deficiency, ``r > d_out``),
        the remaining rows of ``A_new`` complete an orthonormal basis and the matching columns of ``B_new``
        are zero. Only when ``r > d_in`` can no ``r`` rows be orthonormal: the rows past ``d_in`` are then
        zero and ``A_new`` has orthonormal columns instead. Each output keeps its input's dtype.

    Raises
    ------
    ValueError
        If the inputs are not matrices with a shared rank ``r``.
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected B (d_out x r) and A (r x d_in), got {tuple(B.shape)} and {tuple(A.shape)}")
    rank = A.shape[0]
    # float64 because the Q factors and the core SVD lose orthogonality quickly in float32.
    q1, r1 = torch.linalg.qr(B.to(torch.float64))
    q2, r2 = torch.linalg.qr(A.to(torch.float64).T)
    # full_matrices=True: the extra right singular vectors span the rest of range(Q2), which completes
    # A_new's rows when the product has fewer than min(r, d_in) singular directions (e.g. r > d_out).
    uk, s, vkh = torch.linalg.svd(r1 @ r2.T, full_matrices=True)
    a_new = vkh @ q2.T
    b_new = torch.zeros(B.shape[0], a_new.shape[0], dtype=torch.float64, device=B.device)
    b_new[:, : s.shape[0]] = (q1 @ uk[:, : s.shape[0]]) * s
    if a_new.shape[0] < rank:
        # r > d_in: R^d_in holds at most d_in orthonormal rows, so the rest stay zero (and so does B's part).
        a_new = torch.cat([a_new, a_new.new_zeros(rank - a_new.shape[0], A.shape[1])])
        b_new = torch.cat([b_new, b_new.new_zeros(B.shape[0], rank - b_new.shape[1])], dim=1)
    return b_new.to(B.dtype), a_new.to(A.dtype)


class FedSvd(FederatedLoraMethod):
    """Clients train B only; the server averages B and, when due, re-factorises every adapter.

    Parameters
    ----------
    svd_every
        Re-factorise every this many rounds; 0 never does, which makes the method exactly FFA-LoRA.
    svd_warmup
        Rounds before the first re-factorisation.

    Raises
    ------
    ValueError
        If either option is not a non-negative integer.
    """

    name: ClassVar[str] = "fedsvd"
    options: ClassVar[tuple[str, ...]] = ("svd_every", "svd_warmup")

    def __init__(self, svd_every: int = 1, svd_warmup: int = 0) -> None:
        for option, value in (("svd_every", svd_every), ("svd_warmup", svd_warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{option} must be an integer >= 0, got {value!r}")
        self.svd_every = svd_every
        self.svd_warmup = svd_warmup

    def trained_factors(self, server_round: int) -> frozenset[str]:
        """B in every round; A changes only through the server's re-factorisation."""
        return B_ONLY

    def svd_due(self, server_round: int) -> bool:
        """Whether the server re-factorises after aggregating ``server_round`` (counted from 1)."""
        return (
            self.svd_every > 0
            and server_round > self.svd_warmup
            and (server_round - self.svd_warmup) % self.svd_every == 0
        )

    def _after_average(self, arrays: ArrayDict, updates: Sequence[ClientUpdate], server_round: int) -> ArrayDict:
        if not self.svd_due(server_round):
            return arrays
        for a_key, b_key in lora_pairs(arrays):
            arrays[b_key], arrays[a_key] = refactorize(arrays[b_key], arrays[a_key])
        return arrays

    def __repr__(self) -> str:
        return f"FedSvd(svd_every={self.svd_every}, svd_warmup={self.svd_warmup})"
