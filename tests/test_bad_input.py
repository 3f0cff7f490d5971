"""Bad input never hangs, never shows a traceback and never fails late.

Every kind of bad input a new user can give (config values and files, ``--set`` overrides, output directories,
data files) stops the command before anything starts: exit code 2, one line on stderr naming the key or file,
no process started and nothing written. The CLI runs in-process (a subprocess would cost seconds per case);
``test_config.py`` checks the installed command's exit code and stderr once.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from fedsvd.cli import main
from fedsvd.privacy.accountants import PrivacyConfigError
from fedsvd.privacy.calibration import MIN_NOISE_MULTIPLIER, calibrate_noise_multiplier

# Every case returns within about a second. One that hangs (as epsilon = inf did, in the noise calibration) or
# goes on into a real run fails here instead of blocking the suite.
HANG_LIMIT_S = 60
NOT_UTF8 = "caf\xe9".encode("latin-1")  # 'café' in Latin-1: 0xe9 followed by an ASCII byte is not UTF-8


@dataclass(frozen=True)
class Setup:
    """One case's directory (its output goes to ``root / "out"``), and the tiny model and data every run uses."""

    root: Path
    model: Path
    data: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def settings(self) -> list[str]:
        # client_cpus = 1: the default (2) is more than a one-core machine has, which is itself refused.
        settings = {"model": self.model, "dataset": self.data, "num_clients": 3, "delta": 1e-3, "client_cpus": 1}
        return [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]

    def run(self, *argv: str, out: Path | str | None = None) -> list[str]:
        """``fedsvd run`` of the tiny federation; ``argv`` (a config file, more overrides) comes after its settings."""
        return ["run", *self.settings(), *argv, "--out", str(out or self.out)]

    def plan(self, *argv: str, config: str | None = None) -> list[str]:
        return ["plan", config or self.file("plan.toml", ""), *self.settings(), *argv]

    def compare(self, out: str | None = None, *argv: str, settings: str = "") -> list[str]:
        runs = (
            f'[settings]\nmodel = "{self.model}"\ndataset = "{self.data}"\nnum_clients = 3\n'
            f"delta = 1e-3\nclient_cpus = 1\n{settings}"
            '[[runs]]\nname = "a"\nmethod = "ffa"\n'
        )
        return ["compare", self.file("compare.toml", runs), "--out", out or str(self.out), *argv]

    def run_dir(self, *names: str) -> str:
        """An output directory holding the named result files, as another run left it."""
        self.out.mkdir()
        for name in names:
            (self.out / name).write_text("{}\n")
        return str(self.out)


def _sets(*overrides: str) -> Callable[[Setup], list[str]]:
    return lambda setup: setup.run(*(item for override in overrides for item in ("--set", override)))


def _config(name: str, content: str | bytes) -> Callable[[Setup], list[str]]:
    return lambda setup: setup.run(setup.file(name, content))


def _data(name: str, content: str | bytes) -> Callable[[Setup], list[str]]:
    return lambda setup: setup.run("--set", f"dataset={setup.file(name, content)}")


def _out(where: Callable[[Setup], Path | str]) -> Callable[[Setup], list[str]]:
    return lambda setup: setup.run(out=where(setup))


def _under_a_file(setup: Setup) -> str:
    return setup.file("taken", "") + "/x"


def _unwritable(setup: Setup) -> Path:
    """A directory nobody may create entries in: a read-only one, or for root (who may write anywhere) sysfs."""
    if os.geteuid() == 0:
        return Path("/sys/fedsvd-out")
    locked = setup.root / "locked"
    locked.mkdir(mode=0o555)
    return locked / "out"


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the setting is valid here")

# (argv for a case directory, what the one line must contain: the key, the file or the directory)
CASES = [
    # Non-finite numbers: one check for every float key (epsilon = inf used to hang in the noise calibration).
    pytest.param(_sets("epsilon=inf"), "epsilon = inf", id="epsilon-inf"),
    pytest.param(_sets("epsilon=-inf"), "epsilon = -inf", id="epsilon-minus-inf"),
    pytest.param(_sets("epsilon=nan"), "epsilon = nan", id="epsilon-nan"),
    pytest.param(_sets("lr=inf"), "lr = inf", id="lr-inf"),
    pytest.param(_sets("lr=nan"), "lr = nan", id="lr-nan"),
    pytest.param(_sets("lora_alpha=inf"), "lora_alpha = inf", id="lora-alpha-inf"),
    pytest.param(_sets("clip_norm=nan"), "clip_norm = nan", id="clip-norm-nan"),
    pytest.param(_sets("delta=nan"), "delta = nan", id="delta-nan"),
    pytest.param(_sets("dirichlet_alpha=inf"), "dirichlet_alpha = inf", id="dirichlet-alpha-inf"),
    pytest.param(_sets("fraction=nan"), "fraction = nan", id="fraction-nan"),
    pytest.param(_sets("client_gpus=nan"), "client_gpus = nan", id="client-gpus-nan"),
    pytest.param(lambda setup: setup.plan("--set", "epsilon=inf"), "epsilon = inf", id="plan-epsilon-inf"),
    pytest.param(_config("inf.toml", "epsilon = inf\n"), "epsilon = inf", id="config-epsilon-inf"),
    # Values whose range only the code that uses them knows.
    pytest.param(_sets("seed=-1"), "seed = -1", id="seed-negative"),
    pytest.param(_sets("seed=4294967296"), "seed = 4294967296", id="seed-above-32-bit"),
    pytest.param(_sets("epsilon=1e9"), "epsilon = 1e+09", id="epsilon-without-noise"),
    pytest.param(_sets("batch_size=100000"), "batch_size = 100000", id="batch-above-every-partition"),
    pytest.param(lambda setup: setup.plan("--set", "batch_size=100000"), "batch_size = 100000", id="plan-batch"),
    pytest.param(_sets("delta=0.5"), "delta = 0.5", id="delta-not-below-1-over-n"),
    # Client-level DP.
    pytest.param(_sets("client_dp=true", "method=flora"), "method = 'flora'", id="client-dp-flora"),
    pytest.param(_sets("client_dp=true", "method=fedex"), "method = 'fedex'", id="client-dp-fedex"),
    pytest.param(_sets("client_dp=true", "client_delta=0.5"), "client_delta = 0.5", id="client-delta-above-1-over-n"),
    pytest.param(_sets("client_dp=true", "client_epsilon=1e9"), "client_epsilon = 1e+09", id="client-eps-no-noise"),
    pytest.param(_sets("client_clip_norm=0"), "client_clip_norm = 0", id="client-clip-zero"),
    pytest.param(_sets("client_epsilon=nan"), "client_epsilon = nan", id="client-epsilon-nan"),
    pytest.param(_sets("client_sampling=random"), "client_sampling = 'random'", id="client-sampling-unknown"),
    pytest.param(
        lambda setup: setup.plan("--set", "client_dp=true", "--set", "client_epsilon=1e9"),
        "client_epsilon = 1e+09",
        id="plan-client-eps-no-noise",
    ),
    pytest.param(_sets("max_length=65"), "max_length = 65", id="max-length-beyond-positions"),
    pytest.param(_sets("lora_rank=100000"), "lora_rank = 100000", id="rank-beyond-module-size"),
    # What the run asks of the machine or the Ray cluster.
    pytest.param(_sets("device=cuda"), "device = 'cuda'", id="cuda-without-gpu", marks=NO_GPU),
    pytest.param(_sets("client_gpus=0.5"), "client_gpus = 0.5", id="client-gpus-without-gpu", marks=NO_GPU),
    pytest.param(_sets("client_cpus=100000"), "client_cpus = 100000", id="client-cpus-above-cores"),
    pytest.param(_sets("ray_address=127.0.0.1:1"), "ray_address = '127.0.0.1:1'", id="ray-nobody-listens"),
    pytest.param(_sets("ray_address=my-cluster"), "ray_address = 'my-cluster'", id="ray-no-port"),
    pytest.param(_sets("ray_address=10.0.0.1:99999"), "ray_address = '10.0.0.1:99999'", id="ray-bad-port"),
    # The model, checked on the meta device without its weights.
    pytest.param(_sets("lora_targets=qkv"), "'qkv' matches no module", id="target-unknown"),
    pytest.param(_sets("lora_targets=query,qkv"), "'qkv' matches no module", id="one-target-unknown"),
    pytest.param(_sets("lora_targets=encoder"), "lora_targets = 'encoder'", id="target-not-adaptable"),
    pytest.param(_sets("lora_targets= , "), "lora_targets", id="targets-empty"),
    pytest.param(_sets("model=/nonexistent/model-dir"), "'/nonexistent/model-dir': no such directory", id="model-dir"),
    pytest.param(_sets("model=fedsvd-tests/no-such-model"), "model = 'fedsvd-tests/no-such-model'", id="model-hub"),
    pytest.param(lambda setup: setup.run("--set", f"model={setup.data}"), "is a file", id="model-is-a-file"),
    # Plain config values.
    pytest.param(_sets("method=fedprox"), "method = 'fedprox'", id="unknown-method"),
    pytest.param(_sets("method=fedsa"), "local_eval_fraction = 0.0", id="fedsa-without-local-eval"),
    pytest.param(_sets("rounds=0"), "rounds = 0", id="rounds-zero"),
    pytest.param(_sets("min_replies=7"), "min_replies = 7", id="min-replies-above-the-cohort"),
    pytest.param(_sets("lora_rank=0"), "lora_rank = 0", id="rank-zero"),
    pytest.param(_sets("epsilon=-1"), "epsilon = -1.0", id="epsilon-negative"),
    pytest.param(_sets("fraction=1.5"), "fraction = 1.5", id="fraction-above-1"),
    pytest.param(_sets("fraction=0"), "fraction = 0.0", id="fraction-zero"),
    pytest.param(_sets("rounds=two"), "rounds = 'two'", id="rounds-not-a-number"),
    pytest.param(_sets("rounds=true"), "rounds = True", id="rounds-a-bool"),
    pytest.param(_sets("learning_rate=0.1"), "'learning_rate'", id="unknown-key"),
    pytest.param(_sets("accountant=gdp"), "accountant = 'gdp'", id="refused-accountant"),
    pytest.param(_sets("partition=zipf"), "partition = 'zipf'", id="unknown-partition"),
    pytest.param(_sets("dataset=imdb"), "'imdb'", id="unknown-dataset"),
    pytest.param(lambda setup: setup.run("--set", "epsilon"), "--set 'epsilon'", id="override-without-value"),
    # Config files.
    pytest.param(_config("latin1.toml", b"# " + NOT_UTF8 + b"\n"), "latin1.toml", id="config-not-utf8"),
    pytest.param(lambda setup: setup.plan(config=setup.file("l.toml", NOT_UTF8)), "l.toml", id="plan-config-not-utf8"),
    pytest.param(_config("bad.toml", "rounds = = 3\n"), "bad.toml", id="config-not-toml"),
    pytest.param(_config("table.toml", "[dp]\nepsilon = 3\n"), "[dp]", id="config-table"),
    pytest.param(_config("key.toml", "epochs = 3\n"), "'epochs'", id="config-unknown-key"),
    pytest.param(lambda setup: setup.run(str(setup.root / "none.toml")), "none.toml", id="config-missing"),
    pytest.param(lambda setup: setup.run(str(setup.root)), "cannot read config file", id="config-is-a-directory"),
    # Output directories: refused before anything starts, and never touched.
    pytest.param(_out(_under_a_file), "taken", id="out-under-a-file"),
    pytest.param(_out(lambda setup: setup.file("taken", "")), "is a file", id="out-is-a-file"),
    pytest.param(_out(_unwritable), "cannot be written", id="out-not-writable"),
    pytest.param(_out(lambda setup: setup.run_dir("summary.json")), "summary.json", id="out-finished-run"),
    pytest.param(_out(lambda setup: setup.run_dir("metrics.jsonl")), "metrics.jsonl", id="out-has-results"),
    pytest.param(lambda setup: ["run", "--resume", setup.run_dir(), "--out", "x"], "--resume", id="resume-and-out"),
    pytest.param(lambda setup: ["run", "--resume", setup.run_dir()], "checkpoint.safetensors", id="resume-nothing"),
    pytest.param(lambda setup: ["run", "--resume", setup.run_dir("summary.json")], "has finished", id="resume-done"),
    pytest.param(lambda setup: setup.compare(_under_a_file(setup)), "taken", id="compare-out-under-a-file"),
    pytest.param(lambda setup: setup.compare(None, "--jobs", "0"), "--jobs 0", id="compare-no-jobs"),
    pytest.param(
        # Run "b" on a private Ray, run "a" on the cluster the settings name: no one Ray to run both side by side.
        lambda setup: setup.compare(
            None,
            "--jobs",
            "2",
            settings='ray_address = "127.0.0.1:6379"\n[[runs]]\nname = "b"\nray_address = "local"\n',
        ),
        "the runs name different Rays (ray_address = '127.0.0.1:6379', 'local')",
        id="compare-jobs-on-two-rays",
    ),
    # Data files.
    pytest.param(lambda setup: setup.run("--set", f"dataset={setup.root / 'none.csv'}"), "none.csv", id="data-missing"),
    pytest.param(_data("latin1.csv", b"text,label\n" + NOT_UTF8 + b",1\n"), "latin1.csv", id="data-not-utf8"),
    pytest.param(_data("empty.csv", ""), "empty.csv", id="data-empty"),
    pytest.param(_data("unlabelled.csv", "text\nfine\n"), "unlabelled.csv", id="data-without-labels"),
    pytest.param(_data("broken.jsonl", "{oops\n"), "broken.jsonl", id="data-bad-json"),
]


def _snapshot(directory: Path) -> dict[str, tuple[int, int] | None]:
    """Every entry below ``directory``: files with their size and modification time, directories by name."""
    return {
        str(path.relative_to(directory)): None if path.is_dir() else (path.stat().st_size, path.stat().st_mtime_ns)
        for path in directory.rglob("*")
    }


@contextlib.contextmanager
def _no_hang(seconds: int) -> Iterator[None]:
    def hung(signum: int, frame: object) -> None:
        raise TimeoutError(f"the command did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("argv", "names"), CASES)
def test_bad_input_exits_2_with_one_line_and_starts_and_writes_nothing(
    argv: Callable[[Setup], list[str]],
    names: str,
    tmp_path: Path,
    tiny_bert: Path,
    sentiment_csv: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a cluster named here would change what client_cpus means
    command = argv(Setup(tmp_path, tiny_bert, sentiment_csv))
    before, children = _snapshot(tmp_path), psutil.Process().children(recursive=True)
    # Warnings pytest records would otherwise print to stderr, each a line beside the one error line.
    with _no_hang(HANG_LIMIT_S), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        code = main(command)
    err = capfd.readouterr().err  # file-descriptor level: library loggers hold the original stderr
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fedsvd: error: "), err
    assert names in err and "Traceback" not in err, err
    assert not [w for w in shown if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)]
    assert psutil.Process().children(recursive=True) == children, "a process was started"
    assert _snapshot(tmp_path) == before, "something was written"


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(
    ("epsilon", "reason"),
    [(math.inf, "must be a finite number"), (math.nan, "must be a finite number"),
     (1e9, f"needs a noise multiplier below {MIN_NOISE_MULTIPLIER:g}"), (1e-9, "too small to reach")],
)  # fmt: skip
def test_the_noise_calibration_ends_with_a_reason_for_any_target(epsilon: float, reason: str, accountant: str) -> None:
    """Whatever reaches it, the calibration's searches are bounded: no target sends sigma towards 0 or infinity."""
    with _no_hang(HANG_LIMIT_S), pytest.raises(PrivacyConfigError, match=f"^epsilon = .*{reason}"):
        calibrate_noise_multiplier(epsilon, 1e-5, 0.03, 50, accountant)
