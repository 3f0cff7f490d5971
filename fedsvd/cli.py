"""``fedsvd run``: launch a simulated federation from a config, with a live line per round."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from fedsvd.config import ConfigError, ExperimentConfig, load_config
from fedsvd.data import DataError
from fedsvd.federation import plan_federation
from fedsvd.model import ModelError, check_model
from fedsvd.privacy import PrivacyConfigError
from fedsvd.results import SUMMARY_JSON, has_results, progress_line, read_metrics

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"fedsvd: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _out_dir(cfg: ExperimentConfig, requested: str | None) -> Path:
    chosen = requested or cfg.out_dir
    if chosen:
        return Path(chosen).expanduser().resolve()
    return Path("results", f"{cfg.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}").resolve()


def _show_round(row: dict) -> None:
    print(progress_line(row), flush=True)


def preflight(cfg: ExperimentConfig) -> None:
    """Everything that can be wrong with a config is found here, before any process starts."""
    check_model(cfg.model)
    plans = plan_federation(cfg)
    sizes = ", ".join(str(plan.num_examples) for plan in plans)
    sigmas = ", ".join(f"{plan.noise_multiplier:.2f}" for plan in plans)
    print(f"clients: {cfg.num_clients} ({cfg.partition}), examples per client: {sizes}")
    if cfg.dp:
        print(
            f"DP-SGD: target eps {cfg.epsilon:g} at delta {cfg.delta:g} over {cfg.rounds * cfg.local_steps} planned "
            f"steps, clip {cfg.clip_norm:g}, noise multipliers: {sigmas}"
        )


def command_run(args: argparse.Namespace) -> int:
    from fedsvd.simulation import run_simulation

    try:
        cfg = load_config(args.config, args.set or ())
        out_dir = _out_dir(cfg, args.out)
        if has_results(out_dir):
            raise ConfigError(f"--out {str(out_dir)!r} already holds results; choose another directory")
        print(f"fedsvd run: {cfg.method} on {cfg.dataset}, model {cfg.model}, {cfg.rounds} rounds -> {out_dir}")
        preflight(cfg)
    except (ConfigError, DataError, ModelError, PrivacyConfigError) as err:
        return _fail(str(err))

    # A plain SIGTERM would skip the clean-up that stops the SuperLink, SuperExec and Ray: exit through it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.monotonic()
    finished = run_simulation(cfg, out_dir, _show_round)
    rows = read_metrics(out_dir)
    if not finished or not rows:
        print(f"fedsvd: the run did not finish; see {out_dir / 'flower.log'}", file=sys.stderr)
        return 1
    last = rows[-1]
    print(
        f"done in {time.monotonic() - started:.0f}s: final accuracy {last['accuracy']:.4f}, "
        f"max epsilon {last['epsilon_max']:.3f}"
        + (f" (target {cfg.epsilon:g}, delta {cfg.delta:g})" if cfg.dp else " (no DP)")
        + f"; results in {out_dir} ({SUMMARY_JSON}, metrics.jsonl, metrics.csv, adapter.safetensors)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsvd", description="Federated DP fine-tuning of LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one simulated federation")
    run.add_argument("config", nargs="?", help="TOML config (default: the built-in defaults)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    run.add_argument("--out", help="results directory (default: results/<method>-<time>)")
    run.set_defaults(handler=command_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
