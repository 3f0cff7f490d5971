"""Hugging Face hub tasks (GLUE, SNLI), from the hub or from a local ``save_to_disk`` mirror."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets

from fedsvd.data.dataset import DataError, Split, TextDataset

__all__ = ["HF_DATA_DIR_ENV", "HUB_TASKS", "HubTask", "load_hub_task"]

logger = logging.getLogger(__name__)

# Machines without the hub (air-gapped clusters, containers) read save_to_disk copies from here instead.
HF_DATA_DIR_ENV = "FEDSVD_HF_DATA_DIR"
# The hub's convention for "no gold label": SNLI pairs the annotators did not agree on, every GLUE test row.
_NO_LABEL = -1


@dataclass(frozen=True)
class HubTask:
    """Where a hub classification task lives and which of its columns and splits this project uses.

    Parameters
    ----------
    name : str
        The name a config uses (``dataset = "..."``); also the :class:`TextDataset` name.
    hub_id : str
        Hugging Face dataset repository.
    config : str
        Config (subset) of the repository.
    text_columns : tuple of str
        One column for single-sentence tasks, two for sentence pairs (then encoded as pairs by :func:`tokenize`).
    num_labels : int
        Classes of the task.
    train_split : str
        Labelled split the federation is built from: clients' partitions and the server's held-out share.
    eval_split : str
        Labelled split that GLUE and SNLI results are reported on (GLUE hides its test labels).
    label_column : str
        Column with class ids; rows whose label is -1 (no gold label) are dropped.
    train_label_counts : tuple of int
        Published size of each class in the labelled train split. Partition sizes depend only on these counts
        and the seed, so ``fedsvd plan`` can show a task's privacy plan before its data is downloaded.
    """

    name: str
    hub_id: str
    config: str
    text_columns: tuple[str] | tuple[str, str]
    num_labels: int
    train_label_counts: tuple[int, ...] = ()
    train_split: str = "train"
    eval_split: str = "validation"
    label_column: str = "label"

    def split_name(self, split: Split) -> str:
        """The hub split behind the role ``split``."""
        return self.train_split if split == "train" else self.eval_split


_GLUE = "nyu-mll/glue"
_MNLI_COUNTS = (130_899, 130_900, 130_903)
HUB_TASKS: dict[str, HubTask] = {
    task.name: task
    for task in (
        HubTask("sst2", _GLUE, "sst2", ("sentence",), 2, (29_780, 37_569)),
        HubTask("qnli", _GLUE, "qnli", ("question", "sentence"), 2, (52_366, 52_377)),
        HubTask("qqp", _GLUE, "qqp", ("question1", "question2"), 2, (229_468, 134_378)),
        # MNLI has one training set; matched and mismatched only differ in the genres of their evaluation split.
        HubTask("mnli", _GLUE, "mnli", ("premise", "hypothesis"), 3, _MNLI_COUNTS, eval_split="validation_matched"),
        HubTask(
            "mnli_mismatched",
            _GLUE,
            "mnli",
            ("premise", "hypothesis"),
            3,
            _MNLI_COUNTS,
            eval_split="validation_mismatched",
        ),
        # 550,152 pairs, 785 of them without a gold label (dropped).
        HubTask("snli", "stanfordnlp/snli", "plain_text", ("premise", "hypothesis"), 3, (183_416, 182_764, 183_187)),
    )
}
KNOWN_DATASETS: tuple[str, ...] = ("rotten_tomatoes", *HUB_TASKS)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _hub_split(task: HubTask, split_name: str, data_dir: Path | None) -> datasets.Dataset:
    """Get one split from the local mirror if one is configured, else from the hub (or the HF cache)."""
    if data_dir is not None:
        # A configured mirror is the only source: falling back to the hub would mix data sources silently.
        path = data_dir / task.hub_id / task.config
        try:
            mirror = datasets.load_from_disk(str(path))
        except OSError as exc:
            raise DataError(
                f"{task.name}: no save_to_disk copy of {task.hub_id} ({task.config}) at {path} "
                f"({HF_DATA_DIR_ENV} is set): {_first_line(exc)}"
            ) from exc
        if not isinstance(mirror, datasets.DatasetDict) or split_name not in mirror:
            found = ", ".join(mirror) if isinstance(mirror, datasets.DatasetDict) else "one unnamed split"
            raise DataError(f"{task.name}: {path} has no split {split_name!r} (found: {found})")
        return mirror[split_name]
    try:
        return datasets.load_dataset(task.hub_id, task.config, split=split_name)
    except OSError as exc:  # connection, offline mode, missing or gated repository: all OSError subclasses
        raise DataError(
            f"{task.name}: cannot load {task.hub_id} ({task.config}, split {split_name}) from the Hugging Face "
            f"Hub: {_first_line(exc)}; connect to the Hub or set {HF_DATA_DIR_ENV} to a directory holding "
            f"DatasetDict.save_to_disk copies as <dir>/{task.hub_id}/{task.config}"
        ) from exc


def load_hub_task(task: HubTask, split: Split = "train", data_dir: Path | None = None) -> TextDataset:
    """Load one split of a hub task as a :class:`TextDataset`.

    Both sources give a ``datasets.Dataset`` and share everything after that, so the offline tests run the
    same column selection and label filtering as a download from the hub.

    Parameters
    ----------
    task : HubTask
        The task (see :data:`HUB_TASKS`).
    split : {"train", "eval"}
        ``task.train_split`` or ``task.eval_split``.
    data_dir : Path or None
        A mirror holding ``DatasetDict.save_to_disk`` copies as ``<data_dir>/<hub_id>/<config>`` (e.g.
        ``load_dataset("nyu-mll/glue", "mnli").save_to_disk(data_dir / "nyu-mll/glue/mnli")``); when given,
        the hub is never contacted. ``None`` loads with ``datasets.load_dataset``, which downloads once into
        the shared, file-locked HF cache (``HF_HOME``), so later calls and other worker processes read it
        from disk, also when ``HF_HUB_OFFLINE`` is set.

    Returns
    -------
    TextDataset
        The split's labelled rows in split order, named ``task.name``.

    Raises
    ------
    DataError
        One line naming the task when neither the mirror nor the hub can provide the split, when a column is
        missing, or when the split has no labelled rows.
    """
    split_name = task.split_name(split)
    table = _hub_split(task, split_name, data_dir)
    columns = [*task.text_columns, task.label_column]
    for column in columns:
        if column not in table.column_names:
            found = ", ".join(table.column_names)
            raise DataError(f"{task.name}: split {split_name!r} has no column {column!r} (found: {found})")
    # One columnar read: converting row by row takes seconds on the ~400k rows of QQP and MNLI.
    rows = table.select_columns(columns).to_dict()
    labels = rows[task.label_column]
    keep = [i for i, label in enumerate(labels) if label != _NO_LABEL]
    if not keep:
        raise DataError(f"{task.name}: split {split_name!r} has no labelled rows")
    if len(keep) < len(labels):
        logger.info("%s: dropped %d rows without a gold label", task.name, len(labels) - len(keep))
    texts = [tuple(rows[column][i] for i in keep) for column in task.text_columns]
    return TextDataset(
        texts=texts[0],
        labels=tuple(labels[i] for i in keep),
        num_labels=task.num_labels,
        name=task.name,
        texts_b=texts[1] if len(texts) == 2 else None,
    )
