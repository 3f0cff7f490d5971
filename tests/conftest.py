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
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from fedsvd.results import read_metrics
from fedsvd.simulation import stop_process_trees

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
RAY_HEAD_START_TIMEOUT_S = 90.0
# The settings every real federation of the tests shares (tiny model and data, DP at epsilon 4). Every client asks
# for all the cores, so that each federation has one Ray client worker: a worker costs about 12 s of CPU to import
# torch, transformers and peft, and the tiny clients' training is over in well under a second.
TINY_FEDERATION = {
    "num_clients": CLIENTS, "local_steps": 3, "delta": 1e-3, "epsilon": 4, "client_cpus": os.cpu_count() or 1,
    "lr": 0.5,
}  # fmt: skip
FEDERATION_RUN_METHODS = ("fedsvd", "ffa", "fedavg")


# Fixtures that make a federation once for many tests: each test that uses one goes to the xdist worker of its group.
# The shared runs are made on a Ray cluster that lives as long as that worker's session.
SHARED_FEDERATION_GROUPS = {
    "federation_runs": "shared-federation-runs",
    "ray_cluster": "shared-federation-runs",
    "deployment": "loopback-deployment",
}
# How many federations (about a minute each) those fixtures start; tests say their own with @pytest.mark.starts(n).
FIXTURE_STARTS = {"federation_runs": 3, "ray_cluster": 0, "deployment": 2}
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


def left_behind(before: set[int]) -> set[int]:
    """Flower and Ray processes that came since ``before`` (``flower_processes``) and stayed, but for the idle
    workers that a Ray cluster running since then keeps for its next tasks."""
    pools = set()
    for pid in before:
        with contextlib.suppress(psutil.Error):
            if "raylet" in " ".join(psutil.Process(pid).cmdline()):
                pools.add(pid)
    left = set()
    for pid in flower_processes() - before:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).ppid() not in pools:
                left.add(pid)
    return left


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


def assert_same_ledger(run: Path, reference: Path) -> None:
    """Two runs' privacy.json agree bit for bit, but for the PRV epsilons: a numerical integration whose last digits
    depend on the threads of the process that computes it (a run made as a task of a Ray cluster has as many as
    the task holds)."""

    def prv_apart(report: dict) -> tuple[dict, list[float]]:
        prv = [client["epsilon"].pop("prv") for client in report["clients"].values()]
        return report, prv

    (ledger, prv), (expected, expected_prv) = (
        prv_apart(json.loads((path / "privacy.json").read_text())) for path in (run, reference)
    )
    assert ledger == expected
    assert prv == pytest.approx(expected_prv, rel=1e-12)


def run_comparison(spec: Path, out_dir: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedsvd.cli", "compare", str(spec), "--out", str(out_dir), *arguments]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open together, so that none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def process_tree(process: subprocess.Popen) -> set[int]:
    try:
        parent = psutil.Process(process.pid)
        return {parent.pid, *(child.pid for child in parent.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def survivors(pids: set[int]) -> list[str]:
    """Processes of `pids` that still run (a pid reused by an unrelated process would show up here too)."""
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(process.cmdline())[:120]}")
    return alive


@dataclass(frozen=True)
class RayCluster:
    """A Ray head on 127.0.0.1 with two CPUs: its address, the directory of its session logs, its processes."""

    address: str
    logs: Path
    head: subprocess.Popen


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """`ray start --head --block` on 127.0.0.1: every port chosen free, logs and the cluster address file kept in a
    directory of its own, so that other Ray users of this machine neither collide with it nor join it by accident.
    Stopped at the end, with everything it started."""
    # Short: Ray's unix socket paths live below this directory and must stay under ~100 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="fedsvd-ray-", dir="/tmp"))
    gcs, client, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs), "--num-cpus", "2", "--temp-dir", str(temp_dir), "--include-dashboard", "false",
        "--disable-usage-stats", "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(runtime_env),
    ]  # fmt: skip
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""}
        )
    started: set[int] = set()
    try:
        deadline = time.monotonic() + RAY_HEAD_START_TIMEOUT_S
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            assert head.poll() is None, f"ray start exited with {head.returncode}: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the Ray head did not start: {log_path.read_text()[-2000:]}"
            time.sleep(0.5)
        yield RayCluster(f"127.0.0.1:{gcs}", temp_dir / "session_latest" / "logs", head)
        started = process_tree(head)
    finally:
        stop_process_trees(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not survivors(started), "the Ray head left processes behind"


@pytest.fixture(scope="session")
def federation_runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, sentiment_csv: Path, ray_cluster: RayCluster
) -> dict[str, Path]:
    """One 2-round, 3-client DP run per method, made once by `fedsvd compare --jobs 2` on a Ray cluster (two at a
    time, each a task on the node with a private Ray of one CPU) and inspected by tests of several modules;
    `fedsvd run` with ``federation_run_arguments`` makes the same runs, on this machine or joining the cluster."""
    before = flower_processes()
    directory = tmp_path_factory.mktemp("federation-runs")
    spec = write_comparison(
        directory / "runs.toml", tiny_bert, sentiment_csv, {method: {} for method in FEDERATION_RUN_METHODS},
        client_cpus=1, ray_address=ray_cluster.address,
    )  # fmt: skip
    result = run_comparison(spec, directory / "out", "--jobs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not left_behind(before), "the runs left Flower or Ray processes behind"
    assert "at once on the Ray cluster" in result.stdout and "CPUs: 1, GPUs: 0" in result.stdout, result.stdout
    for method in FEDERATION_RUN_METHODS:
        # The round lines, not the lines that say what a long round is waiting for (they start alike).
        progress = [
            line for line in result.stdout.splitlines() if f"{method} s0 | round " in line and "| eps max" in line
        ]
        assert len(progress) == ROUNDS + 1, result.stdout
    return {method: directory / "out" / method / "seed-0" for method in FEDERATION_RUN_METHODS}
