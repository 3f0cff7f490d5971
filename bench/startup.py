"""Where the time from ``fedsvd run`` to round 0 goes, read off one run of the default federation.

The stages are the moments Flower, Ray and the ServerApp log in the run's flower.log (their own timestamps) and
the moments the command's console and metrics.jsonl show, all measured from the command's start:

- the command's checks: config, model on the meta device, data, every client's privacy plan;
- the private SuperLink up; the run handed to it (``flwr run`` builds and submits the app);
- the ServerApp started (SuperExec and the simulation runtime start, the app is installed and imported);
- Ray started with its pool of client actors;
- round 0 scoring begins (the ServerApp loads the model and held-out data, and every client is discovered, which
  starts a client actor: it imports torch, transformers and peft);
- round 0 scored.

Usage: python bench/startup.py [--set key=value ...]   (default: the default config, 1 round)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Uvicorn's timestamps (UTC) and those of Python's logging in Flower's processes (local time, whole seconds).
UVICORN_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z ")
LOGGING_TIME = re.compile(r"^(\d\d/\d\d/\d{4} \d\d:\d\d:\d\d):")
# The first log line of each stage's end, as Flower, Ray and the ServerApp write it.
MILESTONES = (
    ("SuperLink up", "Uvicorn running on"),
    ("run handed to the SuperLink", "/v1/control/start-run"),
    ("ServerApp started", ":INFO:fedsvd: "),
    ("Ray and its client actor pool started", "Constructed ActorPool"),
)


def log_time(line: str) -> float | None:
    if match := UVICORN_TIME.match(line):
        return datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC).timestamp()
    if match := LOGGING_TIME.match(line):
        return datetime.strptime(match.group(1), "%m/%d/%Y %H:%M:%S").timestamp()
    return None


def milestones(flower_log: Path) -> dict[str, float]:
    """Wall-clock time of each milestone's first log line."""
    found: dict[str, float] = {}
    for line in flower_log.read_text(errors="replace").splitlines():
        stamp = log_time(line)
        for name, marker in MILESTONES:
            if stamp is not None and name not in found and marker in line:
                found[name] = stamp
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsvd-startup-") as tmp:
        out_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "fedsvd.cli", "run", "--out", str(out_dir), "--set", "rounds=1"]
        command += [item for override in args.set for item in ("--set", override)]
        started = time.time()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        checked = round_0 = None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if checked is None and line.startswith("max_length "):  # the last line before Flower starts
                checked = time.time()
            if round_0 is None and line.startswith("round   0"):
                round_0 = time.time()
        if process.wait() != 0 or checked is None or round_0 is None:
            print("".join(lines), file=sys.stderr)
            return 1
        row = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
        stages = {"command's checks": checked, **milestones(out_dir / "flower.log")}
        stages["round 0 scoring begins"] = round_0 - row["seconds"]
        stages["round 0 scored"] = round_0
    previous = started
    print(f"from `fedsvd run` to round 0: {round_0 - started:.1f} s")
    for name, moment in sorted(stages.items(), key=lambda item: item[1]):
        print(f"  {moment - started:6.1f} s  (+{moment - previous:5.1f} s)  {name}")
        previous = moment
    return 0


if __name__ == "__main__":
    sys.exit(main())
