"""On a CUDA machine: is a run killed with ``kill -9`` and resumed the same, bit for bit, as one left alone?

The default federation on the GPU (clients sharing it, as in gpu_check.py) runs once uninterrupted; a second
run is killed with SIGKILL once round 1 is recorded, the Flower and Ray processes still alive 10 s later are
counted, and the run is resumed. Then metrics.jsonl (time columns aside), the adapter and privacy.json of the
two are compared. Run after ``. bench/gpu/setup.sh`` as ``python3 bench/gpu/resume_check.py --model ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from gpu_check import gpu_setup  # noqa: E402

from fedsvd.results import read_metrics  # noqa: E402

ROUNDS = 3
PROCESS_NAMES = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server", "ray::")


def command(model: str, out_dir: Path) -> list[str]:
    overrides = [o for o in gpu_setup(model).federation_overrides() if not o.startswith("--set=rounds=")]
    return [sys.executable, "-m", "fedsvd.cli", "run", "configs/default.toml", *overrides,
            f"--set=rounds={ROUNDS}", "--out", str(out_dir)]  # fmt: skip


def leftovers() -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line[:80] for line in listing if any(name in line for name in PROCESS_NAMES)]


def rows(out_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(out_dir)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    model = str(Path(parser.parse_args().model).resolve())
    import torch
    from safetensors.torch import load_file

    if not torch.cuda.is_available():
        print("resume-check: no CUDA GPU on this machine: nothing to check")
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="resume-check-"))
    whole, killed = scratch / "whole", scratch / "killed"
    started = time.monotonic()
    subprocess.run(command(model, whole), cwd=REPO, check=True, capture_output=True)
    print(f"uninterrupted run: {time.monotonic() - started:.0f} s", flush=True)

    process = subprocess.Popen(command(model, killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(row["round"] >= 1 for row in read_metrics(killed)):
        if process.poll() is not None:
            print("the run ended before round 1")
            return 1
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(10)
    left = leftovers()
    print(f"kill -9 after round 1: {len(left)} Flower/Ray processes left 10 s later {left}", flush=True)

    resumed = subprocess.run(
        [sys.executable, "-m", "fedsvd.cli", "run", "--resume", str(killed)], cwd=REPO, capture_output=True, text=True
    )
    print(f"resume: exit {resumed.returncode}; {resumed.stdout.strip().splitlines()[-1][:160]}", flush=True)
    a, b = load_file(str(whole / "adapter.safetensors")), load_file(str(killed / "adapter.safetensors"))
    same = {
        "metrics.jsonl": rows(whole) == rows(killed),
        "adapter.safetensors": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "privacy.json": (whole / "privacy.json").read_bytes() == (killed / "privacy.json").read_bytes(),
    }
    print("identical after resume on CUDA: " + json.dumps(same))
    if not same["metrics.jsonl"]:
        for x, y in zip(rows(whole), rows(killed), strict=False):
            scores = (x["accuracy"], y["accuracy"], x["loss"], y["loss"])
            print("  round {}: accuracy {!r} / {!r}, loss {!r} / {!r}".format(x["round"], *scores))
    return 0 if all(same.values()) and not left and resumed.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
