"""Run a comparison's simulations up to N at a time.

Each simulation is a tree of processes (SuperLink, SuperExec, the simulation runtime and Ray), so a thread per
running simulation only waits and follows its progress; the work happens in those processes. Whatever ends the
grid (Ctrl-C, a signal, an error in between) first cancels every running simulation and waits until each has
stopped all of its processes, and only then propagates.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsvd.config import ExperimentConfig

# How often the grid looks up from waiting, so that Ctrl-C is handled at once.
POLL_S = 0.5


@dataclass(frozen=True)
class GridJob:
    """One (run, seed) simulation of a comparison."""

    label: str
    run_name: str
    seed: int
    cfg: ExperimentConfig
    directory: Path


def local_ray_cpus(parallel: int, cores: int, client_cpus: int) -> int:
    """CPUs each of ``parallel`` private local Rays offers: an equal share of the cores, but never fewer than one
    client asks for (Ray would never schedule it); in that case the simulations share the cores."""
    return max(cores // parallel, client_cpus)


def run_grid(
    jobs: Sequence[GridJob],
    parallel: int,
    start: Callable[[GridJob, threading.Event], bool],
    finished: Callable[[GridJob, bool | Exception], None],
) -> None:
    """Run ``start(job, cancelled)`` for every job, at most ``parallel`` at once, in the order given.

    ``finished`` gets each job with what ``start`` returned or the exception it raised, in the main thread and
    in the order the jobs end. ``start`` must return soon after ``cancelled`` is set.
    """
    pending = deque(enumerate(jobs))
    ended: queue.Queue[tuple[int, bool | Exception]] = queue.Queue()
    cancelled = threading.Event()
    running: dict[int, threading.Thread] = {}

    def work(index: int, job: GridJob) -> None:
        try:
            outcome: bool | Exception = start(job, cancelled)
        except Exception as err:  # reported by ``finished``; the other jobs go on
            outcome = err
        ended.put((index, outcome))

    try:
        while pending or running:
            while pending and len(running) < parallel:
                index, job = pending.popleft()
                running[index] = threading.Thread(target=work, args=(index, job), name=job.label, daemon=True)
                running[index].start()
            try:
                index, outcome = ended.get(timeout=POLL_S)
            except queue.Empty:
                continue
            running.pop(index).join()
            finished(jobs[index], outcome)
    except BaseException:
        cancelled.set()
        for thread in running.values():
            thread.join()
        raise
