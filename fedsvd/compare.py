"""Comparison files: several runs (methods and/or settings) under one shared federation, over several seeds.

A comparison file is TOML::

    base = "default.toml"        # optional: a run config the comparison starts from (relative to this file)
    seeds = 3                    # how many seeds (seed, seed + 1, ...); ``--seeds`` overrides it
    target_accuracy = 0.7        # optional: the summary reports the first round reaching it
    reference = "ffa"            # optional: every other run is compared with this one, seed by seed
    last_k = 3                   # the summary's smoothed accuracy: the mean over the last k scored rounds

    [settings]                   # config keys shared by every run
    epsilon = 6.0

    [[runs]]                     # one entry per run: a name plus the keys that make it different
    name = "fedsvd"
    method = "fedsvd"

Every run of one seed shares everything the config derives from the seed: data split, partitions, client
sampling sequence, LoRA initialisation and each client's noise plan (the privacy plan depends only on data
and DP settings, never on the method). Differences between runs of a seed are therefore the methods' own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsvd.config import ConfigError, ExperimentConfig, read_toml

COMPARISON_KEYS = ("base", "seeds", "target_accuracy", "reference", "last_k", "settings", "runs")
DEFAULT_LAST_K = 3
# Run names become directory names: keep them portable and unambiguous.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Keys a run may not set: the comparison owns where results go and which seeds run.
RESERVED_RUN_KEYS = ("out_dir", "seed")


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a name and its config keys (on top of the base and the shared settings)."""

    name: str
    overrides: Mapping[str, Any]


@dataclass(frozen=True)
class Comparison:
    """A parsed comparison file; ``config(run, seed)`` gives the exact config of one simulation."""

    source: str
    base: ExperimentConfig
    runs: tuple[RunSpec, ...]
    seeds: tuple[int, ...]
    target_accuracy: float | None
    reference: str | None
    last_k: int

    def config(self, run: RunSpec, seed: int) -> ExperimentConfig:
        try:
            return self.base.replace(**run.overrides, seed=seed)
        except ConfigError as err:
            raise ConfigError(f"{self.source}: run {run.name!r}: {err}") from None

    def to_record(self) -> dict[str, Any]:
        """What ``fedsvd report`` needs to re-render a comparison without the original file."""
        return {
            "source": self.source,
            "base": self.base.to_flat(),
            "runs": [
                {"name": run.name, "method": self.config(run, self.seeds[0]).method, "overrides": dict(run.overrides)}
                for run in self.runs
            ],
            "seeds": list(self.seeds),
            "target_accuracy": self.target_accuracy,
            "reference": self.reference,
            "last_k": self.last_k,
        }


def _seed_count(value: Any, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: seeds = {value!r} is not allowed: must be an integer >= 1")
    return value


def check_reference(value: Any, runs: Sequence[str], where: str) -> str:
    """A reference run must be one of the comparison's runs; ``where`` names the file and key, or the option."""
    if not isinstance(value, str) or value not in runs:
        raise ConfigError(f"{where} = {value!r} is not allowed: must name one of the runs ({', '.join(runs)})")
    return value


def check_last_k(value: Any, where: str) -> int:
    """How many of the last scored rounds the summary's smoothed accuracy averages: at least one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} = {value!r} is not allowed: must be an integer >= 1")
    return value


def load_comparison(path: str | Path, seeds: int | None = None) -> Comparison:
    """Read and fully validate a comparison file: every (run, seed) config is built once here.

    Parameters
    ----------
    path
        The TOML comparison file.
    seeds
        Number of seeds, overriding the file's ``seeds`` (the base config's seed is the first).

    Raises
    ------
    ConfigError
        One line naming the file and the offending key or run.
    """
    source = str(path)
    values = read_toml(path)
    unknown = sorted(set(values) - set(COMPARISON_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; a comparison has: {', '.join(COMPARISON_KEYS)}")

    base = ExperimentConfig()
    if "base" in values:
        base_path = Path(path).parent / str(values["base"])
        base = ExperimentConfig.from_mapping(read_toml(base_path), source=str(base_path))
    settings = values.get("settings", {})
    if not isinstance(settings, dict):
        raise ConfigError(f"{source}: settings must be a table of config keys")
    try:
        base = base.replace(**settings)
    except ConfigError as err:
        raise ConfigError(f"{source}: [settings]: {err}") from None

    raw_runs = values.get("runs")
    if not isinstance(raw_runs, list) or not raw_runs or not all(isinstance(run, dict) for run in raw_runs):
        raise ConfigError(f"{source}: runs must be a non-empty list of [[runs]] tables")
    runs: list[RunSpec] = []
    for index, raw in enumerate(raw_runs, start=1):
        run = dict(raw)
        name = run.pop("name", None)
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
            raise ConfigError(f"{source}: run {index}: name = {name!r} must be letters, digits, '.', '_' or '-'")
        if any(existing.name == name for existing in runs):
            raise ConfigError(f"{source}: run name {name!r} is used twice")
        reserved = sorted(set(run) & set(RESERVED_RUN_KEYS))
        if reserved:
            raise ConfigError(f"{source}: run {name!r} sets {reserved[0]!r}, which the comparison controls")
        runs.append(RunSpec(name, run))

    count = _seed_count(seeds if seeds is not None else values.get("seeds", 1), source)
    target = values.get("target_accuracy")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= 1):
        raise ConfigError(f"{source}: target_accuracy = {target!r} is not allowed: must be in (0, 1]")
    reference = None
    if "reference" in values:
        reference = check_reference(values["reference"], [run.name for run in runs], f"{source}: reference")
    comparison = Comparison(
        source=source,
        base=base,
        runs=tuple(runs),
        seeds=tuple(base.seed + offset for offset in range(count)),
        target_accuracy=None if target is None else float(target),
        reference=reference,
        last_k=check_last_k(values.get("last_k", DEFAULT_LAST_K), f"{source}: last_k"),
    )
    for run in comparison.runs:  # every config is checked before anything runs
        for seed in comparison.seeds:
            comparison.config(run, seed)
    return comparison


def run_dir(out_dir: Path, run_name: str, seed: int) -> Path:
    """Where one (run, seed) simulation writes its results."""
    return out_dir / run_name / f"seed-{seed}"
