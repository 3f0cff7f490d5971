"""Shared fixtures: a tiny randomly initialised BERT saved in HF format, synthetic labelled text, and the
real federations that several test modules inspect.

The model and data go through exactly the code paths the real ones use (a local model directory and a CSV
file), so the tests need no hub and no download. A federation costs tens of seconds to start, so the runs
that many tests read are made once per session (``federation_runs``).

``make test`` runs the suite on two pytest-xdist workers: a federation's start leaves a core idle for much of
its time. The tests that read the shared runs go to one worker together (one xdist group), and so do those of
a module with an expensive module fixture (the deployment), so that each is made once; the checks for
left-over processes only count the processes of their own worker.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from fedsvd.results import read_metrics

POSITIVE = ("good", "great", "fine", "lovely", "superb")
NEGATIVE = ("bad", "awful", "poor", "dull", "weak")
FILLER = ("the", "film", "was", "a", "plot", "and", "acting", "story", "movie", "of")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_tiny_bert(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + POSITIVE + NEGATIVE + FILLER) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(SPECIAL + POSITIVE + NEGATIVE + FILLER),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        # No dropout: tests compare training against exact reference computations.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def write_sentiment_csv(path: Path, count: int, seed: int = 0) -> Path:
    """Short sentences whose label is given by the sentiment words they contain."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(count):
            label = rng.randint(0, 1)
            words = [rng.choice(FILLER) for _ in range(6)] + [rng.choice(POSITIVE if label else NEGATIVE)]
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", count=600)


ROOT = Path(__file__).resolve().parents[1]
ROUNDS, CLIENTS = 2, 3
# The settings every real federation of the tests shares (tiny model and data, DP at epsilon 4). Every client asks
# for all the cores, so that each federation has one Ray client worker: a worker costs about 12 s of CPU to import
# torch, transformers and peft, and the tiny clients' training is over in well under a second.
TINY_FEDERATION = {
    "num_clients": CLIENTS, "local_steps": 3, "delta": 1e-3, "epsilon": 4, "client_cpus": os.cpu_count() or 1,
    "lr": 0.5,
}  # fmt: skip
FEDERATION_RUN_METHODS = ("fedsvd", "ffa", "fedavg")


# Fixtures that make a federation once for many tests: each test that uses one goes to the xdist worker of its group.
SHARED_FEDERATION_GROUPS = {"federation_runs": "shared-federation-runs", "deployment": "loopback-deployment"}
# How many federations (about a minute each) those fixtures start; tests say their own with @pytest.mark.starts(n).
FIXTURE_STARTS = {"federation_runs": 3, "deployment": 2}
# pytest-xdist names each worker in this variable, and every process a test starts inherits it.
WORKER_VARIABLE = "PYTEST_XDIST_WORKER"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the tests of a shared fixture into its xdist group, and hand the workers the longest work first (the
    groups and the tests that start most federations): started last, a five-minute group would leave the
    other worker idle at the end."""
    cost: dict[str, float] = {}
    scope_of: dict[str, str] = {}
    for item in items:
        scope = item.nodeid
        for fixture, group in SHARED_FEDERATION_GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                scope = group
                cost.setdefault(group, FIXTURE_STARTS[fixture])
        marker = item.get_closest_marker("starts")
        cost[scope] = cost.get(scope, 0.0) + (marker.args[0] if marker else 0.0)
        scope_of[item.nodeid] = scope
    items.sort(key=lambda item: -cost[scope_of[item.nodeid]])


def started_by_this_worker(process: psutil.Process) -> bool:
    """Whether a process was started (however indirectly) by this pytest process rather than by another xdist
    worker: by the worker name in its environment, which survives the process being orphaned."""
    try:
        return process.environ().get(WORKER_VARIABLE) == os.environ.get(WORKER_VARIABLE)
    except psutil.Error:
        return False


def flower_processes() -> set[int]:
    """Flower and Ray processes this test session started, or that a finished run orphaned (adopted by init).

    A federation another program (or another xdist worker) is running on the same machine at the same time is
    neither: its processes descend from that program, or carry another worker's name, so they are not counted
    against these tests.
    """
    names = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server", "ray::")
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(process.info["cmdline"] or [])
            if not any(name in cmdline for name in names) or not started_by_this_worker(process):
                continue
            ancestors = [parent.pid for parent in process.parents()]
            if os.getpid() in ancestors or ancestors[:1] == [1] or not ancestors:
                found.add(process.pid)
    return found


def fedsvd_command(out_dir: Path, tiny_bert: Path, sentiment_csv: Path, *arguments: str) -> list[str]:
    """``fedsvd run`` of the tiny federation; ``arguments`` add a config file and --set overrides, which win over
    the tiny federation's own settings (the last --set of a key counts)."""
    command = [sys.executable, "-m", "fedsvd.cli", "run", "--out", str(out_dir)]
    for key, value in {"model": tiny_bert, "dataset": sentiment_csv, **TINY_FEDERATION}.items():
        command += ["--set", f"{key}={value}"]
    return [*command, *arguments]


def run_fedsvd(out_dir: Path, tiny_bert: Path, sentiment_csv: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = fedsvd_command(out_dir, tiny_bert, sentiment_csv, *arguments)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def federation_run_arguments(method: str) -> tuple[str, ...]:
    """How each of the shared runs is made, as `fedsvd run` arguments: the method's config, ROUNDS rounds, 2 of 3
    clients per round."""
    return (f"configs/{method}.toml", "--set", f"rounds={ROUNDS}", "--set", "fraction=0.6")


def write_comparison(
    path: Path, tiny_bert: Path, sentiment_csv: Path, runs: Mapping[str, Mapping[str, Any]], **settings: Any
) -> Path:
    """A comparison file of tiny federations: the shared runs' settings plus ``settings``, one seed, and per run
    its method config (configs/<method>.toml, as `fedsvd run` would read it) plus its own keys."""
    shared = {"model": str(tiny_bert), "dataset": str(sentiment_csv), **TINY_FEDERATION, "rounds": ROUNDS,
              "fraction": 0.6, **settings}  # fmt: skip
    lines = ["seeds = 1", "[settings]", *(f"{key} = {json.dumps(value)}" for key, value in shared.items())]
    for name, keys in runs.items():
        method = tomllib.loads((ROOT / "configs" / f"{keys.get('method', name)}.toml").read_text())
        lines += ["[[runs]]", f'name = "{name}"', *(f"{k} = {json.dumps(v)}" for k, v in {**method, **keys}.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def timeless_rows(out_dir: Path) -> list[dict]:
    """A run's metrics rows without how long each round took: what two runs of the same settings share."""
    return [{key: value for key, value in row.items() if key != "seconds"} for row in read_metrics(out_dir)]


def run_comparison(spec: Path, out_dir: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedsvd.cli", "compare", str(spec), "--out", str(out_dir), *arguments]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="session")
def federation_runs(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, sentiment_csv: Path) -> dict[str, Path]:
    """One 2-round, 3-client DP run per method, made once by `fedsvd compare --jobs 2` (two at a time) and inspected
    by tests of several modules; `fedsvd run` with ``federation_run_arguments`` makes the same runs."""
    before = flower_processes()
    directory = tmp_path_factory.mktemp("federation-runs")
    spec = write_comparison(
        directory / "runs.toml", tiny_bert, sentiment_csv, {method: {} for method in FEDERATION_RUN_METHODS}
    )
    result = run_comparison(spec, directory / "out", "--jobs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    for method in FEDERATION_RUN_METHODS:
        # The round lines, not the lines that say what a long round is waiting for (they start alike).
        progress = [
            line for line in result.stdout.splitlines() if f"{method} s0 | round " in line and "| eps max" in line
        ]
        assert len(progress) == ROUNDS + 1, result.stdout
    assert flower_processes() <= before, "the runs left Flower or Ray processes behind"
    return {method: directory / "out" / method / "seed-0" for method in FEDERATION_RUN_METHODS}
