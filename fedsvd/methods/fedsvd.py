"""FedSVD (Lee et al., NeurIPS 2025): FFA-LoRA plus a periodic SVD re-factorisation of each adapter.

Clients train B against the A the server sent; after averaging B the server rewrites every product
``B̄ A`` as ``(U_r S_r) V_r^T``. The product is unchanged (so aggregation stays exact), while A moves to the
principal directions of the aggregate update and keeps orthonormal rows, which bounds B's per-sample
gradient norm under DP-SGD. The rewrite is post-processing of privatised uploads and costs no privacy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedsvd.methods.base import B_ONLY, ArrayDict, ClientUpdate, FederatedLoraMethod, lora_pairs

# The Gram route squares A's condition number: beyond these (by working dtype) its A_new would fall short of
# orthonormal (by about condition x machine epsilon), and the module goes through QR in float64 instead.
_GRAM_CONDITION_LIMIT = {torch.float32: 1e2, torch.float64: 1e6}

Factors = tuple[torch.Tensor, torch.Tensor]


def refactorize(B: torch.Tensor, A: torch.Tensor) -> Factors:
    """Rewrite ``B @ A`` as ``B_new @ A_new`` with ``A_new`` orthonormal rows, by a thin SVD.

    The ``d_out x d_in`` product is never formed: everything costs O((d_out + d_in) r^2) instead of
    O(d_out d_in min(d_out, d_in)) for a dense SVD. See ``refactorize_all`` for how.

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
        are zero (up to rounding). Only when ``r > d_in`` can no ``r`` rows be orthonormal: the rows past
        ``d_in`` are then zero and ``A_new`` has orthonormal columns instead. Each output keeps its input's
        dtype; float64 inputs are computed in float64 throughout, the others in float32 with the small r x r
        algebra in float64.

    Raises
    ------
    ValueError
        If the inputs are not matrices with a shared rank ``r``.
    """
    return refactorize_all([(B, A)])[0]


@dataclass(frozen=True)
class _GramGroup:
    """Pairs whose A share shape, working dtype and device, with what the Gram route needs from A alone."""

    indices: list[int]  # the pairs' positions
    a: torch.Tensor  # their A, stacked (n x r x d_in), in the working dtype
    lower: torch.Tensor  # Cholesky factors of A A^T (n x r x r, float64); the identity where not usable
    usable: list[bool]  # False: A is too ill-conditioned for the Gram route, and the pair goes through QR


@dataclass(frozen=True)
class PreparedA:
    """The A side of ``refactorize_all`` for a list of A factors (``prepare_a``)."""

    factors: tuple[torch.Tensor, ...]  # the very tensors it was made from
    groups: tuple[_GramGroup, ...]


def prepare_a(factors: Sequence[torch.Tensor]) -> PreparedA:
    """What ``refactorize_all`` needs from the A factors alone: their Cholesky factors and condition checks.

    FedSVD's clients never change A, so the server can make this from the A it sends while the clients train,
    and only the B side is left once their replies are in. Pairs with ``r > d_in`` are left to QR.
    """
    keyed: dict[tuple[torch.Size, torch.dtype, torch.device], list[int]] = {}
    for index, a in enumerate(factors):
        if a.shape[0] <= a.shape[1]:
            work = torch.float64 if a.dtype == torch.float64 else torch.float32
            keyed.setdefault((a.shape, work, a.device), []).append(index)
    groups = []
    for (_, work, _), indices in keyed.items():
        a = torch.stack([factors[i].to(work) for i in indices])
        gram = (a @ a.mT).to(torch.float64)
        lower, info = torch.linalg.cholesky_ex(gram)
        eigenvalues = torch.linalg.eigvalsh(gram)
        usable = (info == 0) & (eigenvalues[:, -1] <= _GRAM_CONDITION_LIMIT[work] * eigenvalues[:, 0])
        identity = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
        lower = torch.where(usable[:, None, None], lower, identity)  # keeps the batch finite; those pairs use QR
        groups.append(_GramGroup(indices, a, lower, usable.tolist()))
    return PreparedA(tuple(factors), tuple(groups))


def refactorize_all(pairs: list[Factors], prepared: PreparedA | None = None) -> list[Factors]:
    """``refactorize`` of every ``(B, A)`` pair of a model at once.

    The usual module (``r <= min(d_out, d_in)``, A well-conditioned, as FedSVD's own orthonormal A always is)
    goes through r x r Gram matrices: with ``A A^T = L L^T`` (Cholesky) and ``L^T (B^T B) L = V S^2 V^T``,
    ``B A = (B L V) (V^T L^-1 A)``, where ``V^T L^-1 A`` has orthonormal rows and ``B L V`` orthogonal columns
    whose norms are the singular values. The product is exact whatever B is. Once L is known (``prepare_a``)
    that is three thin matrix products per module: B's Gram matrix, ``B (L V)`` and ``(V^T L^-1) A``, the
    last batched over modules of one shape. The small factorisations of a group run as one batch. Other
    modules go through reduced QR (``_by_qr``).

    ``prepared`` is ``prepare_a`` of exactly these A tensors, made earlier; it is made here when it is None
    or was made from other tensors, so the result is the same either way.
    """
    for B, A in pairs:
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"expected B (d_out x r) and A (r x d_in), got {tuple(B.shape)} and {tuple(A.shape)}")
    # float64 anywhere in a pair means float64 throughout (A.to returns A itself when nothing changes).
    work_pairs = [(B, A.to(torch.float64) if B.dtype == torch.float64 else A) for B, A in pairs]
    factors = [A for _, A in work_pairs]
    if (
        prepared is None
        or len(prepared.factors) != len(factors)
        or any(made is not given for made, given in zip(prepared.factors, factors, strict=True))
    ):
        prepared = prepare_a(factors)
    results: list[Factors | None] = [None] * len(pairs)
    for group in prepared.groups:
        work = group.a.dtype
        b = [work_pairs[i][0].to(work) for i in group.indices]
        gram_b = torch.stack([x.T @ x for x in b]).to(torch.float64)
        _, vectors = torch.linalg.eigh(group.lower.mT @ gram_b @ group.lower)
        vectors = vectors.flip(-1)  # eigh sorts ascending; B's columns go by descending singular value
        to_b = (group.lower @ vectors).to(work)
        to_a = torch.linalg.solve_triangular(group.lower.mT, vectors, upper=True).mT.to(work)  # V^T L^-1
        a_new = to_a @ group.a
        for k, index in enumerate(group.indices):
            # With r > d_out the product has fewer than r singular directions: QR completes A_new's rows.
            if group.usable[k] and b[k].shape[0] >= b[k].shape[1]:
                results[index] = (b[k] @ to_b[k], a_new[k])
    out = []
    for (B, A), factors_new in zip(pairs, results, strict=True):
        b_new, a_new = factors_new if factors_new is not None else _by_qr(B.to(torch.float64), A.to(torch.float64))
        out.append((b_new.to(B.dtype), a_new.to(A.dtype)))
    return out


def _by_qr(b: torch.Tensor, a: torch.Tensor) -> Factors:
    """The SVD of ``b @ a`` for any shapes: with ``b = Q1 R1`` and ``a^T = Q2 R2`` (reduced QR),
    ``b a = Q1 (R1 R2^T) Q2^T``, so the SVD of the small core ``R1 R2^T = Uk S Vk^T`` gives the SVD of the
    product: ``U = Q1 Uk``, ``V = Q2 Vk``."""
    rank = a.shape[0]
    q1, r1 = torch.linalg.qr(b)
    q2, r2 = torch.linalg.qr(a.T)
    # full_matrices=True: the extra right singular vectors span the rest of range(Q2), which completes
    # A_new's rows when the product has fewer than min(r, d_in) singular directions (e.g. r > d_out).
    uk, s, vkh = torch.linalg.svd(r1 @ r2.T, full_matrices=True)
    a_new = vkh @ q2.T
    b_new = torch.zeros(b.shape[0], a_new.shape[0], dtype=torch.float64, device=b.device)
    b_new[:, : s.shape[0]] = (q1 @ uk[:, : s.shape[0]]) * s
    if a_new.shape[0] < rank:
        # r > d_in: R^d_in holds at most d_in orthonormal rows, so the rest stay zero (and so does B's part).
        a_new = torch.cat([a_new, a_new.new_zeros(rank - a_new.shape[0], a.shape[1])])
        b_new = torch.cat([b_new, b_new.new_zeros(b.shape[0], rank - b_new.shape[1])], dim=1)
    return b_new, a_new


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
        self._prepared: PreparedA | None = None  # the A side of the coming re-factorisation

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

    def prepare(self, global_arrays: ArrayDict, server_round: int) -> None:
        """The A side of the round's re-factorisation (``prepare_a``): clients do not change A. It is used
        only if the aggregate's A are the very tensors it was made from."""
        self._prepared = None
        if self.svd_due(server_round):
            self._prepared = prepare_a([global_arrays[a_key] for a_key, _ in lora_pairs(global_arrays)])

    def _after_average(self, arrays: ArrayDict, updates: Sequence[ClientUpdate], server_round: int) -> ArrayDict:
        prepared, self._prepared = self._prepared, None
        if not self.svd_due(server_round):
            return arrays
        pairs = lora_pairs(arrays)
        rewritten = refactorize_all([(arrays[b_key], arrays[a_key]) for a_key, b_key in pairs], prepared)
        for (a_key, b_key), (b_new, a_new) in zip(pairs, rewritten, strict=True):
            arrays[b_key], arrays[a_key] = b_new, a_new
        return arrays

    def __repr__(self) -> str:
        return f"FedSvd(svd_every={self.svd_every}, svd_warmup={self.svd_warmup})"
