"""One typed, validated experiment config.

Every key, its type, its default and the values it allows live in ``ExperimentConfig``. The same flat
key set is Flower's run config (``[tool.flwr.app.config]`` in pyproject.toml mirrors the defaults, and a
test keeps the two equal), so ``fedsvd run`` and ``flwr run`` accept the same TOML files.

Bad input raises ``ConfigError`` with a one-line message that names the key and what is allowed; the CLI
turns it into exit code 2 before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsvd.methods import METHODS
from fedsvd.privacy.accountants import ACCOUNTANTS, REFUSED_ACCOUNTANTS, accountant_refusal

ConfigValue = bool | int | float | str

DEVICES = ("auto", "cpu", "cuda")
PARTITION_SCHEMES = ("dirichlet", "iid")
POOLINGS = ("mean", "model")
PARTICIPATION_PLANS = ("every_round", "expected")
CLIENT_SAMPLING = ("fixed", "poisson")
DEFAULT_MODEL = "minilm"
# Rounds in a row that may fall short of min_replies before the run stops.
MAX_SHORT_ROUNDS = 3
# Keys a resumed run may change: none of them changes what the finished rounds computed. Raising `rounds` trains
# longer with the noise planned at the start (so clients stop at their budget); the rest say where it runs.
RESUMABLE_KEYS = ("rounds", "client_cpus", "client_gpus", "ray_address", "out_dir", "client_state_dir", "resume")
# Seeds feed numpy's SeedSequence (non-negative only) and torch.manual_seed, and derived seeds are drawn as
# uint32: one 32-bit range that every consumer accepts.
MAX_SEED = 2**32 - 1
# Ray addresses that name no host: '' (then $RAY_ADDRESS, else 'local'), a private local Ray, or the cluster
# that `ray start` last started on this machine (Ray resolves 'auto' itself).
RAY_SPECIAL_ADDRESSES = ("", "local", "auto")
# A cluster's address: host:port, optionally as a Ray Client URL (ray://host:port); IPv6 hosts in brackets.
_RAY_HOST_PORT = re.compile(r"(?:ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>[0-9]{1,5})")


class ConfigError(ValueError):
    """A config value that cannot run; the message is one line naming the key."""


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


def _one_of(*allowed: str):
    def check(value: str) -> bool:
        return value in allowed

    check.allowed = allowed  # type: ignore[attr-defined]
    return check


def _accountant(value: str) -> bool:
    """An accountant this project computes with; a refused one gets its own reason, not the list of choices."""
    if value in REFUSED_ACCOUNTANTS:
        raise ConfigError(str(accountant_refusal(value)))
    return value in ACCOUNTANTS


_accountant.allowed = ACCOUNTANTS  # type: ignore[attr-defined]


def _seed(value: int) -> bool:
    return 0 <= value <= MAX_SEED


def ray_host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) a Ray cluster address names; None for one that names none (see RAY_SPECIAL_ADDRESSES) or
    that is malformed."""
    match = _RAY_HOST_PORT.fullmatch(address)
    if match is None or not 0 < int(match["port"]) < 2**16:
        return None
    return match["host"].strip("[]"), int(match["port"])


def _ray_address(value: str) -> bool:
    return value in RAY_SPECIAL_ADDRESSES or ray_host_port(value) is not None


def _key(default: ConfigValue, help: str, check=None, allowed: str = "") -> Any:
    """A config key: its default, what it means, and (optionally) a predicate with its human wording."""
    return field(default=default, metadata={"help": help, "check": check, "allowed": allowed})


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one federated run needs; see ``configs/default.toml`` for the documented defaults."""

    # What is aggregated and how.
    method: str = _key("fedsvd", "aggregation method", _one_of(*METHODS))
    svd_every: int = _key(1, "FedSVD: re-factorise every N rounds (0 = never, i.e. FFA-LoRA)", _non_negative, ">= 0")
    svd_warmup: int = _key(0, "FedSVD: rounds before the first re-factorisation", _non_negative, ">= 0")
    # Model and adapter.
    model: str = _key(DEFAULT_MODEL, "'minilm' (offline all-MiniLM-L6-v2), a local HF model dir or a hub name")
    lora_rank: int = _key(8, "LoRA rank r", _positive, "> 0")
    lora_alpha: float = _key(8.0, "LoRA alpha (scaling alpha / r)", _positive, "> 0")
    lora_targets: str = _key("query,value", "comma-separated names of the modules that get LoRA")
    pooling: str = _key(
        "mean", "'mean' (linear head on mean-pooled states) or 'model' (the model's own head)", _one_of(*POOLINGS)
    )
    train_head: bool = _key(True, "train (and aggregate) the classification head alongside the adapter")
    # Data and federation.
    dataset: str = _key(
        "rotten_tomatoes",
        "'rotten_tomatoes', a hub task's train split ('sst2', 'qnli', 'qqp', 'mnli', 'mnli_mismatched', 'snli'; "
        "offline from $FEDSVD_HF_DATA_DIR) or a .csv / .jsonl file with text and label",
    )
    max_length: int = _key(64, "tokens per example (truncate / pad)", _positive, "> 0")
    eval_fraction: float = _key(
        0.1,
        "share of the data held out for the server's evaluation (hub tasks use their validation split)",
        None,
        "in (0, 1)",
    )
    eval_every: int = _key(
        1, "score the held-out set every N rounds (round 0 and the last round always)", _positive, ">= 1"
    )
    eval_sample: int = _key(
        0,
        "score the rounds before the last on a fixed random sample of this many held-out examples (0 = all of "
        "them); the last round is always scored on all",
        _non_negative,
        ">= 0",
    )
    local_eval_fraction: float = _key(
        0.0,
        "share of each client's partition held out for per-client evaluation every round (0 = none; "
        "FedSA-LoRA needs it for its personalised accuracy)",
        None,
        "in [0, 1)",
    )
    num_clients: int = _key(6, "number of clients (data owners)", _positive, "> 0")
    partition: str = _key("dirichlet", "how data is split over clients", _one_of(*PARTITION_SCHEMES))
    dirichlet_alpha: float = _key(0.5, "Dirichlet concentration of the label skew", _positive, "> 0")
    min_partition_size: int = _key(
        0,
        "dirichlet: every client gets at least this many examples, taken at random from the largest partitions "
        "after the draw (0 = redraw for a few dozen each and fail if no draw gives every client one)",
        _non_negative,
        ">= 0",
    )
    fraction: float = _key(1.0, "share of clients sampled each round", None, "in (0, 1]")
    rounds: int = _key(10, "federated rounds", _positive, ">= 1")
    # Local training.
    local_steps: int = _key(5, "DP-SGD steps per client per round", _positive, "> 0")
    batch_size: int = _key(32, "expected (Poisson) batch size", _positive, "> 0")
    lr: float = _key(0.5, "SGD learning rate", _positive, "> 0")
    # Differential privacy.
    dp: bool = _key(True, "train with DP-SGD (false: the same path without clipping and noise)")
    epsilon: float = _key(8.0, "target epsilon per client over the whole run", _positive, "> 0")
    delta: float = _key(1e-5, "target delta per client (must be below 1 / n_k)", None, "in (0, 1)")
    planned_participation: str = _key(
        "every_round",
        "calibrate noise for every round ('every_round') or for rounds x fraction ('expected'; the budget is "
        "then enforced: a client that would exceed epsilon is no longer selected)",
        _one_of(*PARTICIPATION_PLANS),
    )
    clip_norm: float = _key(2.0, "per-sample gradient clipping norm C", _positive, "> 0")
    accountant: str = _key("rdp", "privacy accountant (record-level and client-level)", _accountant)
    # Client-level differential privacy: a guarantee about each whole client (README: Privacy).
    client_dp: bool = _key(
        False,
        "client-level DP: clip each client's update and noise their average before the method's server step",
    )
    client_clip_norm: float = _key(
        0.1, "client-level DP: norm C a client's update (all its uploaded arrays as one vector) is clipped to",
        _positive, "> 0",
    )  # fmt: skip
    client_epsilon: float = _key(
        8.0, "client-level DP: target epsilon of the federation over the whole run", _positive, "> 0"
    )
    client_delta: float = _key(1e-3, "client-level DP: target delta (must be below 1 / num_clients)", None, "in (0, 1)")
    client_noise_multiplier: float = _key(
        0.0,
        "client-level DP: noise multiplier sigma of the average (0 = calibrated so that the planned rounds spend "
        "client_epsilon)",
        _non_negative,
        ">= 0",
    )
    client_sampling: str = _key(
        "fixed",
        "how each round's clients are drawn: 'fixed' (clients_per_round of them; client-level DP accounted "
        "without amplification) or 'poisson' (each client with probability fraction; accounted with it)",
        _one_of(*CLIENT_SAMPLING),
    )
    # Execution.
    seed: int = _key(
        0, "seed for data split, partitions, client sampling, LoRA init and DP noise", _seed, f"in [0, {MAX_SEED}]"
    )
    device: str = _key("auto", "where clients and the server compute", _one_of(*DEVICES))
    client_cpus: int = _key(2, "Ray: CPUs reserved per simulated client", _positive, "> 0")
    client_gpus: float = _key(0.0, "Ray: GPU fraction per simulated client (0 = none)", None, "in [0, 1]")
    ray_address: str = _key(
        "",
        "Ray: cluster the simulation joins, e.g. '10.0.0.1:6379' ('' = $RAY_ADDRESS if set, else a private local Ray)",
        _ray_address,
        "'', 'local', 'auto' or host:port (e.g. '10.0.0.1:6379')",
    )
    out_dir: str = _key("", "where results go ('' = results/<method>-<time>)")
    # Faults and recovery.
    min_replies: int = _key(
        1,
        "valid client updates a round needs to change the global adapter; a run whose rounds fall short "
        f"{MAX_SHORT_ROUNDS} times in a row stops with an error",
        _positive,
        ">= 1",
    )
    max_client_examples: int = _key(
        10_000_000,
        "largest training-set size a client may report (a size decides its weight in every average)",
        _positive,
        ">= 1",
    )
    client_state_dir: str = _key(
        "",
        "where each client saves its state (accountant, own factors) after every round ('' = in memory, or the "
        "node config's state-dir); fedsvd run puts it under the results",
    )
    resume: bool = _key(False, "continue the run in out_dir from its last checkpoint (fedsvd run --resume DIR)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check = f.metadata["check"]
            # inf and nan pass every comparison a float key's own check makes (inf > 0), and nothing downstream
            # can run with them: an infinite epsilon, for one, sends the noise calibration towards sigma = 0.
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"{f.name} = {value!r} is not allowed: must be a finite number {f.metadata['allowed']}"
                )
            if check is not None and not check(value):
                allowed = f.metadata["allowed"] or "one of: " + ", ".join(check.allowed)
                raise ConfigError(f"{f.name} = {value!r} is not allowed: must be {allowed}")
        _require(0 < self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "in (0, 1)")
        _require(0 <= self.local_eval_fraction < 1, "local_eval_fraction", self.local_eval_fraction, "in [0, 1)")
        _require(
            self.method != "fedsa" or self.local_eval_fraction > 0,
            "local_eval_fraction",
            self.local_eval_fraction,
            "> 0 with method = 'fedsa' (its personalised accuracy is measured on each client's held-out slice)",
        )
        _require(0 < self.fraction <= 1, "fraction", self.fraction, "in (0, 1]")
        _require(
            self.min_replies <= self.clients_per_round,
            "min_replies",
            self.min_replies,
            f"<= {self.clients_per_round}, the clients sampled per round (every round would fall short)",
        )
        _require(0 < self.delta < 1, "delta", self.delta, "in (0, 1)")
        if self.client_dp:
            if (refusal := METHODS[self.method].client_level_refusal) is not None:
                raise ConfigError(f"method = {self.method!r} is not allowed with client_dp = true: {refusal}")
            _require(
                0 < self.client_delta < 1 / self.num_clients,
                "client_delta",
                self.client_delta,
                f"in (0, 1 / num_clients = {1 / self.num_clients:.3g}) with client_dp = true",
            )
        _require(0 <= self.client_gpus <= 1, "client_gpus", self.client_gpus, "in [0, 1]")
        _require(bool(self.targets), "lora_targets", self.lora_targets, "a non-empty list of module names")
        _require(bool(self.model.strip()), "model", self.model, "a model name or path")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.lora_targets.split(",") if name.strip())

    @property
    def clients_per_round(self) -> int:
        return max(1, math.ceil(self.fraction * self.num_clients))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
        """Build from flat key/value pairs (a TOML table or Flower's run config), coercing and checking types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(fields)}")
        return cls(**{name: _coerce(name, fields[name].default, value) for name, value in values.items()})

    def replace(self, **changes: Any) -> ExperimentConfig:
        return self.from_mapping({**self.to_flat(), **changes})

    def to_flat(self) -> dict[str, ConfigValue]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        lines = []
        for f in dataclasses.fields(self):
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"


def resume_conflict(stored: Mapping[str, Any], cfg: ExperimentConfig) -> str | None:
    """Why ``cfg`` cannot continue a run whose resolved config was ``stored``, or None if it can: every key that
    changes what the finished rounds computed must be as it was."""
    for key, value in cfg.to_flat().items():
        if key not in RESUMABLE_KEYS and stored.get(key) != value:
            may_change = ", ".join(k for k in RESUMABLE_KEYS if k not in ("out_dir", "client_state_dir", "resume"))
            return f"resume: {key} = {value!r} differs from the run's {stored.get(key)!r}; only {may_change} may change"
    return None


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed: must be {allowed}")


def _coerce(key: str, default: ConfigValue, value: Any) -> ConfigValue:
    # bool is a subclass of int: check it first so that `rounds = true` is refused, not read as 1.
    expected = type(default)
    if isinstance(value, bool) or expected is bool:
        if type(value) is expected:
            return value
    elif expected is float and isinstance(value, int | float):
        return float(value)
    elif isinstance(value, expected):
        return value
    raise ConfigError(f"{key} = {value!r} has the wrong type: expected {expected.__name__}")


def _toml_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; every failure is a ConfigError naming the file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8 by definition
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None


def parse_override(text: str) -> tuple[str, ConfigValue]:
    """Parse one ``key=value`` from the command line; the value is read as TOML, else as a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """The defaults, updated by a TOML file and then by ``key=value`` overrides, validated."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        values.update(read_toml(path))
        source = str(path)
        nested = sorted(key for key, value in values.items() if isinstance(value, dict))
        if nested:
            raise ConfigError(f"{source}: unexpected table [{nested[0]}]; configs are flat key = value lists")
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return ExperimentConfig.from_mapping(values, source=source)
