"""Run a comparison's simulations up to N at a time.

Each simulation is a tree of processes (SuperLink, SuperExec, the simulation runtime and Ray), on this machine or
on a node of a Ray cluster, so a thread per running simulation only waits and follows its progress; the work
happens in those processes. Whatever ends the grid (Ctrl-C, a signal, an error in between) first cancels every
running simulation and waits until each has stopped all of its processes, and only then propagates.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
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


@dataclass(frozen=True)
class ClusterShare:
    """What each simulation of a grid holds on a Ray cluster, all on one node: CPUs, and whole GPUs (a private
    Ray can be given no fraction of one)."""

    cpus: int
    gpus: int


def cluster_share(
    nodes: Sequence[Mapping[str, float]], parallel: int, client_cpus: int, client_gpus: float
) -> ClusterShare:
    """An equal share of a Ray cluster for each of ``parallel`` simulations (``nodes``: each live node's
    resources, as ``ray.nodes()`` gives them): as much as one node holds, never less than one client asks for.
    GPUs only when clients use them. Where there are fewer shares than simulations, Ray runs the rest as
    shares come free."""

    def total(resource: str) -> int:
        return int(sum(node.get(resource, 0) for node in nodes))

    gpus = 0
    if client_gpus > 0:
        most_gpus = int(max(node.get("GPU", 0) for node in nodes))
        gpus = max(math.ceil(client_gpus), min(total("GPU") // parallel, most_gpus))
    hosts = [node for node in nodes if node.get("GPU", 0) >= gpus] or nodes
    most_cpus = int(max(node.get("CPU", 0) for node in hosts))
    return ClusterShare(max(client_cpus, min(total("CPU") // parallel, most_cpus)), gpus)


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
