"""Config: one set of defaults everywhere, and every bad value is a ConfigError naming the key.

How the commands turn bad input into exit code 2 and one line is tested case by case in test_bad_input.py.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedsvd.config import MAX_SEED, ConfigError, ExperimentConfig, load_config, ray_host_port

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_equals_the_typed_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == ExperimentConfig().to_flat()


def test_default_toml_is_the_defaults() -> None:
    assert load_config(ROOT / "configs" / "default.toml") == ExperimentConfig()


@pytest.mark.parametrize("name", ["default", "fedsvd", "ffa", "fedavg"])
def test_shipped_configs_load_and_name_their_method(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.method == ("fedsvd" if name == "default" else name)


def test_overrides_are_typed_and_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('method = "ffa"\nrounds = 3\n')
    cfg = load_config(path, ["rounds=5", "lr=1", "dp=false", "model=some/model"])
    assert (cfg.method, cfg.rounds, cfg.lr, cfg.dp, cfg.model) == ("ffa", 5, 1.0, False, "some/model")
    assert ExperimentConfig.from_mapping(tomllib.loads(cfg.to_toml())) == cfg


FLOAT_KEYS = [f.name for f in dataclasses.fields(ExperimentConfig) if isinstance(f.default, float)]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_key_refuses_non_finite_numbers(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^{key} = {value!r} is not allowed: must be a finite number"):
        ExperimentConfig.from_mapping({key: value})


@pytest.mark.parametrize(("seed", "ok"), [(0, True), (MAX_SEED, True), (-1, False), (MAX_SEED + 1, False)])
def test_seeds_are_32_bit_and_not_negative(seed: int, ok: bool) -> None:
    if ok:
        assert ExperimentConfig(seed=seed).seed == seed
    else:
        with pytest.raises(ConfigError, match=rf"^seed = {seed} is not allowed: must be in \[0, {MAX_SEED}\]"):
            ExperimentConfig(seed=seed)


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [("", None), ("local", None), ("auto", None), ("10.0.0.1:6379", ("10.0.0.1", 6379)),
     ("ray://head.example:10001", ("head.example", 10001)), ("[::1]:6379", ("::1", 6379))],
)  # fmt: skip
def test_ray_addresses_name_a_host_and_port_or_leave_it_to_ray(address: str, endpoint: tuple[str, int] | None) -> None:
    assert ExperimentConfig(ray_address=address).ray_address == address
    assert ray_host_port(address) == endpoint


@pytest.mark.parametrize("address", ["head", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536", "http://head:6379", "a b:1"])
def test_malformed_ray_addresses_are_refused(address: str) -> None:
    with pytest.raises(
        ConfigError, match=r"^ray_address = .* is not allowed: must be '', 'local', 'auto' or host:port"
    ):
        ExperimentConfig(ray_address=address)


def test_the_installed_command_exits_2_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedsvd.cli", "run", "--set", "lora_rank=-3"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "fedsvd: error: lora_rank = -3 is not allowed: must be > 0"
