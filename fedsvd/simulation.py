"""Launch the project's Flower app on Flower's simulation runtime (Ray backend), and clean up after it.

This is what ``flwr run`` against a local SuperLink does, done so that nothing outlives the run: a private
SuperLink on a free loopback port, with its own FLWR_HOME and runtime dependency installation off, then
``flwr run --stream``; finally the SuperLink's whole process group (its simulation process and Ray with
it) is stopped. Progress lines come from the run's metrics.jsonl, Flower's own log goes to a file.

Ray: the simulation joins the cluster named by the config's ``ray_address`` or by ``$RAY_ADDRESS``
(``ray start --head`` on one machine, ``ray start --address`` on the others), and otherwise starts a private
local Ray that goes with the run. Only the simulation's own Ray processes are stopped, never a joined cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from fedsvd.config import ExperimentConfig
from fedsvd.results import METRICS_JSONL, SUMMARY_JSON

APP_DIR = Path(__file__).resolve().parents[1]
FLOWER_LOG = "flower.log"
SUPERLINK_START_TIMEOUT_S = 60.0


def ray_address(cfg: ExperimentConfig, environ: Mapping[str, str]) -> str:
    """The Ray cluster the simulation runs on: the config's, else $RAY_ADDRESS, else 'local'.

    'local' makes Ray start a private instance even when another one was started on this machine with
    ``ray start`` (a plain ``ray.init()`` would silently join the latest such cluster).
    """
    return cfg.ray_address or environ.get("RAY_ADDRESS") or "local"


def flower_environment(flwr_home: Path, cfg: ExperimentConfig) -> dict[str, str]:
    env = dict(os.environ)
    # Flower starts its helpers (flower-superexec, flwr-simulation) by name: find this venv's first.
    scripts = str(Path(sys.executable).parent)
    env.update(
        PATH=os.pathsep.join([scripts, env.get("PATH", "")]),
        FLWR_HOME=str(flwr_home),
        # Otherwise Flower installs the app's dependencies (torch included) into a fresh runtime env.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # Flower's Ray backend calls ray.init() without an address: Ray reads it from here.
        RAY_ADDRESS=ray_address(cfg, env),
    )
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not open port {port} within {timeout:.0f}s")


def stop_process_trees(*processes: subprocess.Popen) -> None:
    """Stop processes and every process they started, detached ones included, all at once.

    Flower starts SuperExec and the simulation runtime in sessions of their own, and Ray starts its
    daemons below those, so a process-group kill is not enough: the whole trees are collected first.
    """
    tree: list[psutil.Process] = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(process.pid)
            tree += [parent, *parent.children(recursive=True)]
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=15)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    for process in processes:
        process.wait()


class _ProgressFollower:
    """Reads new rows of metrics.jsonl as the server appends them."""

    def __init__(self, path: Path, show: Callable[[dict], None]) -> None:
        self.path = path
        self.show = show
        self.seen = 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        complete = [line for line in lines if line.strip()]
        # The last line may be half-written while the server appends it: only parse whole JSON rows.
        for line in complete[self.seen :]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            self.seen += 1
            self.show(row)


def run_simulation(cfg: ExperimentConfig, out_dir: Path, show: Callable[[dict], None]) -> bool:
    """Run one federation; True if the server finished and wrote its summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedsvd-flwr-") as tmp:
        flwr_home = Path(tmp)
        port = _free_port()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedsvd"\n\n[superlink.fedsvd]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        run_config = flwr_home / "run-config.toml"
        run_config.write_text(cfg.replace(out_dir=str(out_dir)).to_toml())
        env = flower_environment(flwr_home, cfg)
        federation = (
            f"num-supernodes={cfg.num_clients} client-resources-num-cpus={cfg.client_cpus} "
            f"client-resources-num-gpus={cfg.client_gpus}"
        )
        with open(out_dir / FLOWER_LOG, "ab") as log:
            superlink = subprocess.Popen(
                [
                    "flower-superlink",
                    "--insecure",
                    "--simulation",
                    "--disable-runtime-dependency-installation",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=tmp,
            )
            client = None
            try:
                _wait_for_port(port, superlink, SUPERLINK_START_TIMEOUT_S)
                client = subprocess.Popen(
                    [
                        "flwr",
                        "run",
                        str(APP_DIR),
                        "fedsvd",
                        "--run-config",
                        str(run_config),
                        "--federation-config",
                        federation,
                        "--stream",
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=tmp,
                )
                follower = _ProgressFollower(out_dir / METRICS_JSONL, show)
                while client.poll() is None:
                    follower.poll()
                    if superlink.poll() is not None:
                        break
                    time.sleep(0.5)
                follower.poll()
            finally:
                stop_process_trees(superlink, *([client] if client is not None else []))
    return (out_dir / SUMMARY_JSON).exists()
