"""What every federated LoRA method shares: key conventions, client uploads and example-weighted averaging.

A method is a small pure object. The server asks it which arrays clients upload in a round
(``uplink_keys``) and hands it the uploads to combine into the next global arrays (``aggregate``).
Methods differ in which LoRA factors clients train, in what happens after averaging, in whether the
server also owns the base weights of the adapted modules (``merges_into_base``: FLoRA, FedEx-LoRA) and in
which factors each client keeps for itself across rounds (``personal_factors``: FedSA-LoRA).
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

ArrayDict = dict[str, torch.Tensor]

LORA_A_SUFFIX = "lora_A.weight"
LORA_B_SUFFIX = "lora_B.weight"
# PEFT wraps each adapted nn.Linear and keeps the frozen original as ``<module>.base_layer``.
BASE_WEIGHT_SUFFIX = "base_layer.weight"

Factor = Literal["A", "B"]
BOTH_FACTORS: frozenset[str] = frozenset({"A", "B"})
B_ONLY: frozenset[str] = frozenset({"B"})


@dataclass(frozen=True)
class ClientUpdate:
    """What one client uploaded in one round.

    Attributes
    ----------
    arrays
        Only the arrays the client trained, by global key. Read-only: on the server they view the reply's own
        bytes (copying a round of 30 clients' uploads costs as much as averaging them), so a method computes
        new tensors and never writes into these.
    num_examples
        The client's number of training examples; sets its weight in the average.
    """

    arrays: Mapping[str, torch.Tensor]
    num_examples: int


def factor_of(key: str) -> Factor | None:
    """Which LoRA factor a key holds.

    Parameters
    ----------
    key
        A state-dict key.

    Returns
    -------
    ``"A"`` or ``"B"`` for a LoRA factor, ``None`` for anything else.
    """
    if key.endswith(LORA_A_SUFFIX):
        return "A"
    if key.endswith(LORA_B_SUFFIX):
        return "B"
    return None


def is_lora_factor(key: str) -> bool:
    """Whether a key holds a LoRA A or B matrix."""
    return factor_of(key) is not None


def is_base_weight(key: str) -> bool:
    """Whether a key holds the frozen base weight of an adapted module (server-owned, never uploaded)."""
    return key.endswith(BASE_WEIGHT_SUFFIX)


def base_weight_key(a_key: str) -> str:
    """The base-weight key of the module that a LoRA A key belongs to."""
    return a_key[: -len(LORA_A_SUFFIX)] + BASE_WEIGHT_SUFFIX


def lora_pairs(keys: Iterable[str]) -> list[tuple[str, str]]:
    """Match every LoRA A key with the B key of the same module.

    Parameters
    ----------
    keys
        State-dict keys; keys that are not LoRA factors are ignored.

    Returns
    -------
    ``(A key, B key)`` per adapted module, sorted by module.

    Raises
    ------
    ValueError
        If a module has an A without its B or a B without its A.
    """
    a_by_module: dict[str, str] = {}
    b_by_module: dict[str, str] = {}
    for key in keys:
        factor = factor_of(key)
        if factor == "A":
            a_by_module[key[: -len(LORA_A_SUFFIX)]] = key
        elif factor == "B":
            b_by_module[key[: -len(LORA_B_SUFFIX)]] = key
    unpaired = sorted(a_by_module.keys() ^ b_by_module.keys())
    if unpaired:
        orphans = [a_by_module.get(module) or b_by_module[module] for module in unpaired]
        raise ValueError(f"LoRA factors without their partner: {', '.join(orphans)}")
    return [(a_by_module[module], b_by_module[module]) for module in sorted(a_by_module)]


def example_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """Aggregation weights ``p_k = n_k / sum_j n_j``.

    Parameters
    ----------
    updates
        The uploads of this round.

    Returns
    -------
    A float64 vector with one weight per update, summing to one.

    Raises
    ------
    ValueError
        If there are no updates or a client reports a non-positive number of examples.
    """
    if not updates:
        raise ValueError("cannot aggregate zero client updates")
    counts = [update.num_examples for update in updates]
    bad = [count for count in counts if count <= 0]
    if bad:
        raise ValueError(f"every client needs a positive num_examples, got {bad}")
    weights = torch.tensor(counts, dtype=torch.float64)
    return weights / weights.sum()


def weighted_mean(updates: Sequence[ClientUpdate]) -> ArrayDict:
    """Example-weighted element-wise mean of every uploaded array.

    Parameters
    ----------
    updates
        The uploads of this round; all must carry the same keys with the same shapes.

    Returns
    -------
    The mean per key, as float32 (accumulated in float64 so that many clients lose no precision).

    Raises
    ------
    ValueError
        If there are no updates, a count is non-positive, or key sets or shapes differ (naming the key).
    """
    weights = example_weights(updates)
    reference = updates[0].arrays
    for index, update in enumerate(updates[1:], start=1):
        missing = reference.keys() - update.arrays.keys()
        extra = update.arrays.keys() - reference.keys()
        if missing or extra:
            raise ValueError(
                f"update {index} uploads different keys than update 0: "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        for key, array in update.arrays.items():
            if array.shape != reference[key].shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: update {index} has {tuple(array.shape)}, "
                    f"update 0 has {tuple(reference[key].shape)}"
                )
    mean: ArrayDict = {}
    for key, first in reference.items():
        # Scratch buffers take every intermediate, so that no client costs a fresh temporary (at 30 clients those
        # cost as much as the arithmetic); the arithmetic stays that of sum_k p_k * float64(u_k).
        scaled = torch.empty(first.shape, dtype=torch.float64, device=first.device)
        total = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for weight, update in zip(weights.tolist(), updates, strict=True):
            total.add_(scaled.copy_(update.arrays[key]).mul_(weight))
        mean[key] = total.to(torch.float32)
    return mean


def mean_of_products(updates: Sequence[ClientUpdate], a_key: str, b_key: str) -> torch.Tensor:
    """The exact aggregate update of one module, ``sum_k p_k B_k @ A_k``, in float64.

    This is the full-rank ``d_out x d_in`` matrix that averaging the clients' dense updates would give;
    the rules that fold it (or its residual) into the base weights need it, the others never form it.
    """
    weights = example_weights(updates)
    total: torch.Tensor | None = None
    for weight, update in zip(weights.tolist(), updates, strict=True):
        product = weight * (update.arrays[b_key].to(torch.float64) @ update.arrays[a_key].to(torch.float64))
        total = product if total is None else total + product
    assert total is not None  # example_weights refuses an empty round
    return total


class FederatedLoraMethod(ABC):
    """A server-side aggregation rule for LoRA adapters.

    Subclasses set ``name``, choose the factors clients train with ``trained_factors`` and may
    post-process the average in ``_after_average``. Keys that are neither LoRA factors nor base weights
    (e.g. a trainable classifier head) are always trained, uploaded and averaged. Base weights, when the
    method owns them, are never uploaded: only ``_after_average`` changes them.
    """

    name: ClassVar[str]
    # Constructor keyword arguments; lets the registry pass each method only the options it takes.
    options: ClassVar[tuple[str, ...]] = ()
    # True: the global arrays include the base weight of every adapted module, and the downlink carries them.
    merges_into_base: ClassVar[bool] = False
    # Factors each client keeps from its own last round instead of taking the server's (personalisation).
    personal_factors: ClassVar[frozenset[str]] = frozenset()
    # Why the method cannot run under client-level DP, in a clause (its server step needs each client's own
    # upload, not only their privatised average); None: it can.
    client_level_refusal: ClassVar[str | None] = None

    def trained_factors(self, server_round: int) -> frozenset[str]:
        """Which LoRA factors (a subset of ``{"A", "B"}``) clients train in ``server_round``."""
        return BOTH_FACTORS

    def uplink_keys(self, global_keys: Iterable[str], server_round: int) -> set[str]:
        """The global keys every client uploads in ``server_round``.

        Parameters
        ----------
        global_keys
            Keys of the global trainable arrays.
        server_round
            The round, counted from 1 as in Flower.

        Returns
        -------
        The LoRA factors that are trained this round plus every key that is neither a LoRA factor nor a
        base weight.
        """
        trained = self.trained_factors(server_round)
        return {
            key
            for key in global_keys
            if not is_base_weight(key) and ((factor := factor_of(key)) is None or factor in trained)
        }

    def prepare(self, global_arrays: ArrayDict, server_round: int) -> None:  # noqa: B027 (an optional hook)
        """Work of ``server_round``'s aggregate that depends only on the arrays the server sends, done while the
        clients train so that less is left once their replies are in. ``aggregate`` gives the same result
        whether this ran or not; by default there is no such work."""

    def aggregate(self, global_arrays: ArrayDict, updates: Sequence[ClientUpdate], server_round: int) -> ArrayDict:
        """Combine this round's uploads into the next global arrays.

        Parameters
        ----------
        global_arrays
            The arrays the server sent this round; not modified.
        updates
            One upload per client, each carrying exactly ``uplink_keys(global_arrays, server_round)``.
        server_round
            The round, counted from 1 as in Flower.

        Returns
        -------
        A new dict: uploaded keys hold the weighted mean (in the global array's dtype) after the method's
        post-processing; keys that were not uploaded are the very tensors of ``global_arrays``, unchanged.

        Raises
        ------
        ValueError
            If an update uploads other keys than expected, shapes disagree, or counts are invalid.
        """
        expected = self.uplink_keys(global_arrays, server_round)
        for index, update in enumerate(updates):
            self._check_keys(expected, update.arrays, server_round, f"update {index}")
        return self._after_average(self._with(global_arrays, weighted_mean(updates)), updates, server_round)

    def aggregate_noised(self, global_arrays: ArrayDict, noised: ArrayDict, server_round: int) -> ArrayDict:
        """The next global arrays from the privatised average of this round's uploads (client-level DP,
        ``fedsvd.privacy.client_level.noised_average``): the method's own server step applied to that average
        alone, so that everything it computes is post-processing.

        Raises
        ------
        ValueError
            If the method's server step needs each client's upload (``client_level_refusal``), or ``noised``
            holds other keys than the round's uploads.
        """
        if self.client_level_refusal is not None:
            raise ValueError(f"method {self.name!r} cannot run under client-level DP: {self.client_level_refusal}")
        self._check_keys(self.uplink_keys(global_arrays, server_round), noised, server_round, "the noised average")
        return self._after_average(self._with(global_arrays, noised), (), server_round)

    def _check_keys(
        self, expected: set[str], uploaded: Mapping[str, torch.Tensor], server_round: int, what: str
    ) -> None:
        if uploaded.keys() != expected:
            missing = sorted(expected - uploaded.keys())
            extra = sorted(uploaded.keys() - expected)
            raise ValueError(
                f"method {self.name!r}, round {server_round}: {what} must hold exactly the "
                f"expected keys; missing {missing}, unexpected {extra}"
            )

    @staticmethod
    def _with(global_arrays: ArrayDict, mean: Mapping[str, torch.Tensor]) -> ArrayDict:
        """The global arrays with the averaged keys replaced (in each global array's dtype and device)."""
        arrays = dict(global_arrays)
        for key, value in mean.items():
            target = global_arrays[key]
            if value.shape != target.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: uploads have {tuple(value.shape)}, "
                    f"the global array has {tuple(target.shape)}"
                )
            arrays[key] = value.to(dtype=target.dtype, device=target.device)
        return arrays

    def _after_average(self, arrays: ArrayDict, updates: Sequence[ClientUpdate], server_round: int) -> ArrayDict:
        """Post-process the averaged arrays (``updates`` for rules that need each client's factors); the
        default keeps them as they are."""
        return arrays


# Largest change a single upload may make, as a multiple of the round's lower-median change. Under DP-SGD every
# client runs the same number of steps with the same clip norm and learning rate, so honest changes differ by
# small factors (data skew, noise); 10x leaves them alone while a client sending values 10^6 times larger than
# the others moves the average by at most p_k * 10 * median, as if it had trained ten times harder.
UPDATE_NORM_BOUND = 10.0


def change_norm(sent: Mapping[str, torch.Tensor], update: ClientUpdate) -> float:
    """The norm of an upload's change (upload minus what was sent, over all its arrays as one vector).

    One pass over the upload, key by key (the whole change at once would double the upload's memory). NaN or
    infinity in the upload makes the norm non-finite, and so does a change too large for its dtype: the caller
    tells the two apart (``all_finite``) and scales such a change to nothing.
    """
    square = sum(float(torch.linalg.vector_norm(value - sent[key])) ** 2 for key, value in update.arrays.items())
    return math.sqrt(square)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. NaN and infinities make the sum non-finite, so a finite sum (one fast pass)
    settles it; only a non-finite one, which may also be an overflow of large finite values, is checked value by
    value."""
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def bound_update_norms(
    sent: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    norms: Sequence[float],
    factor: float = UPDATE_NORM_BOUND,
) -> tuple[list[ClientUpdate], list[float]]:
    """Scale every client's change (upload minus what it was sent, over all its arrays as one vector; its norm
    from ``change_norm``) down to at most ``factor`` times the lower median of the round's change norms. An
    infinite norm (a change too large for its dtype) is scaled to nothing.

    The lower median stays an honest client's norm while fewer than half of the clients are outliers (with two
    clients: the smaller one). A single client is never scaled: there is nothing to compare it with.

    Returns
    -------
    The bounded updates (unscaled ones are the very objects passed in) and each update's scale (1.0: untouched).
    """
    if len(updates) < 2:
        return list(updates), [1.0] * len(updates)
    bound = factor * sorted(norms)[(len(norms) - 1) // 2]
    bounded, scales = [], []
    for update, norm in zip(updates, norms, strict=True):
        if norm <= bound:
            bounded.append(update)
            scales.append(1.0)
            continue
        scale = bound / norm
        arrays = {
            key: (sent[key].to(torch.float64) + scale * (value.to(torch.float64) - sent[key].to(torch.float64))).to(
                value.dtype
            )
            for key, value in update.arrays.items()
        }
        bounded.append(ClientUpdate(arrays, update.num_examples))
        scales.append(scale)
    return bounded, scales
