"""A user's data file (``.csv`` or ``.jsonl``) read into a :class:`TextDataset`.

A file has a ``text`` column (or ``text_a`` and ``text_b`` for sentence pairs) and a ``label`` column, read by
the rule of :mod:`fedsvd.data.labels`; other columns are ignored. A CSV file starts with a header row; a JSON
Lines file holds one object per line, and the first object's keys are its columns. Both are UTF-8 (a leading
byte-order mark is allowed).

Errors are one line naming the file and never quote its content. They locate a cell as a spreadsheet does: in
a CSV file the header is ``row 1`` and each record is one row, also when a quoted text spans several lines; in a
JSON Lines file ``line 1`` is the first line, blank lines counted. An encoding error names the line of the file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from fedsvd.data.dataset import DataError, TextDataset, json_kind
from fedsvd.data.labels import class_ids

__all__ = ["LOCAL_SUFFIXES", "load_file"]

LOCAL_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl")
_LAYOUT = "a file needs the columns 'text' (or 'text_a' and 'text_b' for sentence pairs) and 'label'"

# (where, cells by column): where names the record in errors, e.g. "row 3".
Record = tuple[str, dict[str, object]]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:  # missing, a directory, no permission: strerror says which without a traceback
        raise DataError(f"{path}: cannot read the file ({exc.strerror or type(exc).__name__})") from exc
    try:
        # Decoding the whole file at once (rather than streaming) gives the failing byte's offset, and so its line.
        # utf-8-sig: spreadsheet exports often start with a byte-order mark that would corrupt the first column.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text; save the file as UTF-8") from exc


def _csv_error(path: Path, row: int, exc: csv.Error) -> DataError:
    # A cell over the csv module's limit is refused, not read with a raised limit: the limit is process-wide state
    # that other code in the process relies on, such a cell is nearly always a quote that is never closed and
    # swallows the rows after it, and a real text that long would be cut to max_length tokens anyway.
    if "field limit" in str(exc):
        return DataError(
            f"{path}: row {row} has a cell over {csv.field_size_limit():,} characters, usually an opening quote "
            f"that is never closed; quote cells that contain commas, quotes or line breaks"
        )
    return DataError(f"{path}: row {row} is not valid CSV ({exc})")


def _csv_records(path: Path, text: str) -> tuple[list[str], list[Record]]:
    header: list[str] = []
    records: list[Record] = []
    row = 0
    try:
        for row, cells in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            if not header:  # the first row that is not blank
                header = cells
            elif len(cells) > len(header):
                # Extra cells are most often an unquoted comma in a text, which would shift the label column.
                raise DataError(
                    f"{path}: row {row} has {len(cells)} cells but the header has {len(header)}; quote texts that "
                    f"contain commas"
                )
            elif cells:  # blank lines are rows without cells
                # A short row leaves its last columns out of the record, so they read as missing.
                records.append((f"row {row}", dict(zip(header, cells, strict=False))))
    except csv.Error as exc:
        raise _csv_error(path, row + 1, exc) from exc
    return header, records


def _jsonl_records(path: Path, text: str) -> tuple[list[str], list[Record]]:
    records: list[Record] = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters that splitlines breaks at.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # also numbers and nesting beyond Python's limits
            if isinstance(exc, json.JSONDecodeError):
                reason = f"{exc.msg} at column {exc.colno}"
            else:
                reason = "a number too long or nesting too deep"
            raise DataError(f"{path}: line {line} is not valid JSON ({reason})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line} is a JSON {json_kind(record)}, not an object; {_LAYOUT}")
        records.append((f"line {line}", record))
    # JSON Lines has no header: the first record defines the layout, and later records are checked row by row.
    return (list(records[0][1]) if records else []), records


def load_file(path: Path, num_labels: int | None = None) -> TextDataset:
    """Read a ``.csv`` or ``.jsonl`` data file (layout and error locations: see the module docstring).

    Parameters
    ----------
    path : Path
        The file.
    num_labels : int or None
        For a data owner's file: the server's number of classes, which the file's class ids must lie below
        (class names are refused). ``None``: the file defines its classes (see :mod:`fedsvd.data.labels`).

    Returns
    -------
    TextDataset
        All rows in file order, named after the file.

    Raises
    ------
    DataError
        One line naming the file (and the row and column of a bad cell) for a file that cannot be read, is not
        UTF-8, is empty, lacks a column or has a bad cell; never quoting the file's content.
    """
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: expected a {' or '.join(LOCAL_SUFFIXES)} file")
    text = _read_text(path)
    columns, records = (_csv_records if path.suffix.lower() == ".csv" else _jsonl_records)(path, text)
    if not records:
        raise DataError(f"{path}: file is empty; {_LAYOUT} and at least one row")
    # Sentence pairs live in text_a/text_b; a plain 'text' column wins if both layouts are present.
    text_columns = ("text_a", "text_b") if "text" not in columns and "text_a" in columns else ("text",)
    for column in (*text_columns, "label"):
        if column not in columns:
            raise DataError(f"{path}: missing column '{column}'; {_LAYOUT}")
    for where, record in records:
        for column in text_columns:
            value = record.get(column)
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"is a JSON {json_kind(value)}, not a string"
                raise DataError(f"{path}: {where}, column '{column}' {problem}")
    labels, count = class_ids(str(path), [(where, record.get("label")) for where, record in records], num_labels)
    texts = [tuple(str(record[column]) for _, record in records) for column in text_columns]
    return TextDataset(
        texts=texts[0],
        labels=labels,
        num_labels=count,
        name=path.name,
        texts_b=texts[1] if len(texts) == 2 else None,
    )
