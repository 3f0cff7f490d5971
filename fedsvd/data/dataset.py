"""The in-memory dataset every source produces, and the error every data problem raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = get_args(Split)


class DataError(ValueError):
    """A problem with the user's data or data settings.

    The message is one line naming the file (and for a bad cell its row and column) or the setting, and what is
    allowed; it never quotes a cell of the data, because a client's error travels to the server's log.
    """


def json_kind(value: object) -> str:
    """How a bad cell is described in an error: its JSON type, never its content."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


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
