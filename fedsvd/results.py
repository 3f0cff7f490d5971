"""What a run leaves behind: per-round metrics (JSONL + CSV), the resolved config, the adapter, the privacy
ledger and the checkpoint a killed run resumes from.

After every round, in this order: the metrics row is appended, then the current adapter, ``privacy.json`` and
``checkpoint.safetensors`` are rewritten through a temporary file and an atomic rename. The checkpoint comes
last, so it never runs ahead of the other files, and a resume drops any metrics row past it. ``summary.json``
is written once, at the very end: without it a directory is an unfinished (resumable) run.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedsvd.config import ExperimentConfig

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_TOML = "config.toml"
ADAPTER_FILE = "adapter.safetensors"
SUMMARY_JSON = "summary.json"
PRIVACY_JSON = "privacy.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
CLIENT_STATE_DIR = "client-state"
# Left by a server that ended an attempt on purpose (a client worker died) for its launcher to start again.
RESTART_FILE = "restart-requested.json"
# What the server is waiting for inside a round (how many clients have replied), rewritten as replies arrive.
PROGRESS_JSON = "progress.json"
# The scalar columns of metrics.csv, in order; per-client detail stays in the JSONL.
CSV_COLUMNS = (
    "round",
    "method",
    "accuracy",
    "loss",
    "eval_examples",
    "local_accuracy",
    "epsilon_max",
    "epsilon_mean",
    "client_epsilon",
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


# A round line lists the clients it aggregated up to this many, and counts them beyond (metrics.jsonl lists all).
LISTED_CLIENTS = 8


def progress_line(row: Mapping[str, Any]) -> str:
    """The one-line view of a round that ``fedsvd run`` prints and the server logs. Scores are "-" in a round
    the held-out set was not scored in (``eval_every``) and marked "~" when scored on the evaluation sample."""
    clients = row["clients"]
    trained = (",".join(map(str, clients)) or "-") if len(clients) <= LISTED_CLIENTS else f"({len(clients)})"
    local = row.get("local_accuracy")
    mark = "~" if row.get("eval_sampled") else " "
    accuracy, loss = ("   -   ", "   -   ")
    if row["accuracy"] is not None:
        accuracy, loss = f"{mark}{row['accuracy']:.4f}", f"{mark}{row['loss']:.4f}"
    return (
        f"round {row['round']:>3} | acc{accuracy} | "
        + (f"local acc {local:.4f} | " if local is not None else "")
        + f"loss{loss} | eps max {row['epsilon_max']:6.3f} mean {row['epsilon_mean']:6.3f} | "
        + (f"client eps {client:6.3f} | " if (client := row.get("client_epsilon")) is not None else "")
        + f"clients {trained:<12} | {row['seconds']:6.1f}s"
        + (f" | failed {','.join(row['rejected'])}" if row.get("rejected") else "")
        + (" | round dropped" if row.get("dropped") else "")
    )


def waiting_line(progress: Mapping[str, Any], seconds: float) -> str:
    """The one-line view of what the server is waiting for inside a round (from ``progress.json``)."""
    count = f": {progress['replied']}/{progress['sent']} clients replied" if progress["sent"] else ""
    return f"round {progress['round']:>3} | {progress['stage']}{count} ({seconds:.0f} s)"


def has_results(out_dir: Path) -> bool:
    return (out_dir / METRICS_JSONL).exists()


def write_progress(out_dir: Path, server_round: int, stage: str, replied: int, sent: int) -> None:
    """Say what the server waits for: ``stage`` of ``server_round`` (0: setting up), ``replied`` of ``sent``."""
    progress = {"round": server_round, "stage": stage, "replied": replied, "sent": sent}
    _write_atomically(out_dir / PROGRESS_JSON, lambda p: p.write_text(json.dumps(progress)))


def read_progress(out_dir: Path) -> dict[str, Any] | None:
    """The server's last progress note, or None when there is none (yet) or it cannot be read."""
    try:
        progress = json.loads((out_dir / PROGRESS_JSON).read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


class ResultsExist(RuntimeError):
    """The results directory already holds a run; nothing in it is touched."""


class RunRecorder:
    """Writes one run's results into ``out_dir`` as the run goes.

    A new run refuses a directory that already holds results. A resumed run (``resume_after`` = the round of
    its checkpoint) keeps the rows up to that round and drops any written after it.
    """

    def __init__(self, out_dir: Path, cfg: ExperimentConfig, resume_after: int | None = None) -> None:
        self.out_dir = out_dir
        self._jsonl = out_dir / METRICS_JSONL
        self._csv = out_dir / METRICS_CSV
        if resume_after is None and has_results(out_dir):
            raise ResultsExist(f"{out_dir} already holds results ({METRICS_JSONL}); choose another out_dir")
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(out_dir / CONFIG_TOML, lambda p: p.write_text(cfg.to_toml()))
        kept = (
            [row for row in read_metrics(out_dir) if row["round"] <= resume_after] if resume_after is not None else []
        )
        lines = "".join(json.dumps(row) + "\n" for row in kept)
        _write_atomically(self._jsonl, lambda p: p.write_text(lines))

        def write_csv(path: Path) -> None:
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(CSV_COLUMNS)
                writer.writerows([row.get(column, "") for column in CSV_COLUMNS] for row in kept)

        _write_atomically(self._csv, write_csv)

    def record_round(self, row: Mapping[str, Any]) -> None:
        with self._jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
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


def write_restart_request(out_dir: Path, after_round: int, partitions: list[int]) -> None:
    """Ask the launcher to start the federation again from the checkpoint of ``after_round``."""
    request = {"after_round": after_round, "dead_worker_partitions": partitions}
    _write_atomically(out_dir / RESTART_FILE, lambda p: p.write_text(json.dumps(request) + "\n"))


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """Every complete row (a row cut short by a kill mid-write is not one)."""
    path = out_dir / METRICS_JSONL
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why in one line."""


@dataclass
class ServerState:
    """Everything the server needs to continue a run after its last completed round.

    The global arrays (for FLoRA / FedEx-LoRA with the merged base weights), each client's plan (the noise is
    planned once per run), the privacy ledger's rounds, the scores of the last evaluated round and the
    bookkeeping of short rounds. The client sampling needs no state: it is drawn from (seed, round) alone.
    ``save`` writes one file atomically; ``load`` checks what it restores before anyone trusts it.
    """

    completed_round: int
    arrays: dict[str, torch.Tensor]
    plans: dict[int, tuple[int, float, float]]  # partition -> (examples, sample rate, noise multiplier)
    privacy_rounds: dict[int, list[int]]
    epsilon: dict[int, float]  # every client's cumulative epsilon so far
    latest: dict[str, Any]  # round, accuracy, loss, local_accuracy of the last evaluated round
    short_rounds: int  # consecutive rounds that were dropped, up to this one
    wall_seconds: float  # time spent by every attempt so far
    config: dict[str, Any]  # the run's resolved config
    # Client-level DP: the rounds charged so far and the noise multiplier planned when the run started.
    client_level_rounds: list[int] = field(default_factory=list)
    client_level_noise: float = 0.0

    VERSION: ClassVar[int] = 1

    def save(self, out_dir: Path) -> None:
        fields = {key: value for key, value in asdict(self).items() if key != "arrays"}
        metadata = {"fedsvd-server-state": json.dumps({"version": self.VERSION, **fields})}
        tensors = {name: value.contiguous() for name, value in self.arrays.items()}
        _write_atomically(out_dir / CHECKPOINT_FILE, lambda p: save_file(tensors, str(p), metadata=metadata))

    @classmethod
    def load(cls, out_dir: Path) -> ServerState:
        path = out_dir / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist: the run has no completed round to resume from")
        try:
            with safe_open(str(path), "pt") as handle:
                fields = json.loads((handle.metadata() or {})["fedsvd-server-state"])
                arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (OSError, KeyError, ValueError, SafetensorError) as err:
            raise CheckpointError(f"{path} cannot be read: {type(err).__name__}") from None
        if fields.pop("version", None) != cls.VERSION:
            raise CheckpointError(f"{path} was written by another version of fedsvd")
        try:
            state = cls(
                completed_round=int(fields["completed_round"]),
                arrays=arrays,
                plans={int(p): (int(n), float(q), float(s)) for p, (n, q, s) in fields["plans"].items()},
                privacy_rounds={int(p): [int(r) for r in rounds] for p, rounds in fields["privacy_rounds"].items()},
                epsilon={int(p): float(eps) for p, eps in fields["epsilon"].items()},
                latest=dict(fields["latest"]),
                short_rounds=int(fields["short_rounds"]),
                wall_seconds=float(fields["wall_seconds"]),
                config=dict(fields["config"]),
                client_level_rounds=[int(r) for r in fields.get("client_level_rounds", [])],
                client_level_noise=float(fields.get("client_level_noise", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is incomplete: {type(err).__name__} {err}") from None
        late = [p for p, rounds in state.privacy_rounds.items() if any(r > state.completed_round for r in rounds)]
        if late:
            raise CheckpointError(f"{path} charges clients {late} for rounds after its own round")
        if any(r > state.completed_round for r in state.client_level_rounds):
            raise CheckpointError(f"{path} charges client-level rounds after its own round")
        return state
