"""Splitting a dataset: the server's held-out set, the clients' partitions (flwr-datasets), subsets."""

from __future__ import annotations

import heapq
import logging
import warnings
from collections.abc import Sequence

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedsvd.data.dataset import DataError, TextDataset

__all__ = ["PARTITION_SCHEMES", "held_out_split", "partition_indices", "subset"]

logger = logging.getLogger(__name__)

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet")
# Dirichlet partitions smaller than this are resampled, so that each client can fill a few DP-SGD batches.
_TARGET_MIN_PARTITION_SIZE = 32


def subset(data: TextDataset, indices: Sequence[int]) -> TextDataset:
    """Select examples by index.

    Parameters
    ----------
    data : TextDataset
        The dataset to select from.
    indices : sequence of int
        Positions to keep, in the order wanted.

    Returns
    -------
    TextDataset
        A new dataset with the same ``num_labels`` and ``name``.
    """
    return TextDataset(
        texts=tuple(data.texts[i] for i in indices),
        labels=tuple(data.labels[i] for i in indices),
        num_labels=data.num_labels,
        name=data.name,
        texts_b=None if data.texts_b is None else tuple(data.texts_b[i] for i in indices),
    )


def held_out_split(data: TextDataset, eval_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Split off a stratified, seeded held-out set.

    Each class contributes ``round(eval_fraction * class size)`` examples to the held-out set, so the
    label mix of both parts matches the whole; both parts keep the original example order.

    Parameters
    ----------
    data : TextDataset
        The dataset to split.
    eval_fraction : float
        Fraction of each class that is held out, in (0, 1).
    seed : int
        Seed of the numpy generator; the same seed always gives the same split.

    Returns
    -------
    tuple of TextDataset
        ``(train, held_out)``, disjoint and together covering ``data``.

    Raises
    ------
    DataError
        If ``eval_fraction`` is outside (0, 1) or either part would be empty.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels, dtype=np.int64)
    held: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    # Classes in sorted order so that the generator's draws map to the same classes on every run.
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held.append(members[: round(eval_fraction * len(members))])
    held_idx = np.sort(np.concatenate(held))
    train_idx = np.setdiff1d(np.arange(len(data)), held_idx)
    if len(train_idx) == 0 or len(held_idx) == 0:
        raise DataError(
            f"{data.name}: eval_fraction {eval_fraction} of {len(data)} examples leaves "
            f"{len(train_idx)} for training and {len(held_idx)} held out; both must be non-empty"
        )
    return subset(data, train_idx.tolist()), subset(data, held_idx.tolist())


def _partition(partitioner: Partitioner, table: datasets.Dataset, num_partitions: int) -> list[list[int]]:
    partitioner.dataset = table
    return [sorted(partitioner.load_partition(pid)["index"]) for pid in range(num_partitions)]


def _dirichlet_partition(partitioner: DirichletPartitioner, table: datasets.Dataset) -> list[list[int]]:
    """The partitioner's draw as row positions. Its first ``load_partition`` draws every partition at once and
    keeps each as a list of row positions; those are read there instead of through a ``select`` from the table
    per partition, which costs 2-3 s at 1,000 clients (flwr-datasets is pinned: tests/test_data.py checks that
    both give the same partitions). In Arrow format the partitioner reads the labels as one array, not value by
    value (0.5 s for 10,000 labels)."""
    partitioner.dataset = table.with_format("arrow")
    partitioner.load_partition(0)
    draw = partitioner._partition_id_to_indices
    return [sorted(draw[pid]) for pid in range(partitioner.num_partitions)]


def _top_up(partitions: list[list[int]], min_size: int, seed: int) -> list[list[int]]:
    """Give every partition at least ``min_size`` examples, each taken at random from the partition that is
    the largest at that moment (ties: the lowest id), so that the draw's skew survives everywhere else."""
    rng = np.random.default_rng([seed, len(partitions), min_size])
    parts = [list(part) for part in partitions]
    largest = [(-len(part), pid) for pid, part in enumerate(parts)]
    heapq.heapify(largest)
    for pid in sorted(range(len(parts)), key=lambda k: (len(parts[k]), k)):
        while len(parts[pid]) < min_size:
            size, donor = heapq.heappop(largest)
            if -size != len(parts[donor]):  # a stale entry: the partition has grown since (it was topped up)
                heapq.heappush(largest, (-len(parts[donor]), donor))
                continue
            taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[pid].append(taken)
            heapq.heappush(largest, (-len(parts[donor]), donor))
    return [sorted(part) for part in parts]


def partition_indices(
    labels: Sequence[int], num_partitions: int, scheme: str, alpha: float, seed: int, min_size: int = 0
) -> list[list[int]]:
    """Split example indices into one partition per client.

    Parameters
    ----------
    labels : sequence of int
        Label of every example; partition ``k`` is a list of positions in this sequence.
    num_partitions : int
        Number of clients, between 1 and ``len(labels)``.
    scheme : str
        ``"iid"``: a seeded shuffle cut into equal shards (flwr-datasets ``IidPartitioner``).
        ``"dirichlet"``: per-class proportions drawn from Dir(``alpha``) (flwr-datasets
        ``DirichletPartitioner``); smaller ``alpha`` gives more label skew.
    alpha : float
        Concentration of the Dirichlet distribution; ignored for ``"iid"``.
    seed : int
        Seed for shuffling and Dirichlet draws; the same seed always gives the same partitions.
    min_size : int
        ``"dirichlet"`` only. 0: redraw until every partition has a few dozen examples (fewer on small data),
        and fail when no draw gives every partition one. Above 0: one draw, after which every partition
        below ``min_size`` is topped up with examples taken at random from the largest ones (``_top_up``):
        the only way to give a thousand clients data at a strong skew, since a draw over that many
        partitions leaves some empty.

    Returns
    -------
    list of list of int
        ``num_partitions`` sorted, disjoint, non-empty index lists that together cover ``range(len(labels))``.

    Raises
    ------
    DataError
        For an unknown scheme, a bad count or alpha, or a Dirichlet draw that leaves some client without data.
    """
    if scheme not in PARTITION_SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}: expected one of {', '.join(PARTITION_SCHEMES)}")
    n = len(labels)
    if not 1 <= num_partitions <= n:
        raise DataError(f"num_partitions must be between 1 and the {n} training examples, got {num_partitions}")
    # The "index" column carries each row's original position through the partitioners' shuffles and selects.
    table = datasets.Dataset.from_dict({"label": list(labels), "index": list(range(n))})

    if scheme == "iid":
        # IidPartitioner cuts contiguous shards and has no seed, so the seeded shuffle happens here.
        order = np.random.default_rng(seed).permutation(n)
        return _partition(IidPartitioner(num_partitions), table.select(order), num_partitions)

    if alpha <= 0:
        raise DataError(f"alpha must be positive for the dirichlet scheme, got {alpha}")
    if min_size > 0:
        if min_size * num_partitions > n:
            raise DataError(
                f"min_partition_size = {min_size} for {num_partitions} clients needs {min_size * num_partitions} "
                f"examples, more than the {n} for training; lower it or use fewer clients"
            )
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed, min_partition_size=0
        )
        return _top_up(_dirichlet_partition(partitioner, table), min_size, seed)
    # Aim for a few dozen examples per client, but never more than a quarter of a fair share: a stricter
    # minimum makes the partitioner's resampling (10 tries, then an error) fail on small data or alpha.
    min_size = max(1, min(_TARGET_MIN_PARTITION_SIZE, n // (4 * num_partitions)))
    while True:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            seed=seed,
            min_partition_size=min_size,
        )
        try:
            # The partitioner warns on every rejected draw; the outcome is handled (and logged) here instead.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return _dirichlet_partition(partitioner, table)
        except ValueError as exc:
            if min_size == 1:
                raise DataError(
                    f"dirichlet partitioning with alpha={alpha} left a client without data "
                    f"({n} examples, {num_partitions} partitions); increase alpha or use fewer partitions"
                ) from exc
            logger.info("no Dirichlet draw gave every client %d examples; relaxing to %d", min_size, min_size // 2)
            min_size //= 2
