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
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from fedsvd.config import ExperimentConfig
from fedsvd.results import (
    CLIENT_STATE_DIR,
    RESTART_FILE,
    SUMMARY_JSON,
    ServerState,
    read_metrics,
    read_progress,
    waiting_line,
)
from fedsvd.watchdog import stop

APP_DIR = Path(__file__).resolve().parents[1]
FLOWER_LOG = "flower.log"
SUPERLINK_START_TIMEOUT_S = 60.0
# Restarts of a federation whose client workers died, before the run is given up.
MAX_RESTARTS = 3
# How often a simulation running on a Ray cluster is looked in on, and how long a cancelled one gets to stop its
# processes before its worker is killed.
CLUSTER_POLL_S = 0.5
CLUSTER_CANCEL_GRACE_S = 60.0


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
        RAY_USAGE_STATS_ENABLED="0",
        # Ray's log monitor globs its log folder for new files every 0.1 s until it holds this many: 1 % of a core
        # beside the clients. At 0 it looks every LOG_NAME_UPDATE_INTERVAL_S instead. Client workers start once a
        # run and each file is read from its start, so nothing they print is lost.
        RAY_LOG_MONITOR_MANY_FILES_THRESHOLD="0",
        LOG_NAME_UPDATE_INTERVAL_S="2",
        # Ray starts its workers at nice 15, below every helper of the run (SuperLink, SuperExec, the engine
        # that polls each node every 0.1 s, Ray's own services): at 1,000 nodes that polling alone slowed the
        # clients' training by a sixth. The clients' training is the work of a simulation: it runs at nice 0.
        RAY_worker_niceness="0",
        # Flower's Ray backend calls ray.init() without an address: Ray reads it from here.
        RAY_ADDRESS=ray_address(cfg, env),
    )
    return env


def app_snapshot(directory: Path) -> Path:
    """The files ``flwr run`` ships (pyproject's ``fab-include``), copied into ``directory``.

    Flower walks and resolves every file under the app directory before it filters them, which in a checkout
    with its virtual environment takes seconds; a copy of what it would keep is built in milliseconds.
    """
    patterns = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    for source in {path for pattern in patterns for path in APP_DIR.glob(pattern)}:
        target = directory / source.relative_to(APP_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    shutil.copyfile(APP_DIR / "pyproject.toml", directory / "pyproject.toml")
    return directory


def _server_done(out_dir: Path) -> bool:
    return (out_dir / SUMMARY_JSON).exists() or (out_dir / RESTART_FILE).exists()


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
    stop(tree, grace=15.0)
    for process in processes:
        process.wait()


class _ProgressFollower:
    """Shows every new round of metrics.jsonl as the server appends it, once, across restarts; in between,
    what the server waits for (``progress.json``) and for how long."""

    def __init__(
        self, out_dir: Path, show: Callable[[dict], None], waiting: Callable[[str], None] | None = None
    ) -> None:
        self.out_dir = out_dir
        self.show = show
        self.waiting = waiting
        self.shown_up_to = -1
        self.stage: tuple[object, object] | None = None
        self.stage_since = time.monotonic()

    @classmethod
    def of(
        cls, cfg: ExperimentConfig, out_dir: Path, show: Callable[[dict], None], waiting: Callable[[str], None] | None
    ) -> _ProgressFollower:
        """A follower of the run ``cfg`` writes into ``out_dir``; a resumed run's earlier rounds count as shown."""
        follower = cls(out_dir, show, waiting)
        if cfg.resume:
            follower.shown_up_to = ServerState.load(out_dir).completed_round
        return follower

    def poll(self) -> None:
        for row in read_metrics(self.out_dir):
            if row["round"] > self.shown_up_to:
                self.shown_up_to = row["round"]
                self.show(row)
        if self.waiting is None:
            return
        progress = read_progress(self.out_dir)
        if progress is None or not isinstance(progress.get("round"), int) or progress["round"] <= self.shown_up_to:
            return  # nothing yet, or the note of a round already shown
        stage = (progress["round"], progress.get("stage"))
        if stage != self.stage:
            self.stage, self.stage_since = stage, time.monotonic()
        with contextlib.suppress(KeyError, TypeError, ValueError):
            self.waiting(waiting_line(progress, time.monotonic() - self.stage_since))


def run_simulation(
    cfg: ExperimentConfig,
    out_dir: Path,
    show: Callable[[dict], None],
    waiting: Callable[[str], None] | None = None,
    *,
    ray_cpus: int | None = None,
    ray_gpus: int | None = None,
    cancelled: threading.Event | None = None,
) -> bool:
    """Run one federation (or continue it, with ``cfg.resume``); True if the server finished and wrote its
    summary. ``show`` gets every round's metrics row, ``waiting`` a line on what a round is waiting for.

    ``ray_cpus`` and ``ray_gpus`` cap what a private local Ray offers (by default all of this machine's), so that
    several simulations can share a machine; ``cancelled`` stops the run, with all its processes, within a poll.

    Clients keep their state under the results, so that a resumed run finds it. When a client worker dies,
    the server ends the attempt at a checkpointed round and asks for a restart: the federation is then started
    again from that round (up to ``MAX_RESTARTS`` times), and the resumed rounds are exactly what an
    uninterrupted run would have computed from there.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(out_dir=str(out_dir), client_state_dir=str(out_dir / CLIENT_STATE_DIR))
    follower = _ProgressFollower.of(cfg, out_dir, show, waiting)
    cancelled = cancelled or threading.Event()
    for _ in range(MAX_RESTARTS + 1):
        _run_once(cfg, out_dir, follower, (ray_cpus, ray_gpus), cancelled)
        request = out_dir / RESTART_FILE
        if (out_dir / SUMMARY_JSON).exists() or not request.exists() or cancelled.is_set():
            break
        after = json.loads(request.read_text())["after_round"]
        request.unlink()  # answered: the next attempt must not read it as its own request
        print(f"fedsvd: a client worker died; restarting the federation from round {after}", file=sys.stderr)
        cfg = cfg.replace(resume=True)
    return (out_dir / SUMMARY_JSON).exists()


def run_simulation_on_cluster(
    cfg: ExperimentConfig,
    out_dir: Path,
    show: Callable[[dict], None],
    waiting: Callable[[str], None] | None = None,
    *,
    cpus: int,
    gpus: int,
    cancelled: threading.Event,
) -> bool:
    """``run_simulation`` as a task on the Ray cluster this process has joined (``ray.init``).

    The task holds ``cpus`` CPUs and ``gpus`` GPUs of one node and runs the whole federation there on a private
    Ray of exactly those. Simulations joining the cluster itself would not do: Flower sizes each one's client
    pool to the whole cluster, so two started together wait forever on clients the other holds. The node writes
    into ``out_dir``, which must be on a filesystem the nodes share; progress is followed here, from its files.
    """
    import ray

    out_dir.mkdir(parents=True, exist_ok=True)
    task = ray.remote(_simulate_on_node).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    done = task.remote(cfg, out_dir, cpus, gpus)
    follower = _ProgressFollower.of(cfg, out_dir, show, waiting)
    while not ray.wait([done], timeout=CLUSTER_POLL_S)[0]:
        follower.poll()
        if cancelled.is_set():
            # A KeyboardInterrupt in the task: the federation stops its processes on its way out.
            ray.cancel(done)
            if not ray.wait([done], timeout=CLUSTER_CANCEL_GRACE_S)[0]:
                ray.cancel(done, force=True)  # its watchdog then stops what it had started
            return False
    follower.poll()
    try:
        return bool(ray.get(done))
    except ray.exceptions.RayTaskError as err:
        raise RuntimeError(f"on the Ray cluster: {err.cause}") from None


def _simulate_on_node(cfg: ExperimentConfig, out_dir: Path, cpus: int, gpus: int) -> bool:
    """The task of ``run_simulation_on_cluster``, on the node Ray chose."""
    if not out_dir.is_dir():
        raise RuntimeError(
            f"{out_dir} does not exist on node {socket.gethostname()}: simulations on a Ray cluster write their "
            "results there, so it must be on a filesystem every node shares"
        )
    # 'local': a private Ray even on a node where the cluster's own was started with `ray start`.
    return run_simulation(cfg.replace(ray_address="local"), out_dir, lambda row: None, ray_cpus=cpus, ray_gpus=gpus)


def _run_once(
    cfg: ExperimentConfig,
    out_dir: Path,
    follower: _ProgressFollower,
    ray_resources: tuple[int | None, int | None],
    cancelled: threading.Event,
) -> None:
    with tempfile.TemporaryDirectory(prefix="fedsvd-flwr-") as tmp:
        flwr_home = Path(tmp)
        port = _free_port()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedsvd"\n\n[superlink.fedsvd]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        run_config = flwr_home / "run-config.toml"
        run_config.write_text(cfg.to_toml())
        env = flower_environment(flwr_home, cfg)
        federation = (
            f"num-supernodes={cfg.num_clients} client-resources-num-cpus={cfg.client_cpus} "
            f"client-resources-num-gpus={cfg.client_gpus}"
        )
        for resource, amount in zip(("cpus", "gpus"), ray_resources, strict=True):
            if amount is not None:
                federation += f" init-args-num-{resource}={amount}"
        with open(out_dir / FLOWER_LOG, "ab") as log:
            pid_file = flwr_home / "started.pids"
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
            pid_file.write_text(f"{superlink.pid}\n")
            # Outlives this process on purpose: if it is killed, the watchdog stops what it started.
            watchdog = subprocess.Popen(
                [sys.executable, "-m", "fedsvd.watchdog", str(os.getpid()), str(pid_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
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
                        str(app_snapshot(flwr_home / "app")),
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
                with pid_file.open("a") as pids:
                    pids.write(f"{client.pid}\n")
                while client.poll() is None:
                    follower.poll()
                    # The summary (or a restart request) is the server's last word: Flower's own teardown of
                    # the run and of Ray takes seconds more and produces nothing, so it is not waited for.
                    if superlink.poll() is not None or _server_done(out_dir) or cancelled.is_set():
                        break
                    time.sleep(0.5)
                follower.poll()
            finally:
                stop_process_trees(superlink, *([client] if client is not None else []))
                stop_process_trees(watchdog)  # it returns by itself within a poll; never wait on it for long
