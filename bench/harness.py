"""A simulated round against the same round in one plain process, as a ratio measured side by side in one run.

- Simulation: ``fedsvd run`` (SuperLink, SuperExec, Ray and its client worker, every message serialised).
- Plain process: the very same ServerApp and ClientApp code (``server.app.set_up`` and ``clients.app.app``),
  the messages handed from one to the other in memory.

Both run the default federation with 3 clients (all of them every round, one at a time: ``client_cpus = 2``)
and score the whole held-out set every round. A round's time is the one the server writes in metrics.jsonl:
training, aggregation, scoring and writing the round's files. Target: at most 1.1x.

Usage: python bench/harness.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as client_app
from fedsvd.config import ExperimentConfig
from fedsvd.heap import retain_freed_memory
from server.app import set_up

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"num_clients": 3, "client_cpus": 2}


class InProcessGrid:
    """The part of Flower's Grid the server uses, delivering each message to the ClientApp in this process."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        run_config = cfg.to_flat()
        self.contexts = {
            100 + partition: Context(
                run_id=1,
                node_id=100 + partition,
                node_config={"partition-id": partition, "num-partitions": cfg.num_clients},
                state=RecordDict(),
                run_config=run_config,
            )
            for partition in range(cfg.num_clients)
        }
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            # Flower's own in-memory grid gives each pushed message its id the same way.
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.replies.append(client_app(message, self.contexts[message.metadata.dst_node_id]))
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        ready = [reply for reply in self.replies if reply.metadata.reply_to_message_id in wanted]
        self.replies = [reply for reply in self.replies if reply.metadata.reply_to_message_id not in wanted]
        return ready


def round_seconds(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["seconds"] for row in rows if row["round"] >= 1]


def simulated(rounds: int, out_dir: Path) -> list[float]:
    command = [sys.executable, "-m", "fedsvd.cli", "run", "--out", str(out_dir), "--set", f"rounds={rounds}"]
    for key, value in SETTINGS.items():
        command += ["--set", f"{key}={value}"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"the simulation failed:\n{(finished.stdout + finished.stderr)[-2000:]}")
    return round_seconds(out_dir)


def in_one_process(rounds: int, out_dir: Path) -> list[float]:
    cfg = ExperimentConfig(**SETTINGS, rounds=rounds, out_dir=str(out_dir))  # type: ignore[arg-type]
    # Messages carry the run they belong to; outside a running app, say which one.
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    retain_freed_memory()  # as the ServerApp's main does; here it also covers the clients, which share the process
    set_up(InProcessGrid(cfg), cfg).run()  # type: ignore[arg-type]
    return round_seconds(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsvd-harness-") as scratch:
        plain = in_one_process(args.rounds, Path(scratch) / "plain")
        simulation = simulated(args.rounds, Path(scratch) / "simulation")
    plain_s, simulation_s = statistics.median(plain), statistics.median(simulation)
    ratio = simulation_s / plain_s
    print(
        f"a round of 3 clients, simulation / one plain process (median of {args.rounds} rounds): "
        f"{simulation_s:.1f} s / {plain_s:.1f} s = {ratio:.2f}x (target <= 1.1x) {'ok' if ratio <= 1.1 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
