"""The ``fedsvd`` command: run one simulated federation, compare runs over seeds, report, plan privacy.

Every command validates its whole input first: a bad config, comparison file, dataset or model is one
line on stderr naming the key or file, exit code 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fedsvd.compare import Comparison, load_comparison, run_dir
from fedsvd.config import ConfigError, ExperimentConfig, load_config, ray_host_port, read_toml, resume_conflict
from fedsvd.data import HUB_TASKS, DataError, truncation_share
from fedsvd.federation import ClientPlan, client_level_plan, data_for, plan_federation
from fedsvd.model import ModelError, check_model, tokenizer_for
from fedsvd.privacy.accountants import PrivacyConfigError
from fedsvd.privacy.accounting import epsilon_of
from fedsvd.privacy.client_level import ClientLevelPlan
from fedsvd.privacy.record_level import check_batch_size
from fedsvd.results import (
    ADAPTER_FILE,
    CHECKPOINT_FILE,
    CONFIG_TOML,
    METRICS_JSONL,
    PRIVACY_JSON,
    SUMMARY_JSON,
    progress_line,
    read_metrics,
)
from fedsvd.simulation import ray_address

USER_ERRORS = (ConfigError, DataError, ModelError, PrivacyConfigError)

EXIT_USAGE = 2
# What a run writes into its directory (see results.py): any of them there means another run's results.
RESULT_FILES = (SUMMARY_JSON, METRICS_JSONL, CHECKPOINT_FILE, PRIVACY_JSON, ADAPTER_FILE, CONFIG_TOML)
# How long the pre-flight check waits for a Ray cluster to accept a connection.
RAY_CONNECT_TIMEOUT_S = 3.0


def _fail(message: str) -> int:
    print(f"fedsvd: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _out_dir(cfg: ExperimentConfig, requested: str | None) -> Path:
    chosen = requested or cfg.out_dir
    if chosen:
        return Path(chosen).expanduser().resolve()
    return Path("results", f"{cfg.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}").resolve()


# Without a terminal to rewrite a line in, what a round waits for is printed at most this often.
WAITING_LINE_EVERY_S = 60.0


class _Console:
    """A line per round; in between, what the round is waiting for (clients replied, scoring): on a terminal
    one line rewritten in place, otherwise a line at most once a minute, so that logs stay short but a long
    round still shows that it moves."""

    def __init__(self, prefix: str = "", rewritable: bool = True) -> None:
        self.prefix = prefix
        self.rewritable = rewritable and sys.stdout.isatty()
        self.live = False  # a rewritable line is on screen
        self.last_line = time.monotonic()

    def round(self, row: dict) -> None:
        self.clear()
        print(self.prefix + progress_line(row), flush=True)
        self.last_line = time.monotonic()

    def waiting(self, text: str) -> None:
        if self.rewritable:
            print("\r\x1b[K" + self.prefix + text, end="", flush=True)
            self.live = True
        elif time.monotonic() - self.last_line >= WAITING_LINE_EVERY_S:
            print(self.prefix + text, flush=True)
            self.last_line = time.monotonic()

    def clear(self) -> None:
        if self.live:
            print("\r\x1b[K", end="", flush=True)
            self.live = False

    def __enter__(self) -> _Console:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.clear()


def _check_out_dir(out_dir: Path, option: str) -> None:
    """Refuse an output directory that cannot be created or written, before anything starts and writing nothing:
    a probe directory is created and removed in it, or in the nearest existing directory above it (where the run
    will create it)."""
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out_dir else f"cannot be created: {str(existing)!r} is a file"
        raise ConfigError(f"{option} {str(out_dir)!r} {where}, not a directory; choose another directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedsvd-probe-", dir=existing))
    except OSError as err:
        raise ConfigError(
            f"{option} {str(out_dir)!r} cannot be written ({str(existing)!r}: {err.strerror or err}); "
            "choose another directory"
        ) from None


def _check_resources(cfg: ExperimentConfig) -> None:
    """What the run asks of this machine or of the Ray cluster it joins.

    CPU cores and GPUs are checked against this machine for a private local Ray, and against the cluster's live
    nodes for one named by address (which must accept a connection first); 'auto' is left to Ray, which resolves
    it from its own session files.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' is not allowed: no CUDA GPU is visible here; use 'auto' or 'cpu'")
    address = ray_address(cfg, os.environ)
    key = "ray_address" if cfg.ray_address else "RAY_ADDRESS"
    if address == "local":
        cores = os.cpu_count() or 1
        if cfg.client_cpus > cores:
            raise ConfigError(
                f"client_cpus = {cfg.client_cpus} is not allowed: must be <= {cores}, the CPU cores of this machine "
                "(Ray would never schedule a client)"
            )
        if cfg.client_gpus > 0 and not torch.cuda.is_available():
            raise ConfigError(
                f"client_gpus = {cfg.client_gpus!r} is not allowed: must be 0, no CUDA GPU is visible here "
                "(Ray would never schedule a client)"
            )
    elif address != "auto":
        endpoint = ray_host_port(address)
        if endpoint is None:  # the config's own value is checked with the config: this one came from $RAY_ADDRESS
            raise ConfigError(f"{key} = {address!r} is not allowed: must be 'local', 'auto' or host:port")
        try:
            socket.create_connection(endpoint, timeout=RAY_CONNECT_TIMEOUT_S).close()
        except OSError as err:
            raise ConfigError(
                f"{key} = {address!r}: no Ray cluster answers there within {RAY_CONNECT_TIMEOUT_S:g} s "
                f"({err.strerror or err}); start one with `ray start --head`, or leave ray_address empty for a "
                "private local Ray"
            ) from None
        _check_cluster_fits(cfg, address, key)


def _check_cluster_fits(cfg: ExperimentConfig, address: str, key: str) -> None:
    """Ray queues a task until some node can host it, forever: refuse a client that no live node of the cluster
    has the CPUs and GPUs for. Costs a short connection to the cluster as a driver."""
    import ray

    try:
        nodes = _join_cluster(address, key)
    finally:
        ray.shutdown()
    if not any(r.get("CPU", 0) >= cfg.client_cpus and r.get("GPU", 0) >= cfg.client_gpus for r in nodes):
        cpus = max((r.get("CPU", 0) for r in nodes), default=0)
        gpus = max((r.get("GPU", 0) for r in nodes), default=0)
        raise ConfigError(
            f"client_cpus = {cfg.client_cpus}, client_gpus = {cfg.client_gpus:g}: no node of the Ray cluster at "
            f"{key} = {address!r} has that many (at most {cpus:g} CPUs and {gpus:g} GPUs on one node); Ray would "
            "never schedule a client"
        )


def _join_cluster(address: str, key: str) -> list[dict[str, float]]:
    """Join the Ray cluster at ``address`` as a driver; returns every live node's resources."""
    import ray

    with warnings.catch_warnings():  # Ray's notices about its future defaults say nothing here
        warnings.simplefilter("ignore")
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
        except ConnectionError as err:
            raise ConfigError(f"{key} = {address!r}: no Ray cluster to join ({str(err).splitlines()[0]})") from None
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _check_batch_size(cfg: ExperimentConfig, plans: Sequence[ClientPlan]) -> None:
    smallest = min(plans, key=lambda plan: plan.num_examples)
    check_batch_size(cfg.batch_size, smallest.num_examples, f"client {smallest.partition_id}")


def preflight(cfg: ExperimentConfig) -> tuple[list[ClientPlan], PreTrainedTokenizerBase]:
    """Everything that can be wrong with a run, found before any process starts: what it asks of this machine or
    its Ray cluster, the model (built on the meta device, no weights loaded), the data, and every client's privacy
    plan. Returns the plans and the model's tokenizer."""
    _check_resources(cfg)
    tokenizer = check_model(
        cfg.model, targets=cfg.targets, rank=cfg.lora_rank, max_length=cfg.max_length, pooling=cfg.pooling
    )
    plans = plan_federation(cfg)
    _check_batch_size(cfg, plans)
    return plans, tokenizer


# Beyond this many clients the console shows a summary; `fedsvd plan` and the run's files keep every value.
CONSOLE_LIST_LIMIT = 12


def _values(values: Sequence[float], form: str) -> str:
    """Every value for a small federation, min / median / max for a large one."""
    if len(values) <= CONSOLE_LIST_LIMIT:
        return ", ".join(form.format(value) for value in values)
    low, middle, high = min(values), statistics.median_low(values), max(values)
    return f"min {form.format(low)}, median {form.format(middle)}, max {form.format(high)} (fedsvd plan lists each)"


def _truncation_line(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """How much of the clients' training text ``max_length`` cuts off, so that a too short one is seen up front."""
    partitions = data_for(cfg).partitions
    truncated = sum(truncation_share(part, tokenizer, cfg.max_length) * len(part) for part in partitions)
    share = truncated / max(1, sum(len(part) for part in partitions))
    return f"max_length {cfg.max_length} truncates {100 * share:.1f} % of training examples"


def _resumed_config(directory: str, overrides: Sequence[str]) -> tuple[ExperimentConfig, Path]:
    """The config of an unfinished run, with the overrides a resume may make; ConfigError when it cannot go on."""
    out_dir = Path(directory).expanduser().resolve()
    stored_file = out_dir / CONFIG_TOML
    if (out_dir / SUMMARY_JSON).is_file():
        raise ConfigError(f"--resume {str(out_dir)!r}: that run has finished ({SUMMARY_JSON} exists)")
    if not (out_dir / CHECKPOINT_FILE).is_file() or not stored_file.is_file():
        raise ConfigError(
            f"--resume {str(out_dir)!r}: no {CHECKPOINT_FILE} there, so no completed round to resume from"
        )
    stored = load_config(stored_file)
    cfg = load_config(stored_file, overrides)
    if conflict := resume_conflict(stored.to_flat(), cfg):
        raise ConfigError(conflict)
    return cfg.replace(resume=True, out_dir=str(out_dir)), out_dir


def _interrupted(out_dir: Path, code: int, what: str) -> int:
    resumable = (out_dir / CHECKPOINT_FILE).is_file() and not (out_dir / SUMMARY_JSON).is_file()
    hint = f"; continue with: fedsvd run --resume {out_dir} (or fedsvd compare --resume)" if resumable else ""
    print(f"fedsvd: {what}: every process of the run was stopped{hint}", file=sys.stderr)
    return code


def _partition_description(cfg: ExperimentConfig) -> str:
    if cfg.partition != "dirichlet":
        return cfg.partition
    floor = f", topped up to >= {cfg.min_partition_size} examples" if cfg.min_partition_size else ""
    return f"dirichlet alpha {cfg.dirichlet_alpha:g}{floor}"


def command_run(args: argparse.Namespace) -> int:
    from fedsvd.simulation import run_simulation

    try:
        if args.resume:
            if args.config or args.out:
                raise ConfigError("--resume DIR continues the run in DIR: give no CONFIG and no --out with it")
            cfg, out_dir = _resumed_config(args.resume, args.set or ())
        else:
            cfg = load_config(args.config, args.set or ())
            out_dir = _out_dir(cfg, args.out)
            if held := [name for name in RESULT_FILES if (out_dir / name).exists()]:
                unfinished = "" if held[0] == SUMMARY_JSON else ", or continue its unfinished run with --resume"
                raise ConfigError(
                    f"--out {str(out_dir)!r} already holds results ({held[0]}); choose another directory{unfinished}"
                )
        _check_out_dir(out_dir, "--resume" if args.resume else "--out")
        action = f"resuming {out_dir}" if cfg.resume else str(out_dir)
        print(f"fedsvd run: {cfg.method} on {cfg.dataset}, model {cfg.model}, {cfg.rounds} rounds -> {action}")
        plans, tokenizer = preflight(cfg)
        print(
            f"clients: {cfg.num_clients} ({_partition_description(cfg)}), examples per client: "
            + _values([plan.num_examples for plan in plans], "{:d}")
        )
        if cfg.dp:
            print(
                f"DP-SGD: target eps {cfg.epsilon:g} at delta {cfg.delta:g} over {cfg.rounds * cfg.local_steps} "
                f"planned steps, clip {cfg.clip_norm:g}, noise multipliers: "
                + _values([plan.noise_multiplier for plan in plans], "{:.2f}")
            )
        if (client_level := client_level_plan(cfg)) is not None:
            print(_client_level_line(cfg, client_level))
        print(_truncation_line(cfg, tokenizer))
    except USER_ERRORS as err:
        return _fail(str(err))

    # SIGTERM and SIGHUP (a closed terminal) would skip the clean-up that stops the SuperLink, SuperExec and
    # Ray: leave through it. Ctrl-C does too, as KeyboardInterrupt.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _: sys.exit(128 + number))
    started = time.monotonic()
    try:
        with _Console() as console:
            finished = run_simulation(cfg, out_dir, console.round, console.waiting)
    except KeyboardInterrupt:
        return _interrupted(out_dir, 128 + signal.SIGINT, "interrupted")
    except SystemExit as exit_:
        return _interrupted(out_dir, int(exit_.code or 1), f"stopped by signal {int(exit_.code or 1) - 128}")
    rows = read_metrics(out_dir)
    summary = json.loads((out_dir / SUMMARY_JSON).read_text()) if finished else {}
    if not finished or not rows:
        print(f"fedsvd: the run did not finish: {_last_error(out_dir)}", file=sys.stderr)
        return 1
    if summary.get("failed"):
        print(
            f"fedsvd: the run stopped: {summary['failed']}; results up to round {summary['rounds']} are in {out_dir}",
            file=sys.stderr,
        )
        return 1
    last = rows[-1]
    dropped = sum(1 for row in rows if row.get("dropped"))
    print(
        f"done in {time.monotonic() - started:.0f}s: final accuracy {summary['final_accuracy']:.4f}, "
        f"max epsilon {last['epsilon_max']:.3f}"
        + (f" (target {cfg.epsilon:g}, delta {cfg.delta:g})" if cfg.dp else " (no DP)")
        + (f"; {dropped} round(s) dropped, see metrics.jsonl" if dropped else "")
        + f"; results in {out_dir} ({SUMMARY_JSON}, metrics.jsonl, metrics.csv, adapter.safetensors)"
    )
    return 0


# A Python exception as Flower and Ray log it, e.g. "ValueError: Target modules {'qkv'} not found in the base model".
_EXCEPTION_LINE = re.compile(r"\b([A-Za-z_.]*(?:Error|Exception)): (.+)")


def _last_error(out_dir: Path) -> str:
    """Why the run ended, from Flower's log, so that the console says why and not only where to look: the
    server's own reason when it gave one, else the last exception that Flower or Ray logged."""
    log_path = out_dir / "flower.log"
    ours: list[str] = []
    raised: list[str] = []
    if log_path.is_file():
        for line in log_path.read_text(errors="replace").splitlines():
            if "fedsvd: cannot run:" in line or "fedsvd: stopping:" in line:
                ours.append(line.split("fedsvd: ", 1)[1])
            elif match := _EXCEPTION_LINE.search(line):
                raised.append(f"{match.group(1)}: {match.group(2)[:200]}")
    reason = ours[-1] if ours else raised[-1] if raised else "no reason was logged"
    return f"{reason} (see {log_path})"


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _check_comparison_dir(out_dir: Path, comparison: Comparison, resume: bool) -> None:
    """Refuse to mix results: a new comparison needs an empty directory, a resumed one the same runs."""
    from fedsvd.report import COMPARISON_JSON

    record_path = out_dir / COMPARISON_JSON
    if record_path.is_file():
        if not resume:
            raise ConfigError(f"--out {str(out_dir)!r} already holds a comparison; pass --resume to continue it")
        stored, current = json.loads(record_path.read_text()), comparison.to_record()
        if (stored["base"], stored["runs"]) != (current["base"], current["runs"]):
            raise ConfigError(
                f"--out {str(out_dir)!r} holds a comparison with other settings or runs; choose another directory"
            )
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {str(out_dir)!r} is not empty and holds no comparison; choose another directory")


def _grid_ray(parallel: int, configs: Sequence[ExperimentConfig]) -> tuple[str, str] | None:
    """The Ray that the simulations of a grid run side by side on, and the key that named it (None: one at a time,
    each on the Ray its config names)."""
    if parallel == 1:
        return None
    addresses = sorted({ray_address(cfg, os.environ) for cfg in configs})
    key = "ray_address" if any(cfg.ray_address for cfg in configs) else "RAY_ADDRESS"
    if len(addresses) > 1:
        raise ConfigError(
            f"--jobs {parallel} is not allowed: the runs name different Rays ({key} = "
            f"{', '.join(map(repr, addresses))}); give them one, or use --jobs 1"
        )
    return addresses[0], key


def command_compare(args: argparse.Namespace) -> int:
    from fedsvd.grid import ClusterShare, GridJob, cluster_share, local_ray_cpus, run_grid
    from fedsvd.report import COMPARISON_JSON, SUMMARY_MD, render
    from fedsvd.simulation import run_simulation, run_simulation_on_cluster

    try:
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs} is not allowed: must be >= 1")
        comparison = load_comparison(args.config, args.seeds)
        out_dir = Path(args.out or Path("results", f"compare-{Path(args.config).stem}-{_stamp()}")).resolve()
        _check_comparison_dir(out_dir, comparison, args.resume)
        _check_out_dir(out_dir, "--out")
        grid = [(run, seed, comparison.config(run, seed)) for seed in comparison.seeds for run in comparison.runs]
        side_by_side = _grid_ray(args.jobs, [cfg for _, _, cfg in grid])
        for _, _, cfg in grid:
            preflight(cfg)
        cores: int | None = None
        share: ClusterShare | None = None
        if side_by_side is not None and side_by_side[0] == "local":
            cores = os.cpu_count() or 1
        elif side_by_side is not None:
            # Joined for the whole grid: each simulation becomes a task of this driver.
            share = cluster_share(
                _join_cluster(*side_by_side),
                args.jobs,
                max(cfg.client_cpus for _, _, cfg in grid),
                max(cfg.client_gpus for _, _, cfg in grid),
            )
    except USER_ERRORS as err:
        return _fail(str(err))

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _: sys.exit(128 + number))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMPARISON_JSON).write_text(json.dumps(comparison.to_record(), indent=2) + "\n")
    print(
        f"fedsvd compare: {len(comparison.runs)} runs x {len(comparison.seeds)} seeds "
        f"({', '.join(run.name for run in comparison.runs)}) -> {out_dir}"
    )
    jobs: list[GridJob] = []
    for index, (run, seed, cfg) in enumerate(grid, start=1):
        job = GridJob(
            f"[{index}/{len(grid)}] {run.name} seed {seed}", run.name, seed, cfg, run_dir(out_dir, run.name, seed)
        )
        if (job.directory / SUMMARY_JSON).is_file():
            print(f"{job.label}: done earlier, skipped")
        else:
            jobs.append(job)
    if cores is not None:
        largest = max(cfg.client_cpus for _, _, cfg in grid)
        print(
            f"up to {args.jobs} simulations at once, each on a private Ray of "
            f"{local_ray_cpus(args.jobs, cores, largest)} of the {cores} CPUs"
            + (
                " (a client asks for more than an equal share: they share the cores)"
                if largest > cores // args.jobs
                else ""
            )
        )
    if share is not None:
        assert side_by_side is not None
        print(
            f"up to {args.jobs} simulations at once on the Ray cluster at {side_by_side[0]}, each a task holding "
            f"CPUs: {share.cpus}, GPUs: {share.gpus} of one node, with a private Ray there; results go straight "
            f"to {out_dir}, which every node must see"
        )

    def start(job: GridJob, cancelled: threading.Event) -> bool:
        resume = (job.directory / CHECKPOINT_FILE).is_file()
        if job.directory.exists() and not resume:
            # Interrupted before its first checkpoint: keep its files for inspection, start this one clean.
            job.directory.rename(job.directory.with_name(f"{job.directory.name}.incomplete-{_stamp()}"))
        print(f"{job.label}: {job.cfg.method}, {job.cfg.rounds} rounds" + (", resumed" if resume else ""), flush=True)
        # Lines of simulations running side by side interleave: none is rewritten in place then.
        cfg = job.cfg.replace(out_dir=str(job.directory), resume=resume)
        with _Console(prefix=f"  {job.run_name} s{job.seed} | ", rewritable=args.jobs == 1) as console:
            if share is not None:
                return run_simulation_on_cluster(
                    cfg, job.directory, console.round, console.waiting, cpus=share.cpus, gpus=share.gpus,
                    cancelled=cancelled,
                )  # fmt: skip
            return run_simulation(
                cfg,
                job.directory,
                console.round,
                console.waiting,
                ray_cpus=None if cores is None else local_ray_cpus(args.jobs, cores, job.cfg.client_cpus),
                cancelled=cancelled,
            )

    failed: list[str] = []

    def finished(job: GridJob, outcome: bool | Exception) -> None:
        if isinstance(outcome, Exception):
            print(f"{job.label}: could not run: {outcome}", file=sys.stderr)
        if outcome is not True:
            failed.append(f"{job.run_name} seed {job.seed}")
            print(f"{job.label}: FAILED; see {job.directory / 'flower.log'}; the other runs go on", file=sys.stderr)
        render(out_dir)  # the table and plots always reflect every run finished so far

    try:
        run_grid(jobs, args.jobs, start, finished)
    except (KeyboardInterrupt, SystemExit) as stopped:
        code = 128 + signal.SIGINT if isinstance(stopped, KeyboardInterrupt) else int(stopped.code or 1)
        what = "interrupted" if isinstance(stopped, KeyboardInterrupt) else f"stopped by signal {code - 128}"
        print(
            f"fedsvd: {what}: every process of the comparison was stopped; continue with: "
            f"fedsvd compare {args.config} --out {out_dir} --resume",
            file=sys.stderr,
        )
        return code
    print((out_dir / SUMMARY_MD).read_text())
    print(f"summary.csv, summary.md and plots in {out_dir}")
    if failed:
        print(f"fedsvd compare: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def command_report(args: argparse.Namespace) -> int:
    from fedsvd.report import DEFAULT_DIFFERENCES, SUMMARY_MD, render

    out_dir = Path(args.dir).expanduser().resolve()
    differences = tuple(args.difference) if args.difference else DEFAULT_DIFFERENCES
    try:
        lines, plots = render(out_dir, args.reference, args.last_k, differences)
    except (FileNotFoundError, ConfigError) as err:
        return _fail(str(err))
    print((out_dir / SUMMARY_MD).read_text())
    print("plots: " + ", ".join(str(path) for path in plots))
    missing = [line["run"] for line in lines if not line["final_accuracy_mean"]]
    if missing:
        print(f"no finished seed yet for: {', '.join(missing)}")
    return 0


def _client_level_line(cfg: ExperimentConfig, plan: ClientLevelPlan) -> str:
    sampling = (
        f"Poisson sampling at q = {plan.sample_rate:g} (with amplification)"
        if cfg.client_sampling == "poisson"
        else f"{cfg.clients_per_round} clients per round (fixed; accounted without amplification)"
    )
    return (
        f"client-level DP: target eps {cfg.client_epsilon:g} at delta {cfg.client_delta:g} over {plan.rounds} "
        f"rounds, {sampling}, update clip {plan.clip_norm:g}, noise multiplier {plan.noise_multiplier:.3f} "
        f"(std {plan.noise_std:.3g} on the average over {plan.denominator:g})"
    )


def _projected_epsilons(cfg: ExperimentConfig, plan: ClientPlan, checkpoints: Sequence[int]) -> list[float]:
    """Cumulative epsilon after each checkpoint round, if the client trains as often as its noise was planned
    for (every round, or rounds x fraction of them under 'expected' planning)."""
    rate = 1.0 if cfg.planned_participation == "every_round" else cfg.fraction
    return [
        epsilon_of(
            [(plan.noise_multiplier, plan.sample_rate, math.ceil(r * rate) * cfg.local_steps)],
            cfg.delta,
            cfg.accountant,
        )
        for r in checkpoints
    ]


def print_plan(cfg: ExperimentConfig, title: str) -> None:
    try:
        plans = plan_federation(cfg)
    except DataError:
        if cfg.dataset not in HUB_TASKS:
            raise
        # Partition sizes depend only on the class counts and the seed: the plan is exact without the data.
        plans = plan_federation(cfg, from_label_counts=True)
        note = f"note: {cfg.dataset}'s data is not available here; client sizes come from its published label counts"
    else:
        # A plan needs no model: one that cannot be had here only leaves the truncation uncounted.
        try:
            note = _truncation_line(cfg, tokenizer_for(cfg.model))
        except ModelError as err:
            note = f"note: truncation by max_length not counted: {err}"
    _check_batch_size(cfg, plans)
    client_level = client_level_plan(cfg)
    checkpoints = sorted({max(1, math.ceil(cfg.rounds * tenth / 10)) for tenth in range(1, 11)})
    print(
        f"{title}: {cfg.dataset}, {cfg.num_clients} clients ({_partition_description(cfg)}), "
        f"{cfg.clients_per_round} per round, "
        f"{cfg.rounds} rounds x {cfg.local_steps} local steps, batch {cfg.batch_size}"
    )
    print(note)
    if not cfg.dp:
        guarantee = "only the client-level one below" if cfg.client_dp else "no privacy guarantee"
        print(f"dp = false: clients train without per-sample clipping and noise, {guarantee}")
    else:
        print(
            f"DP-SGD: target eps {cfg.epsilon:g} at delta {cfg.delta:g} ({cfg.accountant}), clip {cfg.clip_norm:g}, "
            f"noise planned for {plans[0].planned_steps} steps ({cfg.planned_participation})"
        )
    if client_level is not None:
        print(_client_level_line(cfg, client_level))
        projected = [
            epsilon_of([(client_level.noise_multiplier, client_level.sample_rate, r)], cfg.client_delta, cfg.accountant)
            for r in checkpoints
        ]
        after = ", ".join(f"{r}: {eps:.3f}" for r, eps in zip(checkpoints, projected, strict=True))
        print(f"client-level eps after round {after}")
    header = f"{'client':>6} {'examples':>9} {'rate q':>8} {'sigma':>7} {'steps':>6} | eps after round:"
    print(header + "".join(f" {r:>6}" for r in checkpoints))
    for plan in plans:
        epsilons = _projected_epsilons(cfg, plan, checkpoints) if cfg.dp else []
        print(
            f"{plan.partition_id:>6} {plan.num_examples:>9} {plan.sample_rate:>8.4f} {plan.noise_multiplier:>7.3f} "
            f"{plan.planned_steps:>6} |{'':>16}" + "".join(f" {eps:>6.3f}" for eps in epsilons)
        )


def command_plan(args: argparse.Namespace) -> int:
    try:
        if "runs" in read_toml(args.config):
            comparison = load_comparison(args.config)
            # Runs that share every privacy-relevant setting share one plan: print each distinct plan once.
            groups: dict[ExperimentConfig, list[str]] = {}
            for run in comparison.runs:
                cfg = comparison.config(run, comparison.seeds[0])
                groups.setdefault(cfg.replace(method="fedsvd", svd_every=1, svd_warmup=0), []).append(run.name)
            for cfg, names in groups.items():
                print_plan(cfg, f"{args.config} (runs {', '.join(names)})")
        else:
            print_plan(load_config(args.config, args.set or ()), args.config)
    except USER_ERRORS as err:
        return _fail(str(err))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsvd", description="Federated DP fine-tuning of LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one simulated federation")
    run.add_argument("config", nargs="?", help="TOML config (default: the built-in defaults)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    run.add_argument("--out", help="results directory (default: results/<method>-<time>)")
    run.add_argument("--resume", metavar="DIR", help="continue the unfinished run in DIR from its last round")
    run.set_defaults(handler=command_run)

    compare = commands.add_parser("compare", help="run every (run, seed) of a comparison file, then summarise")
    compare.add_argument("config", help="TOML comparison file (base, seeds, [settings], [[runs]])")
    compare.add_argument("--out", help="results directory (default: results/compare-<name>-<time>)")
    compare.add_argument("--seeds", type=int, help="number of seeds (overrides the file's 'seeds')")
    compare.add_argument("--resume", action="store_true", help="continue in --out, skipping finished runs")
    compare.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="run up to N simulations at once (default: 1)"
    )
    compare.set_defaults(handler=command_compare)

    report = commands.add_parser("report", help="re-render summary.csv/.md and the plots of a comparison")
    report.add_argument("dir", help="a directory written by fedsvd compare")
    report.add_argument(
        "--reference", metavar="RUN", help="compare every other run with RUN, seed by seed (overrides 'reference')"
    )
    report.add_argument(
        "--last-k", type=int, metavar="K", help="average the last K scored rounds (overrides 'last_k'; default 3)"
    )
    report.add_argument(
        "--difference",
        type=float,
        action="append",
        metavar="D",
        help="say how many seeds would detect an accuracy difference D (repeatable; default 0.01 and 0.02)",
    )
    report.set_defaults(handler=command_report)

    plan = commands.add_parser("plan", help="print every client's DP plan and projected epsilon, without training")
    plan.add_argument("config", help="a run config or a comparison file")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    plan.set_defaults(handler=command_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
