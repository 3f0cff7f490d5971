"""Scale-out simulation: `fedsvd run` joins a Ray cluster started with `ray start --head` instead of its own Ray."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROUNDS, run_comparison, timeless_rows, write_comparison
from safetensors.torch import load_file

from fedsvd.config import ExperimentConfig
from fedsvd.simulation import ray_address, stop_process_trees

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_START_TIMEOUT_S = 90.0


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


@contextlib.contextmanager
def ray_head(temp_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`ray start --head --block` on 127.0.0.1: every port chosen free, logs and the cluster address file kept in
    `temp_dir`, so that other Ray users of this machine neither collide with it nor join it by accident."""
    gcs, client, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    command = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "2",
        "--temp-dir", str(temp_dir), "--include-dashboard", "false", "--disable-usage-stats",
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(runtime_env),
    ]  # fmt: skip
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""}
        )
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            assert head.poll() is None, f"ray start exited with {head.returncode}: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the Ray head did not start: {log_path.read_text()[-2000:]}"
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}", head
    finally:
        stop_process_trees(head)


def test_ray_address_comes_from_the_config_then_the_environment_then_a_private_local_ray() -> None:
    cfg = ExperimentConfig()
    assert ray_address(cfg.replace(ray_address="10.0.0.1:6379"), {"RAY_ADDRESS": "10.0.0.2:6379"}) == "10.0.0.1:6379"
    assert ray_address(cfg, {"RAY_ADDRESS": "10.0.0.2:6379"}) == "10.0.0.2:6379"
    assert ray_address(cfg, {"RAY_ADDRESS": ""}) == ray_address(cfg, {}) == "local"


@pytest.mark.starts(3)
def test_simulations_join_a_running_ray_cluster_one_or_two_at_a_time(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    """With `--jobs 1` a simulation joins the cluster itself; with `--jobs 2` two run on it at once, each a task on
    a node with a private Ray there. The same (run, seed) computes the same rounds and adapter either way."""
    # Short: Ray's unix socket paths live below this directory and must stay under ~100 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="fedsvd-ray-", dir="/tmp"))
    started: set[int] = set()
    try:
        with ray_head(temp_dir) as (address, head):
            started = process_tree(head)
            settings = {"client_cpus": 1, "ray_address": address}
            env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
            # A client no node of the cluster can host would wait forever: refused before anything starts.
            command = [sys.executable, "-m", "fedsvd.cli", "run", "--out", str(tmp_path / "none"), "--set",
                       f"ray_address={address}", "--set", "client_cpus=3"]  # fmt: skip
            too_big = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert too_big.returncode == 2 and len(too_big.stderr.strip().splitlines()) == 1, too_big.stderr
            assert "client_cpus = 3, client_gpus = 0: no node of the Ray cluster" in too_big.stderr
            assert not (tmp_path / "none").exists()

            spec = write_comparison(tmp_path / "one.toml", tiny_bert, sentiment_csv, {"fedsvd": {}}, **settings)
            joined = run_comparison(spec, tmp_path / "joined", "--jobs", "1")
            assert joined.returncode == 0, joined.stdout + joined.stderr
            alone = tmp_path / "joined" / "fedsvd" / "seed-0"
            rows = timeless_rows(alone)
            assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
            assert all(len(row["clients"]) == 2 and 0 < row["epsilon_max"] <= 4 + 1e-6 for row in rows[1:])
            # The simulation's driver and its client actors ran on this cluster: Ray logs them in its session.
            logs = temp_dir / "session_latest" / "logs"
            assert list(logs.glob("python-core-driver-*.log")), "the simulation did not connect to the cluster"
            workers = set(logs.glob("python-core-worker-*.log"))
            assert workers, "no client actor ran on the cluster"

            spec = write_comparison(tmp_path / "two.toml", tiny_bert, sentiment_csv, {"fedsvd": {}, "ffa": {}},
                                    **settings)  # fmt: skip
            grid = run_comparison(spec, tmp_path / "grid", "--jobs", "2")
            assert grid.returncode == 0, grid.stdout + grid.stderr
            assert "at once on the Ray cluster at" in grid.stdout and "CPUs: 1, GPUs: 0" in grid.stdout, grid.stdout
            assert set(logs.glob("python-core-worker-*.log")) - workers, "no simulation ran as a task of the cluster"
            progress = [line.split(" | ")[0].split()[0] for line in grid.stdout.splitlines() if " s0 | round " in line]
            assert sorted(progress) == ["fedsvd"] * (ROUNDS + 1) + ["ffa"] * (ROUNDS + 1), grid.stdout
            assert progress != sorted(progress) and progress != sorted(progress, reverse=True), "not side by side"
            side_by_side = tmp_path / "grid" / "fedsvd" / "seed-0"
            assert timeless_rows(side_by_side) == rows, "--jobs 2 and --jobs 1 compute the same rounds"
            adapters = [load_file(str(run / "adapter.safetensors")) for run in (alone, side_by_side)]
            assert adapters[0].keys() == adapters[1].keys()
            assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])
            # Joining a cluster must not stop it: the runs only stop what they started themselves.
            assert len(survivors(started)) == len(started), "a run stopped (part of) the cluster it joined"
            started |= process_tree(head)
        assert not survivors(started), "the Ray head left processes behind"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
