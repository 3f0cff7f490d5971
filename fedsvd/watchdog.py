"""Stops a federation's processes when the ``fedsvd`` process that started them dies, however it dies.

Flower starts the SuperLink, SuperExec and the simulation runtime in sessions of their own, and Ray starts
its daemons below them, so none of them goes with its launcher: after a ``kill -9`` of ``fedsvd run`` they
would keep training and writing into the run's directory. The launcher therefore starts this watchdog (in
a session of its own too, so that Ctrl-C or a closed terminal reaches the launcher, not the watchdog). It
remembers every process below the roots it was given while the launcher lives, and when the launcher is
gone it stops all of them: terminate, then kill what is left after a grace period. Run as
``python -m fedsvd.watchdog LAUNCHER_PID PID_FILE``; the launcher writes the pid of every process it starts
into PID_FILE, a line each, as soon as it has started it.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

POLL_S = 0.5
GRACE_S = 3.0


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _trees(pid_file: Path) -> set[psutil.Process]:
    """The processes named in ``pid_file`` and everything below them."""
    members: set[psutil.Process] = set()
    with contextlib.suppress(OSError):
        for pid in pid_file.read_text().split():
            with contextlib.suppress(psutil.Error, ValueError):
                root = psutil.Process(int(pid))
                members.add(root)
                members.update(root.children(recursive=True))
    return {process for process in members if _alive(process)}


def stop(processes: Iterable[psutil.Process], grace: float = GRACE_S) -> None:
    """Terminate, wait up to ``grace`` seconds, then kill the rest. ``psutil.Process`` compares by pid and
    start time, so a pid reused by an unrelated process since it was remembered is never touched."""
    alive = [process for process in processes if process.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(alive, timeout=grace)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=grace)


def watch(launcher_pid: int, pid_file: Path) -> None:
    """Follow the trees of the processes the launcher lists in ``pid_file`` while it lives; stop every process
    ever seen in them once it has died. Returns as soon as the launcher has stopped them itself."""
    try:
        launcher = psutil.Process(launcher_pid)
    except psutil.Error:
        return
    known: set[psutil.Process] = set()
    while _alive(launcher):
        current = _trees(pid_file)
        known = {process for process in known if _alive(process)} | current
        if not known and pid_file.exists():
            return
        time.sleep(POLL_S)
    stop(known | _trees(pid_file))
    # The launcher's private Flower home (SuperLink state, run config) would otherwise stay in the temp folder.
    shutil.rmtree(pid_file.parent, ignore_errors=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
