"""Scale-out simulation on a Ray cluster started with `ray start --head`: `fedsvd run` joins it with its clients,
and `fedsvd compare --jobs N` puts each simulation on a node of it as a task (the shared runs are made so)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from conftest import (
    ROOT,
    RayCluster,
    federation_run_arguments,
    fedsvd_command,
    flower_processes,
    left_behind,
    process_tree,
    survivors,
    timeless_rows,
)
from safetensors.torch import load_file

from fedsvd.config import ExperimentConfig
from fedsvd.simulation import ray_address


def test_ray_address_comes_from_the_config_then_the_environment_then_a_private_local_ray() -> None:
    cfg = ExperimentConfig()
    assert ray_address(cfg.replace(ray_address="10.0.0.1:6379"), {"RAY_ADDRESS": "10.0.0.2:6379"}) == "10.0.0.1:6379"
    assert ray_address(cfg, {"RAY_ADDRESS": "10.0.0.2:6379"}) == "10.0.0.2:6379"
    assert ray_address(cfg, {"RAY_ADDRESS": ""}) == ray_address(cfg, {}) == "local"


def test_a_run_that_joins_the_cluster_computes_what_two_side_by_side_on_it_computed(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, ray_cluster: RayCluster, federation_runs: dict[str, Path]
) -> None:
    """The shared runs came from `fedsvd compare --jobs 2` on the cluster: each a task with a private Ray there.
    `fedsvd run` (one at a time) joins the cluster itself, its clients actors of the cluster, and must compute
    the same FedSVD rounds and adapter, bit for bit."""
    cluster = process_tree(ray_cluster.head)
    before = flower_processes()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    joining = ("--set", f"ray_address={ray_cluster.address}", "--set", "client_cpus=1")
    # A client no node of the cluster can host would wait forever: refused before anything starts.
    command = fedsvd_command(tmp_path / "none", tiny_bert, sentiment_csv, *joining, "--set", "client_cpus=3")
    too_big = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert too_big.returncode == 2 and len(too_big.stderr.strip().splitlines()) == 1, too_big.stderr
    assert "client_cpus = 3, client_gpus = 0: no node of the Ray cluster" in too_big.stderr
    assert not (tmp_path / "none").exists()

    drivers, workers = (set(ray_cluster.logs.glob(f"python-core-{kind}-*.log")) for kind in ("driver", "worker"))
    out_dir = tmp_path / "joined"
    command = fedsvd_command(out_dir, tiny_bert, sentiment_csv, *federation_run_arguments("fedsvd"), *joining)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # The simulation's driver and its client actors ran on the cluster itself: Ray logs them in its session.
    assert set(ray_cluster.logs.glob("python-core-driver-*.log")) - drivers, "the run did not join the cluster"
    assert set(ray_cluster.logs.glob("python-core-worker-*.log")) - workers, "no client actor ran on the cluster"

    side_by_side = federation_runs["fedsvd"]
    assert timeless_rows(out_dir) == timeless_rows(side_by_side), "--jobs 2 and one at a time: the same rounds"
    adapters = [load_file(str(run / "adapter.safetensors")) for run in (out_dir, side_by_side)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])
    # Joining a cluster must not stop it: the run only stops what it started itself.
    assert len(survivors(cluster)) == len(cluster), "the run stopped (part of) the cluster it joined"
    assert not left_behind(before), "the run left Flower or Ray processes behind"
