"""Config: one set of defaults everywhere, and every bad value stops the run with exit code 2 and one line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedsvd.cli import main
from fedsvd.config import ConfigError, ExperimentConfig, load_config

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


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["run", *argv])
    return code, capsys.readouterr().err.strip()


BAD_VALUES = [
    (["--set", "method=fedprox"], "method = 'fedprox' is not allowed: must be one of: "),
    (["--set", "lora_rank=0"], "lora_rank = 0 is not allowed: must be > 0"),
    (["--set", "epsilon=-1"], "epsilon = -1.0 is not allowed: must be > 0"),
    (["--set", "fraction=1.5"], "fraction = 1.5 is not allowed: must be in (0, 1]"),
    (["--set", "fraction=0"], "fraction = 0.0 is not allowed: must be in (0, 1]"),
    (["--set", "rounds=0"], "rounds = 0 is not allowed: must be >= 1"),
    (["--set", "rounds=two"], "rounds = 'two' has the wrong type: expected int"),
    (["--set", "learning_rate=0.1"], "unknown key 'learning_rate'"),
    (["--set", "dataset=imdb"], "dataset"),
    (["--set", "model=/nonexistent/model-dir"], "model = '/nonexistent/model-dir' cannot be loaded"),
    (["/nonexistent/run.toml"], "cannot read config file '/nonexistent/run.toml'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES)
def test_bad_values_exit_2_with_one_line_naming_the_key(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = _run_cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedsvd: error: ") and message in err
    assert not (tmp_path / "out").exists(), "nothing may be written for a refused config"


def test_unknown_dataset_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    _, err = _run_cli(capsys, "--set", "dataset=imdb")
    assert "rotten_tomatoes" in err


def test_delta_not_below_one_over_n_names_the_client(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    code, err = _run_cli(
        capsys, "--set", f"model={tiny_bert}", "--set", f"dataset={sentiment_csv}", "--set", "num_clients=3",
        "--set", "delta=0.01", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2 and len(err.splitlines()) == 1
    assert "delta = 0.01 must be below 1 / n_k" in err and "client " in err


def test_invalid_toml_and_nested_tables_are_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(broken)
    nested = tmp_path / "nested.toml"
    nested.write_text("[dp]\nepsilon = 3\n")
    with pytest.raises(ConfigError, match=r"unexpected table \[dp\]"):
        load_config(nested)


def test_existing_results_are_never_overwritten(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    code, err = _run_cli(capsys, "--out", str(tmp_path))
    assert code == 2 and "already holds results" in err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_the_installed_command_exits_2_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedsvd.cli", "run", "--set", "lora_rank=-3"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "fedsvd: error: lora_rank = -3 is not allowed: must be > 0"
