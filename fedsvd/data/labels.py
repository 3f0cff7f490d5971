"""The label rule of data files: how the cells of a ``label`` column become class ids.

A file's labels are either all class ids or all class names:

- **Class ids** are whole numbers from 0 to ``MAX_CLASSES - 1``, as a JSON number or as text that reads as a
  decimal number, so ``1``, ``1.0``, ``"1"``, ``" 1 "`` and ``"1.0"`` are the same class. Fractional (``"1.5"``),
  non-finite (``"nan"``, ``"inf"``), negative and larger values are refused. The classes are ``0 .. K-1`` with
  K = the largest id + 1; classes without rows are allowed (a client's share of the data may lack some) but
  logged as a warning, since labels 1 .. K written 1-based leave class 0 empty.
- **Class names** are any other text (spaces around it ignored), numbered ``0 .. K-1`` in the sorted order of
  the distinct names (Python's string order: by Unicode code point, so ``"neg" < "neutral" < "pos"``). The ids
  then do not depend on the order of the rows.
- A dataset needs at least two classes. A data owner's file in a deployment (``num_labels`` given: the
  classes of the server's task) may hold any of the server's class ids, but names are refused there: they would
  be numbered by that one file, so owners holding different classes would number them differently.

Errors name the file, the row and the column, never the cell's content.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from decimal import Decimal

from fedsvd.data.dataset import DataError, json_kind

__all__ = ["MAX_CLASSES", "class_ids"]

logger = logging.getLogger(__name__)

# Far above any text classification task (MNLI has 3, intent corpora a few hundred), yet it stops an id column
# holding e.g. record numbers from building a classification head with millions of outputs.
MAX_CLASSES = 1000
# Decimal notation plus the words that Python reads as non-finite numbers, so that "nan" in a column of class
# ids is refused as a number instead of becoming a class name (and then a complaint about mixed labels).
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_ALLOWED = f"labels are class ids 0, 1, ... (whole numbers below {MAX_CLASSES}) or class names, not both"


def _kind(label: int | str) -> str:
    return "name" if isinstance(label, str) else "id"


def _read_label(source: str, where: str, value: object) -> int | str:
    """One cell as a class id (int) or a class name (str)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        problem = "is empty"
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        problem = f"is a JSON {json_kind(value)}"
    elif isinstance(value, str) and not _NUMBER.fullmatch(value.strip()):
        return value.strip()
    else:
        # Decimal is exact for every input: a float would merge "1.0000000000000001" into class 1.
        number = Decimal(value.strip() if isinstance(value, str) else value)
        if not number.is_finite():
            problem = "is not a finite number"
        elif number < 0:
            problem = "is negative"
        elif number >= MAX_CLASSES:
            problem = f"is a class id of {MAX_CLASSES} or more"
        elif number != number.to_integral_value():
            problem = "is not a whole number"
        else:
            return int(number)
    raise DataError(f"{source}: {where}, column 'label' {problem}; {_ALLOWED}")


def class_ids(
    source: str, cells: Sequence[tuple[str, object]], num_labels: int | None = None
) -> tuple[tuple[int, ...], int]:
    """Apply the label rule (see the module docstring) to a file's label cells.

    Parameters
    ----------
    source : str
        The file, as named in errors.
    cells : sequence of (str, object)
        ``(where, value)`` per row, in file order, at least one: where the cell is (``"row 3"``) and its raw value.
    num_labels : int or None
        The server's class count for a data owner's file (class ids must be below it, names are refused);
        ``None`` for a dataset that defines its own classes.

    Returns
    -------
    tuple
        ``(ids, num_labels)``: one class id per cell, and the number of classes.

    Raises
    ------
    DataError
        One line naming the file (and for one bad cell its row and the column), never a cell's content.
    """
    labels = [_read_label(source, where, value) for where, value in cells]
    first_where, first = cells[0][0], labels[0]
    for (where, _), label in zip(cells, labels, strict=True):
        if _kind(label) != _kind(first):
            raise DataError(
                f"{source}: {where}, column 'label' is a class {_kind(label)} but {first_where} has a class "
                f"{_kind(first)}; {_ALLOWED}"
            )

    if isinstance(first, str):
        if num_labels is not None:
            raise DataError(
                f"{source}: {first_where}, column 'label' is a class name; a data owner's file needs the server's "
                f"class ids 0 .. {num_labels - 1} (names would be numbered by this one file)"
            )
        names = sorted({str(label) for label in labels})
        if len(names) > MAX_CLASSES:
            raise DataError(f"{source}: column 'label' has more than {MAX_CLASSES} distinct class names; {_ALLOWED}")
        _check_at_least_two(source, len(names))
        logger.info("%s: %d class names, numbered 0 .. %d in sorted order", source, len(names), len(names) - 1)
        index = {name: i for i, name in enumerate(names)}
        return tuple(index[str(label)] for label in labels), len(names)

    ids = tuple(int(label) for label in labels)
    if num_labels is not None:
        for (where, _), label in zip(cells, ids, strict=True):
            if label >= num_labels:
                raise DataError(
                    f"{source}: {where}, column 'label' is a class id the server's task does not have; labels must "
                    f"lie in [0, {num_labels})"
                )
        return ids, num_labels
    count = max(ids) + 1
    _check_at_least_two(source, count)
    empty = count - len(set(ids))
    if empty:
        logger.warning(
            "%s: %d of the classes 0 .. %d have no rows (labels counted from 1? subtract 1)", source, empty, count - 1
        )
    return ids, count


def _check_at_least_two(source: str, count: int) -> None:
    if count < 2:
        raise DataError(f"{source}: column 'label' has only one class; a classifier needs at least two")
