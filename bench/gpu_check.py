"""What a CUDA GPU changes for fedsvd, checked in one run of at most 8 minutes.

1. One local step with and without DP-SGD on CUDA: bench/dp_step.py's measurement (MiniLM + LoRA r=8 on
   query/value, expected batch 32, 64 tokens), with more steps per timed call since a GPU step is short.
2. FedSVD's server step at LLaMA-7B's shape (128 adapted 4096 x 4096 modules, r = 16, 3 clients) on CUDA
   tensors against plain averaging of B (FFA-LoRA), with a count of the devices and dtypes it computes in.
3. The default federation, its 6 clients sharing the one GPU (client_gpus = 0.25): it must finish every
   round, and nvidia-smi, sampled every second, must show two or more Ray client workers on the GPU at once.

Each part has its own time budget; a failing part says why and the others still run; the exit code is 1 if
any part failed. Without CUDA it prints one line and exits 0. The closing summary also goes to
$OUT/gpu-check.txt when OUT is set, with the federation's logs beside it.

Runs from the project's venv (``make gpu-check``) or, on a machine without one, as
``python3 bench/gpu_check.py`` with the project's dependencies and the repository root on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480
# Seconds each part may take at most (less when the earlier parts left less of the total).
DP_STEP_BUDGET_S = 120
SERVER_STEP_BUDGET_S = 60
FEDERATION_BUDGET_S = 300
# The federation is stopped this long before its part's budget ends, to shut Ray down and read its results.
FEDERATION_SHUTDOWN_S = 60
FEDERATION_ROUNDS = 3  # the first round also starts Ray and loads every worker: two more show the steady state
GPU_STEPS_PER_CALL = 20
REPEATS = 5


@dataclass(frozen=True)
class Outcome:
    """A part's verdict: ``summary`` lines go into the closing table, ``details`` only into the log."""

    ok: bool
    summary: list[str]
    details: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Setup:
    """What the parts run on: CUDA at full size, or the CPU at toy size to check this script itself."""

    device: str
    model: str | None  # None: the default model (the pretrained all-MiniLM-L6-v2)
    dataset: str
    modules: int
    dim: int
    steps_per_call: int
    rounds: int
    client_gpus: float
    local_steps: int | None = None  # None: the config's own

    def federation_overrides(self) -> list[str]:
        """``fedsvd run`` options over configs/default.toml, whose 6 clients, all sampled each round, stay."""
        values: dict[str, object] = {
            "device": self.device,
            "client_gpus": self.client_gpus,
            "client_cpus": 2,
            "rounds": self.rounds,
            "dataset": self.dataset,
        }
        if self.model is not None:
            values["model"] = self.model
        if self.local_steps is not None:
            values["local_steps"] = self.local_steps
        return [f"--set={key}={value}" for key, value in values.items()]


def gpu_setup(model: str | None) -> Setup:
    # Flower runs the apps in other working directories: a model folder must be named absolutely.
    if model is not None and Path(model).is_dir():
        model = str(Path(model).resolve())
    return Setup(
        device="cuda",
        model=model,
        dataset="rotten_tomatoes",
        modules=128,
        dim=4096,
        steps_per_call=GPU_STEPS_PER_CALL,
        rounds=FEDERATION_ROUNDS,
        # Four client workers share the GPU (the CPUs, 2 per client, would allow eight on 16 cores).
        client_gpus=0.25,
    )


def cpu_quick_setup(scratch: Path) -> Setup:
    # The test suite's own stand-ins for the model and the corpus, so the self-check needs neither.
    from tests.conftest import write_sentiment_csv, write_tiny_bert

    model = str(write_tiny_bert(scratch / "tiny-bert"))
    return Setup(
        device="cpu",
        model=model,
        dataset=str(write_sentiment_csv(scratch / "sentiment.csv", count=1200)),
        modules=8,
        dim=512,
        steps_per_call=2,
        rounds=1,
        client_gpus=0.0,
        local_steps=2,
    )


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Interrupt the body with PartTimeout after ``seconds`` (main thread only: it uses SIGALRM)."""

    def expire(signum: int, frame: object) -> None:
        raise PartTimeout(f"over its {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def dp_step(setup: Setup) -> Outcome:
    import torch

    # bench/ is on sys.path as this script's folder, whether run by make or by hand.
    from dp_step import BATCH, dp_step_seconds

    model = {} if setup.model is None else {"model_name": setup.model}
    plain, private = dp_step_seconds(
        dataset=setup.dataset, device=torch.device(setup.device), steps=setup.steps_per_call, **model
    )
    return Outcome(
        True,
        [f"non-DP {plain * 1e3:.1f} ms, DP-SGD {private * 1e3:.1f} ms per step, DP / non-DP = {private / plain:.2f}x"],
        [f"expected batch {BATCH}, {setup.steps_per_call} steps per timed call, median of {REPEATS} calls"],
    )


def _placement_census(run: Callable[[], object]) -> Counter[str]:
    """How many op outputs of each device and dtype one call of ``run`` produces: shows where the work runs."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Census(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self.seen[f"{leaf.device.type} {str(leaf.dtype).removeprefix('torch.')}"] += 1
            return out

    with Census() as census:
        run()
    return census.seen


def server_step(setup: Setup, rank: int = 16, clients: int = 3) -> Outcome:
    import torch
    from dp_step import median_seconds

    from fedsvd.methods import ClientUpdate, build_method

    device = torch.device(setup.device)
    generator = torch.Generator().manual_seed(0)

    def factor(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator).to(device)

    global_arrays: dict[str, torch.Tensor] = {}
    for index in range(setup.modules):
        global_arrays[f"layers.{index}.lora_A.weight"] = factor(rank, setup.dim) / setup.dim**0.5
        global_arrays[f"layers.{index}.lora_B.weight"] = torch.zeros(setup.dim, rank, device=device)
    fedsvd, ffa = build_method("fedsvd", svd_every=1, svd_warmup=0), build_method("ffa")
    uplink = sorted(fedsvd.uplink_keys(global_arrays, 1))
    if uplink != sorted(ffa.uplink_keys(global_arrays, 1)):
        raise RuntimeError("fedsvd and ffa no longer upload the same arrays: the comparison is off")
    updates = [
        ClientUpdate({key: factor(setup.dim, rank) for key in uplink}, num_examples=100 * (client + 1))
        for client in range(clients)
    ]

    def refactorized() -> None:
        fedsvd.aggregate(global_arrays, updates, 1)

    def averaged() -> None:
        ffa.aggregate(global_arrays, updates, 1)

    def prepared() -> None:  # as the ServerApp does once the instructions are out, while clients train
        fedsvd.prepare(global_arrays, 1)

    refactorized(), averaged()  # warm-up: CUDA kernels and solver handles load on first use
    svd_s = median_seconds(refactorized, REPEATS, device)
    mean_s = median_seconds(averaged, REPEATS, device)
    after_s = median_seconds(refactorized, REPEATS, device, before=prepared)
    census = ", ".join(f"{placement} {count}" for placement, count in _placement_census(refactorized).most_common())
    return Outcome(
        True,
        [
            f"fedsvd {svd_s * 1e3:.1f} ms, ffa {mean_s * 1e3:.2f} ms, fedsvd / ffa = {svd_s / mean_s:.1f}x",
            f"fedsvd with A prepared while clients train {after_s * 1e3:.1f} ms, / ffa = {after_s / mean_s:.1f}x",
            f"fedsvd's op outputs by device and dtype: {census}",
        ],
        [f"{setup.modules} modules of {setup.dim}x{setup.dim}, r={rank}, {clients} clients, median of {REPEATS}"],
    )


@dataclass
class GpuSharing:
    """Which processes held the GPU while the federation ran, from nvidia-smi every second."""

    commands: dict[int, str] = field(default_factory=dict)
    most_at_once: int = 0
    most_workers_at_once: int = 0
    peak_mib: int = 0
    error: str = ""

    def sample(self) -> None:
        import psutil

        try:
            listing = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError) as err:
            self.error = f"nvidia-smi failed: {err}"
            return
        rows = [[cell.strip() for cell in line.split(",")] for line in listing.splitlines()]
        # Memory can read "[N/A]" on virtualised GPUs: such a process still counts, with 0 MiB.
        used = {
            int(row[0]): int(row[1]) if row[1].isdigit() else 0 for row in rows if len(row) == 2 and row[0].isdigit()
        }
        for pid in used.keys() - self.commands.keys():
            try:
                self.commands[pid] = " ".join(psutil.Process(pid).cmdline())[:80] or "?"
            except psutil.Error:
                self.commands[pid] = "?"
        # Ray titles its worker processes "ray::<actor class>..."; Flower's clients run in ClientAppActor.
        workers = [pid for pid in used if self.commands[pid].startswith("ray::")]
        self.most_at_once = max(self.most_at_once, len(used))
        self.most_workers_at_once = max(self.most_workers_at_once, len(workers))
        self.peak_mib = max(self.peak_mib, sum(used.values()))


def _tail(path: Path, lines: int = 15) -> list[str]:
    if not path.is_file():
        return [f"({path.name} was not written)"]
    return [line[:300] for line in path.read_text(errors="replace").splitlines()[-lines:]]


def federation(setup: Setup, budget: int, keep: Path | None) -> Outcome:
    from fedsvd.results import read_metrics

    run_dir = Path(tempfile.mkdtemp(prefix="gpu-check-federation-"))
    out_dir, log_path = run_dir / "run", run_dir / "fedsvd-run.log"
    command = [sys.executable, "-m", "fedsvd.cli", "run", "configs/default.toml", *setup.federation_overrides()]
    sharing = GpuSharing() if setup.device == "cuda" else None
    started = time.monotonic()
    timed_out = False
    with log_path.open("w") as log:
        process = subprocess.Popen([*command, "--out", str(out_dir)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                if time.monotonic() - started > budget - FEDERATION_SHUTDOWN_S:
                    timed_out = True
                    break
                if sharing is not None:
                    sharing.sample()
                time.sleep(1.0)
        finally:
            if process.poll() is None:
                # SIGTERM lets fedsvd stop the SuperLink, SuperExec and Ray it started; kill only if that hangs.
                process.terminate()
                try:
                    process.wait(timeout=FEDERATION_SHUTDOWN_S // 2)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    seconds = time.monotonic() - started
    if keep is not None:
        for source, name in (
            (log_path, "federation-run.log"),
            (out_dir / "flower.log", "federation-flower.log"),
            (out_dir / "metrics.jsonl", "federation-metrics.jsonl"),
        ):
            if source.is_file():
                shutil.copyfile(source, keep / name)
    # Round 0, where the server records it, is the evaluation of the initial model: no training, no sharing.
    rows = [row for row in read_metrics(out_dir) if row["round"] >= 1]
    problems = []
    if timed_out:
        problems.append(f"stopped after {budget - FEDERATION_SHUTDOWN_S} s")
    if process.returncode != 0:
        problems.append(f"exit code {process.returncode}")
    if [row["round"] for row in rows] != list(range(1, setup.rounds + 1)):
        problems.append(f"rounds recorded {[row['round'] for row in rows]}, expected 1..{setup.rounds}")
    summary = [
        f"exit {process.returncode}, {len(rows)}/{setup.rounds} rounds in {seconds:.0f} s, seconds per round: "
        + (", ".join(f"{row['seconds']:.1f}" for row in rows) or "-")
        + (f", final accuracy {rows[-1]['accuracy']:.4f}" if rows else "")
    ]
    details = [" ".join(command[1:])]
    if sharing is None:
        summary.append("GPU sharing not checked (CPU run)")
    else:
        if sharing.most_workers_at_once < 2:
            problems.append(f"{sharing.most_workers_at_once} Ray client worker(s) on the GPU at once, expected >= 2")
        summary.append(
            f"GPU processes: {len(sharing.commands)} in all, at most {sharing.most_at_once} at once, of which Ray "
            f"client workers {sharing.most_workers_at_once}; peak {sharing.peak_mib} MiB"
            + (f"; {sharing.error}" if sharing.error else "")
        )
        details += [f"GPU process {pid}: {cmd}" for pid, cmd in sorted(sharing.commands.items())]
    if problems:
        summary.append("FAILED: " + "; ".join(problems))
        details += [
            "fedsvd run, last lines:",
            *_tail(log_path),
            "flower.log, last lines:",
            *_tail(out_dir / "flower.log"),
        ]
    shutil.rmtree(run_dir, ignore_errors=True)
    return Outcome(not problems, summary, details)


@dataclass(frozen=True)
class PartResult:
    name: str
    outcome: Outcome
    seconds: float


def run_part(name: str, budget: int, deadline: float, part: Callable[[int], Outcome]) -> PartResult:
    """Run one part within its budget (cut to what is left of the total); any error fails this part only."""
    started = time.monotonic()
    allowed = int(min(budget, deadline - started))
    print(f"== {name} (budget {allowed} s)", flush=True)
    if allowed < 10:
        outcome = Outcome(False, ["FAILED: no time left in the total budget"])
    else:
        try:
            with time_limit(allowed):
                outcome = part(allowed)
        except Exception as err:  # a part's failure must not stop the others
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            outcome = Outcome(False, [f"FAILED: {type(err).__name__}: {message}"])
    for line in [*outcome.summary, *outcome.details]:
        print(f"   {line}", flush=True)
    return PartResult(name, outcome, time.monotonic() - started)


def summary_table(device: str, model: str | None, results: list[PartResult], seconds: float) -> str:
    width = max(len(result.name) for result in results)
    rows = [f"gpu-check on {device}; {seconds:.0f} s in all"]
    if model is None:
        rows.append("model: the pretrained default")
    else:
        rows.append(f"model: {model} (a stand-in for the default: timings and GPU sharing hold, accuracy does not)")
    for result in results:
        verdict = f"{'ok' if result.outcome.ok else 'FAILED':<6} | {result.seconds:4.0f} s"
        for index, line in enumerate(result.outcome.summary):
            prefix = f"{result.name:<{width}} | {verdict}" if index == 0 else " " * (width + 3 + len(verdict))
            rows.append(f"{prefix} | {line}")
    failed = [result.name for result in results if not result.outcome.ok]
    rows.append(f"result: {'FAILED: ' + ', '.join(failed) if failed else 'every part passed'}")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        help="model for parts 1 and 3 instead of the pretrained default (a name or HF folder): a stand-in of the "
        "same shape, e.g. randomly initialised where the default cannot be installed, keeps timings and GPU "
        "sharing meaningful, not accuracy",
    )
    # Checks this script on a machine without a GPU: every part on the CPU at toy size, no nvidia-smi.
    parser.add_argument("--quick-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("gpu-check: no GPU check here: torch is not installed")
        return 0
    if not args.quick_cpu and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU on this machine (torch {torch.__version__}): nothing to check")
        return 0

    keep = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    started = time.monotonic()
    deadline = started + TOTAL_BUDGET_S
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        setup = cpu_quick_setup(Path(scratch)) if args.quick_cpu else gpu_setup(args.model)
        if setup.device == "cuda":
            device = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
        else:
            device = "the CPU at toy sizes (a self-check of this script)"
        print(f"gpu-check on {device}; model {setup.model or 'the default'}", flush=True)
        results = [
            run_part("1 DP step", DP_STEP_BUDGET_S, deadline, lambda _: dp_step(setup)),
            run_part("2 FedSVD server step", SERVER_STEP_BUDGET_S, deadline, lambda _: server_step(setup)),
            run_part("3 federation", FEDERATION_BUDGET_S, deadline, lambda budget: federation(setup, budget, keep)),
        ]
    report = summary_table(device, setup.model, results, time.monotonic() - started)
    print("\n" + report, end="")
    if keep is not None:
        details = [f"{r.name}:\n" + "\n".join(f"  {line}" for line in r.outcome.details) for r in results]
        (keep / "gpu-check.txt").write_text(report + "\n" + "\n".join(details) + "\n")
    return 0 if all(result.outcome.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
