"""The real thing at tiny scale: `fedsvd run` on Flower's simulation runtime with Ray, for every method."""

from __future__ import annotations

import csv
import inspect
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import (
    CLIENTS,
    ROOT,
    ROUNDS,
    flower_processes,
    run_comparison,
    run_fedsvd,
    write_comparison,
)
from dp_accounting import dp_event, rdp
from flwr.server.superlink.fleet.vce import vce_api
from safetensors import safe_open
from safetensors.torch import load_file

from fedsvd.config import ExperimentConfig
from fedsvd.model import build_lora_model, get_arrays
from fedsvd.privacy.accounting import RDP_ORDERS
from fedsvd.results import CSV_COLUMNS
from fedsvd.simulation import FLOWER_LOG, flower_environment
from server.app import LOWEST_PRIORITY, yield_engine_polling


@pytest.fixture(scope="module")
def runs(federation_runs: dict[str, Path]) -> dict[str, Path]:
    """The session's shared runs of fedsvd, ffa and fedavg (see conftest)."""
    return federation_runs


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["fedsvd", "ffa", "fedavg"])
def test_run_writes_every_round_and_the_results(runs: dict[str, Path], method: str) -> None:
    out_dir = runs[method]
    rows = _rows(out_dir)
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    required = {"round", "method", "accuracy", "loss", "epsilon_max", "clients", "bytes_up", "bytes_down", "seconds"}
    for row in rows:
        assert required <= set(row)
        assert row["method"] == method
        assert 0.0 <= row["accuracy"] <= 1.0
    for row in rows[1:]:
        assert len(row["clients"]) == 2 and row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert set(row["privacy"]) == {str(p) for p in row["clients"]}
        for entry in row["privacy"].values():
            assert {"epsilon", "sigma", "sample_rate", "steps", "delta"} <= set(entry)
            assert 0 < entry["epsilon"] <= 4.0 + 1e-6 and entry["delta"] == 1e-3
    with (out_dir / "metrics.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == CSV_COLUMNS and len(table) == ROUNDS + 1
    assert 'method = "' + method + '"' in (out_dir / "config.toml").read_text()
    assert json.loads((out_dir / "summary.json").read_text())["rounds"] == ROUNDS


def test_the_engines_polling_yields_to_training_in_a_real_run(runs: dict[str, Path]) -> None:
    """The ServerApp finds the thread of Flower's own simulation engine, in its process, and lowers it."""
    assert (
        "the simulation engine polls its nodes at the lowest CPU priority" in (runs["fedsvd"] / FLOWER_LOG).read_text()
    )


def test_only_the_engines_polling_thread_is_lowered() -> None:
    stop = threading.Event()
    # Started as Flower starts it (vce_api.run_api), which names the thread after its target.
    assert "target=add_messages_to_queue" in inspect.getsource(vce_api.run_api)
    poller = threading.Thread(target=vce_api.add_messages_to_queue, args=(None, queue.Queue(), {}, stop))
    bystander = threading.Thread(target=stop.wait)
    for thread in (poller, bystander):
        thread.start()
    try:
        assert yield_engine_polling()
        assert os.getpriority(os.PRIO_PROCESS, poller.native_id) == LOWEST_PRIORITY
        assert os.getpriority(os.PRIO_PROCESS, bystander.native_id) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        stop.set()
        for thread in (poller, bystander):
            thread.join()
    assert not yield_engine_polling()  # as in deployment: no engine, nothing lowered


def test_client_workers_of_a_private_ray_train_at_the_runs_own_priority(tmp_path: Path) -> None:
    """Ray starts its workers at nice 15 unless told otherwise: the clients' training would then yield to
    every helper of the run, Flower's engine polling 1,000 nodes included. A private Ray started with the
    run's environment, as Flower's backend starts it, must run its workers at the run's own priority."""
    env = flower_environment(tmp_path, ExperimentConfig())
    worker_priority = (
        "import os, ray\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "print(ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote()))\n"
    )
    started = subprocess.run(
        [sys.executable, "-c", worker_priority], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert int(started.stdout.split()[-1]) == os.getpriority(os.PRIO_PROCESS, 0)


@pytest.mark.parametrize("method", ["fedsvd", "ffa", "fedavg"])
def test_each_clients_epsilon_is_cumulative_and_never_decreases(runs: dict[str, Path], method: str) -> None:
    last_epsilon: dict[str, float] = {}
    last_steps: dict[str, int] = {}
    for row in _rows(runs[method])[1:]:
        for client, entry in row["privacy"].items():
            assert entry["epsilon"] > last_epsilon.get(client, 0.0)
            assert entry["steps"] == last_steps.get(client, 0) + 3, "steps are cumulative over rounds"
            last_epsilon[client], last_steps[client] = entry["epsilon"], entry["steps"]
        assert row["epsilon_max"] == pytest.approx(max(last_epsilon.values()))


def test_sampling_is_the_same_for_every_method(runs: dict[str, Path]) -> None:
    sequences = {method: [row["clients"] for row in _rows(out)] for method, out in runs.items()}
    assert sequences["fedsvd"] == sequences["ffa"] == sequences["fedavg"]


def _initial_arrays(tiny_bert: Path) -> dict[str, torch.Tensor]:
    # The runs use the config's defaults for everything the test does not set (rank 8, mean pooling, seed 0).
    model = build_lora_model(str(tiny_bert), 2, 8, 8.0, ("query", "value"), seed=0, pooling="mean")
    return get_arrays(model, train_head=True)


def test_final_adapters_follow_each_methods_rule(runs: dict[str, Path], tiny_bert: Path) -> None:
    initial = _initial_arrays(tiny_bert)
    adapters = {method: load_file(str(out / "adapter.safetensors")) for method, out in runs.items()}
    a_keys = [k for k in initial if k.endswith("lora_A.weight")]
    b_keys = [k for k in initial if k.endswith("lora_B.weight")]
    for method, arrays in adapters.items():
        assert set(arrays) == set(initial), method
        assert any(not torch.equal(arrays[k], initial[k]) for k in b_keys), f"{method}: B never trained"
    for k in a_keys:
        assert torch.equal(adapters["ffa"][k], initial[k]), "FFA-LoRA must never change A"
        assert not torch.equal(adapters["fedavg"][k], initial[k]), "FedAvg-LoRA trains A"
        a = adapters["fedsvd"][k].double()
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["fedsvd", "ffa", "fedavg"])
def test_every_reported_epsilon_is_recomputed_by_dp_accounting(runs: dict[str, Path], method: str) -> None:
    """privacy.json holds each client's history; Google's accountant re-derives every epsilon in metrics.jsonl."""
    report = json.loads((runs[method] / "privacy.json").read_text())
    assert report["delta"] == 1e-3 and report["accountant"] == "rdp"
    participations: dict[str, int] = {}
    for row in _rows(runs[method])[1:]:
        assert not row["rejected"], row["rejected"]
        for client, entry in row["privacy"].items():
            participations[client] = participations.get(client, 0) + 1
            history = report["clients"][client]["history"][: participations[client]]
            accountant = rdp.RdpAccountant(RDP_ORDERS)
            for sigma, rate, steps in history:
                accountant.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), steps)
            assert entry["epsilon"] == pytest.approx(accountant.get_epsilon(1e-3), rel=5e-3)
    for client, entry in report["clients"].items():
        assert len(entry["rounds"]) == participations.get(client, 0)
        assert entry["epsilon"]["rdp"] <= 4.0 + 1e-6 and entry["epsilon"]["prv"] <= entry["epsilon"]["rdp"]


@pytest.mark.starts(1)
def test_expected_participation_skips_clients_at_their_budget_and_never_exceeds_it(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    """5 rounds x 2 of 3 clients, noise planned for ceil(5 x 0.6) = 3 rounds each: 10 slots, 9 of budget.

    The same run scores the held-out set every other round on a sample (eval_every, eval_sample)."""
    result = run_fedsvd(
        tmp_path, tiny_bert, sentiment_csv, "--set", "rounds=5", "--set", "fraction=0.6",
        "--set", "planned_participation=expected", "--set", "eval_every=2", "--set", "eval_sample=40",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    participations: dict[str, int] = {}
    for row in rows[1:]:
        assert not row["rejected"], row["rejected"]
        for client in map(str, row["clients"]):
            participations[client] = participations.get(client, 0) + 1
    assert max(participations.values()) <= 3, participations
    assert sum(participations.values()) < 10, "some client must have been skipped or the run stopped"
    assert all(eps <= 4.0 + 1e-9 for row in rows for eps in row["epsilon"].values())
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert all(entry["epsilon"]["rdp"] <= 4.0 + 1e-9 for entry in report["clients"].values())
    if summary["stopped_early"]:
        assert "no client has privacy budget left" in summary["stopped_early"]
        assert summary["rounds"] == rows[-1]["round"] < 5
    else:
        assert rows[-1]["round"] == 5

    # Rounds 0, 2 and 4 on the same 40 of the about 60 held-out examples, round 5 on all of them, the others not at
    # all; the summary's final accuracy is the last adapter's on all of them, also after an early stop.
    for row in rows:
        if row["round"] == 5:
            assert row["eval_examples"] > 40 and not row["eval_sampled"]
            assert summary["final_accuracy"] == row["accuracy"]
        elif row["round"] % 2 == 0:
            assert row["eval_examples"] == 40 and row["eval_sampled"] and 0 <= row["accuracy"] <= 1
        else:
            assert row["accuracy"] is None and row["loss"] is None and row["eval_examples"] == 0
    assert 0 <= summary["final_accuracy"] <= 1
    assert "acc   -    |" in result.stdout and "acc~" in result.stdout


@pytest.mark.starts(1)
def test_client_level_dp_with_poisson_sampling_is_accounted_every_round(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    """3 rounds, each client sampled with probability 0.6; the federation's client-level epsilon after every round
    is recomputed by Google's accountant from the mechanism privacy.json records, next to record-level DP."""
    result = run_fedsvd(
        tmp_path, tiny_bert, sentiment_csv, "--set", "rounds=3", "--set", "fraction=0.6", "--set", "client_dp=true",
        "--set", "client_sampling=poisson", "--set", "client_epsilon=30", "--set", "client_clip_norm=0.05",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client-level DP: target eps 30 at delta 0.001 over 3 rounds, Poisson sampling at q = 0.6" in result.stdout
    level = json.loads((tmp_path / "privacy.json").read_text())["client_level"]
    assert level["rounds"] == [1, 2, 3] and level["sample_rate"] == 0.6 and level["denominator"] == 0.6 * CLIENTS
    assert level["noise_std"] == pytest.approx(level["noise_multiplier"] * 0.05 / (0.6 * CLIENTS))
    rows = _rows(tmp_path)
    assert rows[0]["client_epsilon"] == 0.0
    for row in rows[1:]:
        event = dp_event.PoissonSampledDpEvent(0.6, dp_event.GaussianDpEvent(level["noise_multiplier"]))
        google = rdp.RdpAccountant(RDP_ORDERS).compose(event, row["round"]).get_epsilon(1e-3)
        assert row["client_epsilon"] == pytest.approx(google, rel=5e-3)
        assert row["client_epsilon"] <= 30 and row["epsilon_max"] <= 4.0 + 1e-9  # both guarantees, side by side
        assert all(0 < scale < 1 for scale in row["clipped"].values())
    assert rows[-1]["client_epsilon"] == pytest.approx(30, rel=5e-3)
    assert level["epsilon"]["rdp"] == rows[-1]["client_epsilon"] and level["epsilon"]["prv"] < 30
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["client_epsilon"] == rows[-1]["client_epsilon"] and summary["client_epsilon_target"] == 30
    assert sum("client eps" in line for line in result.stdout.splitlines()) == 4


@pytest.mark.starts(4)
def test_compare_runs_the_other_four_methods_by_their_rules(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    """`fedsvd compare` over real simulations of FedSA-LoRA, RoLoRA, FLoRA and FedEx-LoRA, two at a time on this
    machine, each on a private Ray of its share of the cores; then resume and report."""
    before = flower_processes()
    methods = ["fedsa", "rolora", "flora", "fedex"]
    grid = {method: {} for method in methods}
    # FedSA-LoRA needs local held-out slices; the others hold them out too, so that all draw the same clients.
    spec = write_comparison(tmp_path / "compare.toml", tiny_bert, sentiment_csv, grid, local_eval_fraction=0.1)
    out = tmp_path / "out"
    result = run_comparison(spec, out, "--jobs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to 2 simulations at once, each on a private Ray" in result.stdout, result.stdout
    assert flower_processes() <= before, "the comparison left Flower or Ray processes behind"
    runs = {method: out / method / "seed-0" for method in methods}

    sequences = {method: [row["clients"] for row in _rows(directory)] for method, directory in runs.items()}
    assert len({json.dumps(sequence) for sequence in sequences.values()}) == 1, sequences
    for method, directory in runs.items():
        rows = _rows(directory)
        assert [row["round"] for row in rows] == list(range(ROUNDS + 1)) and not any(row["rejected"] for row in rows)
        assert all(0 < eps <= 4.0 + 1e-6 for eps in rows[-1]["epsilon"].values()), method
        assert all(0 <= row["local_accuracy"] <= 1 for row in rows[1:]), "every client scores its held-out slice"

    initial = _initial_arrays(tiny_bert)
    a_keys = sorted(k for k in initial if k.endswith("lora_A.weight"))
    for method in ("fedsa", "rolora"):
        adapter = load_file(str(runs[method] / "adapter.safetensors"))
        assert set(adapter) == set(initial)
        for a_key in a_keys:
            b_key = a_key.replace("lora_A", "lora_B")
            assert not torch.equal(adapter[a_key], initial[a_key]) and adapter[b_key].any(), method
    pretrained = build_lora_model(str(tiny_bert), 2, 8, 8.0, ("query", "value"), seed=0, pooling="mean")
    bases = {
        k: v for k, v in get_arrays(pretrained, True, base_weights=True).items() if k.endswith("base_layer.weight")
    }
    for method in ("flora", "fedex"):
        with safe_open(str(runs[method] / "adapter.safetensors"), "pt") as handle:
            assert handle.metadata()["includes_base_weights"] == "true"
        adapter = load_file(str(runs[method] / "adapter.safetensors"))
        assert set(bases) <= set(adapter)
        assert all(not torch.equal(adapter[k], bases[k]) for k in bases), f"{method}: updates merged into the base"
        rows = _rows(runs[method])[1:]
        assert all(row["bytes_down"] > 2 * row["bytes_up"] for row in rows), "the downlink carries full-rank weights"
    flora = load_file(str(runs["flora"] / "adapter.safetensors"))
    assert all(not flora[a_key.replace("lora_A", "lora_B")].any() for a_key in a_keys), "FLoRA restarts with B = 0"

    with (out / "summary.csv").open() as handle:
        summary = {row["run"]: row for row in csv.DictReader(handle)}
    assert set(summary) == set(grid) and all(row["seeds_done"] == "1/1" for row in summary.values())
    for name in ("accuracy_vs_round.png", "epsilon_vs_round.png", "accuracy_vs_uplink.png"):
        assert (out / name).stat().st_size > 10_000

    resumed = run_comparison(spec, out, "--resume", "--jobs", "2")
    assert resumed.returncode == 0 and resumed.stdout.count("done earlier, skipped") == len(grid), resumed.stdout
    (out / "summary.csv").unlink()
    reported = subprocess.run([sys.executable, "-m", "fedsvd.cli", "report", str(out)], cwd=ROOT, text=True,
                              capture_output=True)  # fmt: skip
    assert reported.returncode == 0 and (out / "summary.csv").is_file(), reported.stderr
