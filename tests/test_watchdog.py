"""The watchdog stops every process it has seen below the launcher's roots once the launcher dies, those orphaned
before that included, and nothing else."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
from conftest import ROOT

from fedsvd.watchdog import GRACE_S, POLL_S, TREE_POLL_S, stop


def _stopped(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def test_once_the_launcher_dies_every_process_seen_below_its_roots_is_stopped_orphans_included(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "started.pids"
    root = subprocess.Popen(["bash", "-c", "sleep 600 & sleep 600 & wait"])
    bystander = subprocess.Popen(["sleep", "600"])  # not below a root: must be left alone
    launcher = subprocess.Popen(["sleep", "600"])
    pid_file.write_text(f"{root.pid}\n")
    watchdog = subprocess.Popen([sys.executable, "-m", "fedsvd.watchdog", str(launcher.pid), str(pid_file)], cwd=ROOT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 10
        while len(children := psutil.Process(root.pid).children()) < 2:
            assert time.monotonic() < deadline, "the root never started its children"
            time.sleep(0.05)
        time.sleep(TREE_POLL_S + POLL_S)  # a walk of the trees has seen both
        root.kill()
        root.wait()  # its children are orphans now, below no root
        time.sleep(TREE_POLL_S + POLL_S)  # and a walk has found them there no more
        launcher.kill()
        launcher.wait()
        watchdog.wait(timeout=POLL_S + 2 * GRACE_S + 10)
        assert all(_stopped(child) for child in children), "an orphan seen before the launcher died was left"
        assert bystander.poll() is None, "a process outside the launcher's trees was stopped"
    finally:
        for process in (watchdog, bystander, launcher, root):
            process.kill()
        for child in children:
            if not _stopped(child):
                child.kill()


def test_the_server_app_is_gone_before_any_client_worker_is_stopped(tmp_path: Path) -> None:
    """A ServerApp that outlived its clients' workers would record their round as one they failed."""
    # Flower's runtime handles SIGTERM and lives on for a while; this one ignores it.
    server = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
         "flwr-simulation"]
    )  # fmt: skip
    seen = tmp_path / "seen-at-sigterm"
    # A client worker that, when told to stop, notes whether the ServerApp is still there.
    worker = subprocess.Popen(
        [sys.executable, "-c", f"""
import os, signal, sys, time
def noted(*_):
    try:
        os.kill({server.pid}, 0)
        alive = "alive"
    except ProcessLookupError:
        alive = "gone"
    open({str(seen)!r}, "w").write(alive)
    sys.exit(0)
signal.signal(signal.SIGTERM, noted)
open({str(seen)!r} + ".ready", "w").close()
time.sleep(600)
"""]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not Path(f"{seen}.ready").exists():
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
        stop([psutil.Process(worker.pid), psutil.Process(server.pid)])
        assert seen.read_text() == "gone"
        assert server.poll() is not None and worker.poll() is not None  # psutil has reaped both
    finally:
        for process in (server, worker):
            process.kill()
