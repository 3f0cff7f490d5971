"""What a run leaves behind: per-round metrics (JSONL + CSV), the resolved config and the final adapter.

Every round is appended and flushed as soon as it is known, so a run that dies keeps all finished rounds;
files written whole (adapter, summary) go through a temporary file and an atomic rename.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedsvd.config import ExperimentConfig

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_TOML = "config.toml"
ADAPTER_FILE = "adapter.safetensors"
SUMMARY_JSON = "summary.json"
PRIVACY_JSON = "privacy.json"
# The scalar columns of metrics.csv, in order; per-client detail stays in the JSONL.
CSV_COLUMNS = (
    "round",
    "method",
    "accuracy",
    "loss",
    "local_accuracy",
    "epsilon_max",
    "epsilon_mean",
    "num_trained",
    "train_loss",
    "bytes_up",
    "bytes_down",
    "seconds",
)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def progress_line(row: Mapping[str, Any]) -> str:
    """The one-line view of a round that ``fedsvd run`` prints and the server logs."""
    trained = ",".join(str(p) for p in row["clients"]) or "-"
    local = row.get("local_accuracy")
    return (
        f"round {row['round']:>3} | acc {row['accuracy']:.4f} | "
        + (f"local acc {local:.4f} | " if local is not None else "")
        + f"loss {row['loss']:.4f} | eps max {row['epsilon_max']:6.3f} mean {row['epsilon_mean']:6.3f} | "
        f"clients {trained:<12} | {row['seconds']:6.1f}s"
    )


def has_results(out_dir: Path) -> bool:
    return (out_dir / METRICS_JSONL).exists()


class RunRecorder:
    """Writes one run's results into ``out_dir`` as the run goes."""

    def __init__(self, out_dir: Path, cfg: ExperimentConfig) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(out_dir / CONFIG_TOML, lambda p: p.write_text(cfg.to_toml()))
        self._jsonl = out_dir / METRICS_JSONL
        self._csv = out_dir / METRICS_CSV
        self._jsonl.write_text("")
        with self._csv.open("w", newline="") as handle:
            csv.writer(handle).writerow(CSV_COLUMNS)

    def record_round(self, row: Mapping[str, Any]) -> None:
        with self._jsonl.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=False) + "\n")
        with self._csv.open("a", newline="") as handle:
            csv.writer(handle).writerow([row.get(column, "") for column in CSV_COLUMNS])

    def save_adapter(self, arrays: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
        path = self.out_dir / ADAPTER_FILE
        tensors = {name: value.contiguous() for name, value in arrays.items()}
        _write_atomically(path, lambda p: save_file(tensors, str(p), metadata=dict(metadata)))
        return path

    def write_privacy(self, report: Mapping[str, Any]) -> None:
        """Every client's full DP history and final epsilon (RDP and PRV), with what is guaranteed."""
        _write_atomically(self.out_dir / PRIVACY_JSON, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Mark the run complete; its absence tells a reader (or a resume) that the run did not finish."""
        _write_atomically(self.out_dir / SUMMARY_JSON, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / METRICS_JSONL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
