"""The comparison grid's scheduling: how many simulations run at once, what each outcome reaches, and that an
interrupt stops every running simulation before it propagates. Stand-ins for the simulations keep this fast; the
real ones run side by side in tests/test_federation.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fedsvd.config import ExperimentConfig
from fedsvd.grid import ClusterShare, GridJob, cluster_share, local_ray_cpus, run_grid


def _jobs(count: int) -> list[GridJob]:
    return [GridJob(f"job {i}", f"run{i}", i, ExperimentConfig(seed=i), Path(f"run{i}")) for i in range(count)]


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_the_grid_runs_every_job_once_and_never_more_than_asked_at_once(parallel: int) -> None:
    lock = threading.Lock()
    now, most, started = 0, 0, []

    def start(job: GridJob, cancelled: threading.Event) -> bool:
        nonlocal now, most
        with lock:
            now += 1
            most = max(most, now)
            started.append(job.seed)
        time.sleep(0.05)
        with lock:
            now -= 1
        return job.seed != 3

    outcomes: dict[int, bool | Exception] = {}
    main_thread = threading.current_thread()

    def finished(job: GridJob, outcome: bool | Exception) -> None:
        assert threading.current_thread() is main_thread, "reports and plots are made in the main thread"
        outcomes[job.seed] = outcome

    run_grid(_jobs(7), parallel, start, finished)
    assert sorted(started) == list(range(7)) and started[:parallel] == list(range(parallel)), started
    assert most == parallel
    assert outcomes == {seed: seed != 3 for seed in range(7)}


def test_a_job_that_raises_is_reported_and_the_others_go_on() -> None:
    def start(job: GridJob, cancelled: threading.Event) -> bool:
        if job.seed == 1:
            raise RuntimeError("flower-superlink exited with code 1")
        return True

    outcomes: dict[int, bool | Exception] = {}
    run_grid(_jobs(4), 2, start, lambda job, outcome: outcomes.__setitem__(job.seed, outcome))
    assert isinstance(outcomes.pop(1), RuntimeError) and outcomes == {0: True, 2: True, 3: True}


def test_an_interrupt_cancels_every_running_job_and_waits_for_each_to_stop() -> None:
    stopped: list[int] = []

    def start(job: GridJob, cancelled: threading.Event) -> bool:
        if job.seed == 0:
            return True  # ends at once; its report is where the interrupt arrives
        assert cancelled.wait(timeout=10), "a running job was never told to stop"
        time.sleep(0.1)  # stopping a simulation's processes takes a moment
        stopped.append(job.seed)
        return False

    def finished(job: GridJob, outcome: bool | Exception) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_grid(_jobs(5), 3, start, finished)
    assert sorted(stopped) == [1, 2], "both running jobs had stopped before the interrupt propagated"


def test_each_private_ray_gets_an_equal_share_of_the_cores_but_never_less_than_a_client_asks() -> None:
    assert local_ray_cpus(parallel=4, cores=16, client_cpus=2) == 4
    assert local_ray_cpus(parallel=3, cores=16, client_cpus=2) == 5
    assert local_ray_cpus(parallel=2, cores=2, client_cpus=2) == 2


def test_each_simulation_on_a_cluster_holds_an_equal_share_that_one_node_can_host() -> None:
    two_nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 8}]
    # CPUs: 24 / 4 = 6 each; no GPUs asked for, none held.
    assert cluster_share(two_nodes, parallel=4, client_cpus=1, client_gpus=0) == ClusterShare(6, 0)
    # 24 / 2 = 12, which the 16-CPU node holds.
    assert cluster_share(two_nodes, parallel=2, client_cpus=1, client_gpus=0) == ClusterShare(12, 0)
    # One simulation may not span nodes: at most the largest node's 16 CPUs.
    assert cluster_share(two_nodes, parallel=1, client_cpus=1, client_gpus=0) == ClusterShare(16, 0)
    # Never less than one client asks for.
    assert cluster_share(two_nodes, parallel=8, client_cpus=4, client_gpus=0) == ClusterShare(4, 0)
    # Clients on GPUs: whole GPUs (2 / 2 = 1 each), CPUs capped by the nodes that have them.
    assert cluster_share(two_nodes, parallel=2, client_cpus=1, client_gpus=0.25) == ClusterShare(12, 1)
    assert cluster_share(two_nodes, parallel=1, client_cpus=1, client_gpus=0.25) == ClusterShare(16, 2)
    # Fewer GPUs than simulations: each still holds one, and Ray runs the rest as GPUs come free.
    assert cluster_share(two_nodes, parallel=4, client_cpus=1, client_gpus=0.5) == ClusterShare(6, 1)
    # A GPU node of few CPUs: the share's CPUs are what it has, though a CPU-only node has more.
    gpu_node_and_cpu_node = [{"CPU": 4, "GPU": 4}, {"CPU": 64}]
    assert cluster_share(gpu_node_and_cpu_node, parallel=2, client_cpus=1, client_gpus=1) == ClusterShare(4, 2)
