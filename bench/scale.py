"""A federation of 1,000 clients against one of 10, as ratios measured side by side in one run.

Both are Dirichlet(0.5) splits of the default data (every client topped up to 4 examples, batch 4) with 3
clients per round and the held-out set scored only after the last round, so that a round's time is training
and harness. Printed against their targets: time from ``fedsvd run`` to round 0 (start-up, planning,
discovery; at most 2x), the mean time of the unscored rounds with the same clients' training (at most 1.1x),
and the peak memory of the whole process tree, Flower's and Ray's processes included (at most 1.2x). Beside
them, without a target, the CPU that Flower's simulation runtime takes while the unscored rounds run: its
engine polls every node.

Each size runs twice, in the order 10, 1,000, 1,000, 10 clients, so that a machine getting slower or faster
during the bench falls on both sizes alike; the second pair draws with another seed. The two sizes train
different clients, whose Poisson batches and review lengths differ: the raw ratio of their rounds would
partly measure that draw. So every unscored round's clients are trained again afterwards in this process,
alone (the same partitions, seeds, steps and trainable arrays; the runs' rounds alternating), and a round's
harness is its time minus that training. The targeted ratio is a round of the large federation had it trained
the small one's clients: (its harness + their training) / their round.

Usage: python bench/scale.py [--clients 1000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers.utils import logging as transformers_logging

from clients.app import round_seed
from clients.node import client_data, node_settings
from clients.trainer import DpSgdSettings, train_local
from fedsvd.config import ExperimentConfig
from fedsvd.data import tokenize
from fedsvd.federation import data_for
from fedsvd.methods import build_method
from fedsvd.model import build_lora_model, get_arrays, load_tokenizer, set_trainable
from fedsvd.privacy.record_level import PrivacyLedger, sample_rate_for

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Measured:
    cfg: ExperimentConfig
    to_round_0: float
    unscored: list[dict]  # the metrics rows of the unscored rounds
    peak_bytes: int
    runtime_cpu_share: float  # CPU seconds of Flower's simulation runtime per second, while the rounds run


def simulation_runtime(process: psutil.Process) -> psutil.Process | None:
    """The ``flwr-simulation`` process below ``process``: it runs the ServerApp and Flower's engine that hands
    messages to the Ray client actors."""
    for member in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("flwr-simulation" in part for part in member.cmdline()):
                return member
    return None


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def federation(clients: int, rounds: int, seed: int, out_dir: Path) -> Measured:
    settings = {
        "num_clients": clients, "min_partition_size": 4, "batch_size": 4, "rounds": rounds,
        "fraction": 3 / clients, "client_cpus": 2, "eval_every": rounds, "seed": seed,
    }  # fmt: skip
    cfg = ExperimentConfig(**settings, out_dir=str(out_dir))  # type: ignore[arg-type]
    command = [sys.executable, "-m", "fedsvd.cli", "run", "--out", str(out_dir)]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched = psutil.Process(process.pid)
    peak, to_round_0 = 0, None
    # (wall, CPU seconds) of the simulation runtime when round 0 is written and when the last unscored round is.
    runtime, first, last = None, (0.0, 0.0), (0.0, 0.0)
    metrics = out_dir / "metrics.jsonl"
    while process.poll() is None:
        peak = max(peak, tree_rss(watched))
        written = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        if to_round_0 is None and written:
            to_round_0 = time.monotonic() - started
            if (runtime := simulation_runtime(watched)) is not None:
                first = last = (time.monotonic(), cpu_seconds(runtime))
        if runtime is not None and last[0] and written <= rounds:  # rounds 0 .. rounds - 1 are written
            with contextlib.suppress(psutil.Error):
                last = (time.monotonic(), cpu_seconds(runtime))
            if written == rounds:
                runtime = None
        time.sleep(0.5)
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0 or to_round_0 is None:
        raise SystemExit(f"the {clients}-client federation failed:\n{output[-2000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    unscored = [row for row in rows[1:] if row["accuracy"] is None]
    share = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
    return Measured(cfg, to_round_0, unscored, peak, share)


class Retrainer:
    """Trains a federation's recorded rounds again in this process, as its clients did: the same partition,
    tokens, seed, sample rate, noise multiplier, steps and trainable arrays (only the values the arrays start
    from differ, which costs nothing). A client's work also includes tokenising its partition the first time
    it trains, as the federation's one client worker does (``client_cpus = 2`` of 2 cores)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        transformers_logging.disable_progress_bar()  # the bench prints its figures only
        self.num_labels = data_for(cfg).num_labels
        self.tokenizer = load_tokenizer(cfg.model)
        self.tokens: dict[int, dict[str, torch.Tensor]] = {}
        self.model = build_lora_model(
            cfg.model, self.num_labels, cfg.lora_rank, cfg.lora_alpha, cfg.targets, cfg.seed, cfg.pooling
        )
        self.method = build_method(
            cfg.method,
            svd_every=cfg.svd_every,
            svd_warmup=cfg.svd_warmup,
            scaling=cfg.lora_alpha / cfg.lora_rank,
            seed=cfg.seed,
        )

    def seconds(self, row: dict) -> float:
        """Wall seconds of one round's training, its clients one after the other as in the federation."""
        cfg, server_round, total = self.cfg, row["round"], 0.0
        keys = self.method.uplink_keys(get_arrays(self.model, cfg.train_head).keys(), server_round)
        set_trainable(self.model, sorted(keys), cfg.train_head)
        for partition in row["clients"]:
            node = node_settings({"partition-id": partition, "num-partitions": cfg.num_clients})
            examples = client_data(cfg, node, self.num_labels).train
            started = time.perf_counter()
            if partition not in self.tokens:
                self.tokens[partition] = tokenize(examples, self.tokenizer, cfg.max_length)
            tokens = self.tokens[partition]
            with warnings.catch_warnings():
                # Opacus's hooks on a model whose inputs need no gradient: expected, as in the clients.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                train_local(
                    self.model,
                    tokens,
                    steps=cfg.local_steps,
                    lr=cfg.lr,
                    sample_rate=sample_rate_for(cfg.batch_size, len(tokens["labels"])),
                    seed=round_seed(cfg, partition, server_round),
                    device=torch.device("cpu"),
                    dp=DpSgdSettings(row["privacy"][str(partition)]["sigma"], cfg.clip_norm),
                    ledger=PrivacyLedger(cfg.accountant),
                    server_round=server_round,
                )
            total += time.perf_counter() - started
        return total


def training_seconds(runs: list[Measured]) -> list[float]:
    """Each run's mean training per unscored round, retrained alone; the runs' rounds alternate, so that the
    machine's drift falls on all of them alike."""
    retrainers = [Retrainer(run.cfg) for run in runs]
    for retrainer, run in zip(retrainers, runs, strict=True):
        retrainer.seconds(run.unscored[0])  # warm-up: the first steps of a fresh model are slower
        retrainer.tokens.clear()  # the worker tokenised round 1's clients in round 1: so does the timed replay
    timed: list[list[float]] = [[] for _ in runs]
    for rows in zip(*(run.unscored for run in runs), strict=True):
        for retrainer, row, seconds in zip(retrainers, rows, timed, strict=True):
            seconds.append(retrainer.seconds(row))
    return [statistics.fmean(seconds) for seconds in timed]


def line(what: str, large: float, small: float, unit: str, target: float) -> str:
    ratio = large / small
    verdict = "ok" if ratio <= target else "MISSED"
    return f"{what}: {large:.3g} {unit} / {small:.3g} {unit} = {ratio:.2f}x (target <= {target:g}x) {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    # Rounds of 3 tiny clients take 3-5 s and vary by a fifth from one run to the next on a shared machine: the
    # mean of 5 unscored rounds is steadier than of 2.
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    order = [(10, 0), (args.clients, 0), (args.clients, 1), (10, 1)]
    with tempfile.TemporaryDirectory(prefix="fedsvd-scale-") as scratch:
        runs = [federation(size, args.rounds, seed, Path(scratch) / f"{size}-{seed}") for size, seed in order]
    training = training_seconds(runs)
    sizes = {size: [i for i, (each, _) in enumerate(order) if each == size] for size in (args.clients, 10)}

    def mean(values: list[float], size: int) -> float:
        return statistics.fmean(values[i] for i in sizes[size])

    to_round_0 = [run.to_round_0 for run in runs]
    rounds = [statistics.fmean(row["seconds"] for row in run.unscored) for run in runs]
    harness = [each - trained for each, trained in zip(rounds, training, strict=True)]
    large, small = args.clients, 10
    label = f"{large} / 10 clients"
    print(line(f"{label}, fedsvd run to round 0", mean(to_round_0, large), mean(to_round_0, small), "s", 2.0))
    print(
        line(
            f"{label}, an unscored round of 3 clients with the same clients' training (harness + training)",
            mean(harness, large) + mean(training, small), mean(rounds, small), "s", 1.1,
        )
    )  # fmt: skip

    def each_run(values: list[float], size: int) -> str:
        return " and ".join(f"{values[i]:.2f}" for i in sizes[size])

    print(
        f"{label}, per run: an unscored round as run {each_run(rounds, large)} s / {each_run(rounds, small)} s "
        f"= {mean(rounds, large) / mean(rounds, small):.2f}x; its clients' training alone "
        f"{each_run(training, large)} s / {each_run(training, small)} s; harness (round - training) "
        f"{each_run(harness, large)} s / {each_run(harness, small)} s"
    )
    peak = [run.peak_bytes / 2**30 for run in runs]
    print(
        line(
            f"{label}, peak memory of the process tree",
            max(peak[i] for i in sizes[large]), max(peak[i] for i in sizes[small]), "GiB", 1.2,
        )
    )  # fmt: skip
    # Flower's simulation engine asks its state for every node's next message every 0.1 s, in the process that
    # also runs the ServerApp: with many nodes that polling takes CPU, at the lowest priority (server.app).
    share = [100 * run.runtime_cpu_share for run in runs]
    print(
        f"{label}, CPU of Flower's simulation runtime (ServerApp and engine) while the rounds run: "
        f"{mean(share, large):.0f} % / {mean(share, small):.0f} % of a core"
    )


if __name__ == "__main__":
    main()
