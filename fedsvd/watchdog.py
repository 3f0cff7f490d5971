"""Stops a federation's processes when the ``fedsvd`` process that started them dies, however it dies.

Flower starts the SuperLink, SuperExec and the simulation runtime in sessions of their own, and Ray starts
its daemons below them, so none of them goes with its launcher: after a ``kill -9`` of ``fedsvd run`` they
would keep training and writing into the run's directory. The launcher therefore starts this watchdog (in
a session of its own too, so that Ctrl-C or a closed terminal reaches the launcher, not the watchdog). It
remembers every process below the roots it was given while the launcher lives, and when the launcher is
gone it stops all of them: the ServerApp's process killed first, then the others terminated, and what is left
killed after a grace period. Run as
``python -m fedsvd.watchdog LAUNCHER_PID PID_FILE``; the launcher writes the pid of every process it starts
into PID_FILE, a line each, as soon as it has started it.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

POLL_S = 0.5  # how soon the launcher's death is seen
TREE_POLL_S = 2.0  # how often the trees are walked: a pass over /proc costs about 10 ms
GRACE_S = 3.0
# The commands of the processes that run a ServerApp: Flower's simulation runtime, or a deployment's ServerApp.
SERVER_APP_COMMANDS = ("flwr-simulation", "flwr-serverapp")


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _living() -> dict[int, tuple[psutil.Process, int]]:
    """Every living process on the machine by pid, with its parent's pid, from one pass over /proc. psutil keeps
    one Process per pid and start time across passes, so the same process compares equal in each."""
    living = {}
    for process in psutil.process_iter(["ppid", "status"]):
        if process.info["status"] not in (None, psutil.STATUS_ZOMBIE):
            living[process.pid] = (process, process.info["ppid"])
    return living


def _trees(pid_file: Path, living: dict[int, tuple[psutil.Process, int]]) -> set[psutil.Process]:
    """The processes named in ``pid_file`` and everything below them, among ``living``."""
    try:
        roots = [int(pid) for pid in pid_file.read_text().split() if pid.isdigit()]
    except OSError:
        return set()
    children: dict[int, list[int]] = {}
    for pid, (_, parent) in living.items():
        children.setdefault(parent, []).append(pid)
    members, stack = set(), [pid for pid in roots if pid in living]
    while stack:
        pid = stack.pop()
        members.add(living[pid][0])
        stack += children.get(pid, [])
    return members


def _runs_server_app(process: psutil.Process) -> bool:
    try:
        return any(command in part for part in process.cmdline() for command in SERVER_APP_COMMANDS)
    except psutil.Error:
        return False


def stop(processes: Iterable[psutil.Process], grace: float = GRACE_S) -> None:
    """Kill the ServerApp's processes among ``processes`` and wait for them; then terminate the others, wait up to
    ``grace`` seconds, and kill the rest. ``psutil.Process`` compares by pid and start time, so a pid reused by
    an unrelated process since it was remembered is never touched.

    The ServerApp goes first, and at once: stopped together with the client workers, it could outlive them long
    enough to record the round they were training as one whose clients' workers died, and a resumed run would
    keep that round. Every file it writes is replaced atomically, its checkpoint last, so a kill leaves a run
    that resumes from its last whole round.
    """
    alive = [process for process in processes if process.is_running()]
    servers = [process for process in alive if _runs_server_app(process)]
    _each(servers, psutil.Process.kill)
    psutil.wait_procs(servers, timeout=grace)
    others = [process for process in alive if process not in servers]
    _each(others, psutil.Process.terminate)
    _, left = psutil.wait_procs(others, timeout=grace)
    _each(left, psutil.Process.kill)
    psutil.wait_procs(left, timeout=grace)


def _each(processes: Iterable[psutil.Process], action: Callable[[psutil.Process], None]) -> None:
    """``action`` on every process; one that has exited meanwhile, or cannot be signalled, is passed over."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            action(process)


def watch(launcher_pid: int, pid_file: Path) -> None:
    """Follow the trees of the processes the launcher lists in ``pid_file`` while it lives; stop every process
    ever seen in them once it has died. Returns as soon as the launcher has stopped them itself."""
    try:
        launcher = psutil.Process(launcher_pid)
    except psutil.Error:
        return
    known: set[psutil.Process] = set()
    walked = -math.inf
    while _alive(launcher):
        if time.monotonic() - walked >= TREE_POLL_S:
            # One pass over /proc per walk, and a walk every few polls: psutil's recursive children() makes a pass
            # per root and checking each remembered process a read each, which twice a second takes 4 % of a
            # core from a federation that needs all of it. The walk after the launcher's death finds the rest.
            walked, living = time.monotonic(), _living()
            known = {process for process in known if process.pid in living and living[process.pid][0] == process}
            known |= _trees(pid_file, living)
            if not known and pid_file.exists():
                return
        time.sleep(POLL_S)
    stop(known | _trees(pid_file, _living()))
    # The launcher's private Flower home (SuperLink state, run config) would otherwise stay in the temp folder.
    shutil.rmtree(pid_file.parent, ignore_errors=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]))
