"""Text classification data: one entry point, :func:`load_texts`, over the three sources, then splits and tokens.

Modules by role:

- :mod:`~fedsvd.data.dataset`: :class:`TextDataset` (what every source returns) and :class:`DataError`.
- :mod:`~fedsvd.data.files`: a user's ``.csv`` / ``.jsonl`` file; :mod:`~fedsvd.data.labels`: its label rule.
- :mod:`~fedsvd.data.hub`: GLUE and SNLI through Hugging Face ``datasets`` (or a local mirror).
- :mod:`~fedsvd.data.corpus`: the offline default corpus (Rotten Tomatoes), downloaded once and hash-pinned.
- :mod:`~fedsvd.data.splits`: the server's held-out set and the clients' partitions.
- :mod:`~fedsvd.data.tokens`: tokenisation, and the share of examples it truncates.

Every dataset is held in memory as an immutable :class:`TextDataset`; even the largest task (MNLI, ~400k
sentence pairs) is well under a hundred megabytes of text, so plain tuples keep splitting, partitioning and
caching per worker process trivial.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedsvd.data.corpus import ROTTEN_TOMATOES_SHA256, cache_dir, load_rotten_tomatoes, rotten_tomatoes_file
from fedsvd.data.dataset import SPLITS, DataError, Split, TextDataset
from fedsvd.data.files import LOCAL_SUFFIXES, load_file
from fedsvd.data.hub import HF_DATA_DIR_ENV, HUB_TASKS, HubTask, load_hub_task
from fedsvd.data.labels import MAX_CLASSES
from fedsvd.data.splits import PARTITION_SCHEMES, held_out_split, partition_indices, subset
from fedsvd.data.tokens import tokenize, truncation_share

__all__ = [
    "HF_DATA_DIR_ENV",
    "HUB_TASKS",
    "KNOWN_DATASETS",
    "MAX_CLASSES",
    "PARTITION_SCHEMES",
    "ROTTEN_TOMATOES_SHA256",
    "DataError",
    "HubTask",
    "TextDataset",
    "cache_dir",
    "held_out_split",
    "load_file",
    "load_hub_task",
    "load_texts",
    "partition_indices",
    "rotten_tomatoes_file",
    "subset",
    "tokenize",
    "truncation_share",
]

KNOWN_DATASETS: tuple[str, ...] = ("rotten_tomatoes", *HUB_TASKS)


def load_texts(dataset: str, split: Split = "train") -> TextDataset:
    """Load a text classification dataset by name or path.

    The federation trains on what ``split="train"`` returns and holds out a seeded share of it for the
    server, so every source needs only labelled training data (GLUE test splits have no labels).

    Parameters
    ----------
    dataset : str
        ``"rotten_tomatoes"`` (downloaded once, then cached; see :func:`rotten_tomatoes_file`); a hub task
        from :data:`HUB_TASKS`: ``"sst2"``, ``"qnli"``, ``"qqp"``, ``"mnli"``, ``"mnli_mismatched"`` (GLUE)
        or ``"snli"`` (read from the directory in ``$FEDSVD_HF_DATA_DIR`` if set, see :func:`load_hub_task`);
        or a path to a ``.csv`` or ``.jsonl`` file with a ``text`` column (or ``text_a`` and ``text_b`` for
        sentence pairs) and a ``label`` column (see :func:`load_file`). Labels are class ids ``0 .. K-1``
        (``1``, ``"1"`` and ``"1.0"`` are one class) or class names, numbered in sorted order (see
        :mod:`fedsvd.data.labels`).
    split : {"train", "eval"}
        ``"train"``: the labelled training split of a hub task, or all of a corpus or file. ``"eval"``: the
        split a hub task's published results use (``validation``; MNLI's ``validation_matched``, or
        ``validation_mismatched`` for ``"mnli_mismatched"``, which otherwise equals ``"mnli"``); other
        sources have none.

    Returns
    -------
    TextDataset
        All labelled examples, in file or split order.

    Raises
    ------
    DataError
        For an unknown name or split, a file that cannot be read or breaks the layout or the label rule, or a
        hub task that neither the mirror nor the hub can provide.
    """
    if split not in SPLITS:
        raise DataError(f"{dataset}: unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    task = HUB_TASKS.get(dataset)
    if task is not None:
        mirror = os.environ.get(HF_DATA_DIR_ENV)
        return load_hub_task(task, split, Path(mirror).expanduser() if mirror else None)
    path = Path(dataset).expanduser()
    if dataset != "rotten_tomatoes" and path.suffix.lower() not in LOCAL_SUFFIXES:
        allowed = ", ".join(KNOWN_DATASETS)
        raise DataError(f"unknown dataset {dataset!r}: expected one of {allowed}, or a path to a .csv or .jsonl file")
    if split != "train":
        raise DataError(f"{dataset}: has no evaluation split; only the hub tasks ({', '.join(HUB_TASKS)}) have one")
    return load_rotten_tomatoes() if dataset == "rotten_tomatoes" else load_file(path)
