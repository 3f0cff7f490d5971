"""Comparison files, the summary table and plots, and ``fedsvd plan`` (no training here).

The end-to-end ``fedsvd compare`` run over real simulations lives in test_federation.py.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsvd.cli import main
from fedsvd.compare import load_comparison, run_dir
from fedsvd.config import ConfigError, ExperimentConfig
from fedsvd.data import HUB_TASKS, TextDataset
from fedsvd.federation import Split, _split_federation, plan_federation
from fedsvd.privacy.accounting import epsilon_of
from fedsvd.report import COMPARISON_JSON, PLOTS, SUMMARY_CSV, SUMMARY_MD, render
from fedsvd.results import METRICS_JSONL, SUMMARY_JSON

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two-sided 95% Student-t quantiles, from tables: an independent check of the confidence intervals.
T_975 = {1: 12.706, 2: 4.303}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


RUNS = '[[runs]]\nname = "a"\nmethod = "fedsvd"\n\n[[runs]]\nname = "b"\nmethod = "ffa"\nsvd_every = 2\n'


# --- comparison files ----------------------------------------------------------------------------------


def test_comparison_builds_every_run_and_seed(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", "rounds = 7\nseed = 10\n")
    path = write(tmp_path / "c.toml", f'base = "base.toml"\nseeds = 2\n[settings]\nepsilon = 3.0\n{RUNS}')
    comparison = load_comparison(path)
    assert [run.name for run in comparison.runs] == ["a", "b"] and comparison.seeds == (10, 11)
    cfg = comparison.config(comparison.runs[1], 11)
    assert (cfg.method, cfg.svd_every, cfg.rounds, cfg.epsilon, cfg.seed) == ("ffa", 2, 7, 3.0, 11)
    assert load_comparison(path, seeds=4).seeds == (10, 11, 12, 13)
    record = comparison.to_record()
    assert [run["method"] for run in record["runs"]] == ["fedsvd", "ffa"] and record["base"]["rounds"] == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"colour = 1\n{RUNS}", "unknown key 'colour'"),
        ("seeds = 1\n", "runs must be a non-empty list"),
        (f"seeds = 0\n{RUNS}", "seeds = 0 is not allowed"),
        (f"target_accuracy = 1.5\n{RUNS}", "target_accuracy = 1.5 is not allowed"),
        (f"[settings]\nrank = 4\n{RUNS}", r"\[settings\]: .*unknown key 'rank'"),
        (f"[settings]\nlora_rank = -1\n{RUNS}", r"\[settings\]: lora_rank = -1 is not allowed"),
        ('[[runs]]\nname = "a/b"\nmethod = "ffa"\n', "name = 'a/b' must be"),
        ('[[runs]]\nname = "a"\n[[runs]]\nname = "a"\n', "run name 'a' is used twice"),
        ('[[runs]]\nname = "a"\nseed = 3\n', "run 'a' sets 'seed'"),
        ('[[runs]]\nname = "a"\nmethod = "nope"\n', "run 'a': method = 'nope' is not allowed"),
        ('[[runs]]\nname = "s"\nmethod = "fedsa"\n', "run 's': local_eval_fraction = 0.0 is not allowed"),
    ],
)
def test_bad_comparison_is_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=message) as err:
        load_comparison(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_compare_cli_rejects_bad_input_with_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["compare", str(write(tmp_path / "bad.toml", "seeds = 1\n")), "--out", str(out)]) == 2
    assert "fedsvd: error:" in capsys.readouterr().err and not out.exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    good = write(tmp_path / "good.toml", RUNS)
    assert main(["compare", str(good), "--out", str(occupied)]) == 2
    assert "is not empty" in capsys.readouterr().err and [p.name for p in occupied.iterdir()] == ["notes.txt"]


def test_every_run_of_a_seed_shares_partitions_and_privacy_plan() -> None:
    comparison = load_comparison(CONFIGS / "compare-dp.toml")
    assert {run.overrides["method"] for run in comparison.runs} == {
        "fedsvd", "ffa", "fedavg", "fedsa", "rolora", "flora", "fedex",
    }  # fmt: skip
    assert len(comparison.seeds) == 3 and comparison.base.epsilon == 6.0
    for seed in comparison.seeds[:2]:
        plans = {run.name: plan_federation(comparison.config(run, seed)) for run in comparison.runs}
        reference = plans["fedsvd"]
        for name, plan in plans.items():
            assert [(p.num_examples, p.sample_rate, p.noise_multiplier) for p in plan] == [
                (p.num_examples, p.sample_rate, p.noise_multiplier) for p in reference
            ], name


def test_shipped_comparisons_load() -> None:
    nodp = load_comparison(CONFIGS / "compare-nodp.toml")
    assert not nodp.base.dp and len(nodp.runs) == 7
    for path in sorted((CONFIGS / "paper").glob("*.toml")):
        comparison = load_comparison(path)
        cfg = comparison.base
        assert {run.overrides["method"] for run in comparison.runs} == {"fedsvd", "ffa", "fedavg", "flora", "fedex"}
        assert cfg.dataset == path.stem and cfg.dataset in HUB_TASKS
        paper = (cfg.model, cfg.lora_rank, cfg.lora_alpha, cfg.targets, cfg.num_clients, cfg.dirichlet_alpha)
        assert paper == ("roberta-large", 8, 8.0, ("query", "value"), 6, 0.5)
        training = (cfg.fraction, cfg.rounds, cfg.local_steps, cfg.batch_size, cfg.lr, cfg.clip_norm, cfg.epsilon)
        assert training == (0.5, 100, 10, 128, 0.5, 2.0, 6.0) and not cfg.train_head and cfg.pooling == "model"


# --- summary table and plots ---------------------------------------------------------------------------


def fake_run(directory: Path, accuracies: list[float], bytes_up: int, finished: bool = True) -> None:
    directory.mkdir(parents=True)
    rows = [
        {"round": r, "accuracy": acc, "epsilon_max": 0.5 * r, "bytes_up": 0 if r == 0 else bytes_up,
         "bytes_down": 0 if r == 0 else 2 * bytes_up, "local_accuracy": None}
        for r, acc in enumerate(accuracies)
    ]  # fmt: skip
    (directory / METRICS_JSONL).write_text("".join(json.dumps(row) + "\n" for row in rows))
    if finished:
        summary = {"final_accuracy": accuracies[-1], "epsilon_max": 0.5 * (len(accuracies) - 1), "wall_seconds": 9.0}
        (directory / SUMMARY_JSON).write_text(json.dumps(summary))


def test_report_computes_means_intervals_and_rounds_to_target(tmp_path: Path) -> None:
    record = {
        "source": "c.toml", "base": {}, "seeds": [0, 1, 2], "target_accuracy": 0.7,
        "runs": [{"name": "good", "method": "fedsvd", "overrides": {}},
                 {"name": "partial", "method": "fedavg", "overrides": {}}],
    }  # fmt: skip
    (tmp_path / COMPARISON_JSON).write_text(json.dumps(record))
    good = {0: [0.5, 0.6, 0.72, 0.8], 1: [0.5, 0.71, 0.75, 0.7], 2: [0.5, 0.55, 0.65, 0.69]}
    for seed, accuracies in good.items():
        fake_run(run_dir(tmp_path, "good", seed), accuracies, bytes_up=1000 * (seed + 1))
    fake_run(run_dir(tmp_path, "partial", 0), [0.5, 0.6, 0.62, 0.66], bytes_up=10)
    fake_run(run_dir(tmp_path, "partial", 1), [0.5, 0.6], bytes_up=10, finished=False)

    lines, plots = render(tmp_path)
    by_run = {line["run"]: line for line in lines}
    finals = [0.8, 0.7, 0.69]
    half = T_975[2] * statistics.stdev(finals) / math.sqrt(3)
    assert by_run["good"]["final_accuracy_mean"] == pytest.approx(statistics.fmean(finals))
    assert by_run["good"]["final_accuracy_ci95"] == pytest.approx(half, rel=1e-3)
    assert by_run["good"]["best_accuracy_mean"] == pytest.approx((0.8 + 0.75 + 0.69) / 3)
    # Seed 0 first reaches 0.7 in round 2, seed 1 in round 1, seed 2 never.
    assert by_run["good"]["rounds_to_target_mean"] == 1.5 and by_run["good"]["seeds_reaching_target"] == "2/3"
    assert by_run["good"]["bytes_up_per_round"] == pytest.approx(2000) and by_run["good"]["epsilon_max"] == 1.5
    assert by_run["partial"]["seeds_done"] == "1/3" and math.isnan(by_run["partial"]["final_accuracy_ci95"])

    with (tmp_path / SUMMARY_CSV).open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["run"] for row in table] == ["good", "partial"]
    assert float(table[0]["final_accuracy_mean"]) == pytest.approx(statistics.fmean(finals))
    markdown = (tmp_path / SUMMARY_MD).read_text()
    assert f"{statistics.fmean(finals):.4f} ± {half:.4f}" in markdown and "rounds to 0.7" in markdown
    assert sorted(path.name for path in plots) == sorted(PLOTS.values())
    for path in plots:
        assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 10_000


def test_report_reads_runs_scored_only_every_other_round(tmp_path: Path) -> None:
    """With eval_every = 2 the unscored rounds have no accuracy: the table and plots use the scored ones."""
    record = {"source": "c.toml", "base": {}, "seeds": [0], "target_accuracy": 0.7,
              "runs": [{"name": "sparse", "method": "fedsvd", "overrides": {}}]}  # fmt: skip
    (tmp_path / COMPARISON_JSON).write_text(json.dumps(record))
    fake_run(run_dir(tmp_path, "sparse", 0), [0.5, None, 0.75, None, 0.72], bytes_up=100)  # type: ignore[list-item]
    lines, plots = render(tmp_path)
    assert lines[0]["best_accuracy_mean"] == 0.75 and lines[0]["rounds_to_target_mean"] == 2
    assert sorted(path.name for path in plots) == sorted(PLOTS.values())


def test_report_cli_needs_a_comparison_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "not a comparison directory" in capsys.readouterr().err


# --- plan ----------------------------------------------------------------------------------------------


def test_plan_projects_the_target_epsilon_at_the_last_round(
    tiny_bert: Path, sentiment_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = ["--set", f"model={tiny_bert}", "--set", f"dataset={sentiment_csv}", "--set", "num_clients=3"]
    settings += ["--set", "delta=1e-3", "--set", "epsilon=3", "--set", "rounds=20", "--set", "local_steps=2"]
    assert main(["plan", str(CONFIGS / "default.toml"), *settings]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("client"))
    assert header.split()[-10:] == [str(r) for r in range(2, 21, 2)]
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("0", "1", "2")]
    assert len(rows) == 3
    for row in rows:
        sigma, rate, epsilons = float(row[3]), float(row[2]), [float(value) for value in row[-10:]]
        assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(3.0, abs=5e-3)
        # The projection after 10 rounds is the accountant's epsilon for 10 x 2 steps (rounding of the print).
        assert epsilons[4] == pytest.approx(epsilon_of([(sigma, rate, 20)], 1e-3, "rdp"), rel=2e-2)


# One task: planning the others is the same code with larger label counts (and slow PRV calibrations).
@pytest.mark.parametrize("task", ["sst2"])
def test_paper_configs_pass_plan_without_their_data(
    task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDSVD_HF_DATA_DIR", str(tmp_path))  # an empty mirror: the hub is never contacted
    assert main(["plan", str(CONFIGS / "paper" / f"{task}.toml")]) == 0
    out = capsys.readouterr().out
    assert "published label counts" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in "012345"]
    assert len(rows) == 6
    assert sum(int(row[1]) for row in rows) == sum(HUB_TASKS[task].train_label_counts)
    for row in rows:
        assert float(row[-1]) == pytest.approx(6.0, abs=5e-3)


def test_partition_sizes_depend_only_on_label_counts() -> None:
    """What lets `fedsvd plan` work from published label counts: the order of the examples never matters."""
    labels = [0] * 700 + [1] * 500 + [2] * 300
    shuffled = labels[:]
    random.Random(3).shuffle(shuffled)
    shapes = []
    for order in (labels, shuffled):
        data = TextDataset(tuple(f"t{i}" for i in range(len(order))), tuple(order), 3, "counts")
        federation = _split_federation(data, data, Split("counts", 0.1, 5, "dirichlet", 0.5, 0, 4, 0.1))
        shapes.append(
            [(len(p), len(e)) for p, e in zip(federation.partitions, federation.local_eval, strict=True)]  # type: ignore[arg-type]
        )
    assert shapes[0] == shapes[1] and len(set(shapes[0])) > 1


def test_config_requires_local_slices_for_fedsa() -> None:
    with pytest.raises(ConfigError, match="local_eval_fraction"):
        ExperimentConfig(method="fedsa")
    assert ExperimentConfig(method="fedsa", local_eval_fraction=0.1).local_eval_fraction == 0.1


def test_a_failing_run_is_reported_the_others_go_on_and_resume_retries_only_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert: Path, sentiment_csv: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The comparison loop's bookkeeping, with a stand-in for the simulator (the real one is in test_federation)."""
    import fedsvd.simulation

    calls: list[tuple[str, int]] = []
    resumed: list[tuple[str, int]] = []
    broken = {"b"}

    def simulate(
        cfg: ExperimentConfig, out_dir: Path, show: Callable[[dict], None], waiting: Callable[[str], None], **_: object
    ) -> bool:
        calls.append((out_dir.parent.name, cfg.seed))
        finished = out_dir.parent.name not in broken
        if cfg.resume:
            resumed.append((out_dir.parent.name, cfg.seed))
            shutil.rmtree(out_dir)  # the stand-in writes the whole run again
        fake_run(out_dir, [0.5, 0.6 + 0.01 * cfg.seed], bytes_up=100, finished=finished)
        if not finished and cfg.seed == 1:
            (out_dir / "checkpoint.safetensors").write_bytes(b"")  # it got past a round before it failed
        return finished

    monkeypatch.setattr(fedsvd.simulation, "run_simulation", simulate)
    spec = write(
        tmp_path / "c.toml",
        f'seeds = 2\n[settings]\nmodel = "{tiny_bert}"\ndataset = "{sentiment_csv}"\nnum_clients = 3\n'
        f"delta = 1e-3\n{RUNS}",
    )
    out = tmp_path / "out"
    assert main(["compare", str(spec), "--out", str(out)]) == 1
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert "2 run(s) failed: b seed 0, b seed 1" in capsys.readouterr().err
    with (out / SUMMARY_CSV).open() as handle:
        assert [row["seeds_done"] for row in csv.DictReader(handle)] == ["2/2", "0/2"]

    assert main(["compare", str(spec), "--out", str(out)]) == 2, "an existing comparison needs --resume"
    broken.clear()
    calls.clear()
    assert main(["compare", str(spec), "--out", str(out), "--resume"]) == 0
    assert calls == [("b", 0), ("b", 1)], "finished runs are skipped"
    assert resumed == [("b", 1)], "a run with a checkpoint continues from it; one without starts again"
    kept = sorted(path.name for path in (out / "b").iterdir())
    assert kept == ["seed-0", "seed-0.incomplete-" + kept[1].split("incomplete-")[1], "seed-1"], kept
    changed = write(tmp_path / "changed.toml", spec.read_text().replace("num_clients = 3", "num_clients = 2"))
    assert main(["compare", str(changed), "--out", str(out), "--resume"]) == 2, "other settings never mix in"
