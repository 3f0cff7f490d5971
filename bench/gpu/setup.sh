# Prelude for the GPU check on the device machine, which has torch, transformers, peft, ... but no Flower,
# Ray, Opacus or HF datasets, and no network. Source it from the repo root (it exports the environment):
#   . bench/gpu/setup.sh && python3 bench/gpu_check.py --model .gpu/minilm-shaped
# It installs the carried wheels into /tmp/site (a fallback wheel only where the image's own version of that
# package misses a pin of the carried ones), unpacks the slimmed Ray, lists any requirement still unmet,
# points fedsvd at the carried corpus and builds a randomly initialised model of MiniLM's exact shape (the
# pretrained weights are too large to carry). bench/gpu/fetch.sh builds .gpu/.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "setup.sh: source it (. bench/gpu/setup.sh), or its exports are lost" >&2
    exit 2
fi
GPU_DIR="$PWD/.gpu"
SITE=/tmp/site
rm -rf "$SITE" && mkdir -p "$SITE" || return 1

python3 - "$GPU_DIR" "$SITE" <<'PY' || return 1
import email.parser
import importlib.metadata as metadata
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

gpu_dir, site = Path(sys.argv[1]), Path(sys.argv[2])
started = time.monotonic()
ray_archive = gpu_dir / "ray-2.55.1-slim.tar.xz"


def requirements(metadata_bytes: bytes) -> list[Requirement]:
    message = email.parser.BytesParser().parsebytes(metadata_bytes)
    parsed = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
    return [r for r in parsed if r.marker is None or r.marker.evaluate({"extra": ""})]


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return requirements(archive.read(name))


def image_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


with tarfile.open(ray_archive) as archive:
    needed = requirements(archive.extractfile("./ray-2.55.1.dist-info/METADATA").read())
required = sorted((gpu_dir / "wheels").glob("*.whl"))
for wheel in required:
    needed += wheel_requirements(wheel)

# A fallback is chosen when the image's version misses a pin; its own requirements may call for more.
fallbacks = {parse_wheel_filename(w.name)[0]: w for w in (gpu_dir / "fallback").glob("*.whl")}
chosen: dict[str, str] = {}
changed = True
while changed:
    changed = False
    for name, wheel in fallbacks.items():
        if name in chosen:
            continue
        pins = [r.specifier for r in needed if canonicalize_name(r.name) == name]
        have = image_version(name)
        if have is None or not all(pin.contains(have, prereleases=True) for pin in pins):
            chosen[name] = f"{name} {parse_wheel_filename(wheel.name)[1]} (image: {have or 'none'})"
            needed += wheel_requirements(wheel)
            changed = True

wheels = [*required, *(fallbacks[name] for name in chosen)]
# One pip call: a second --target install into the same folder would skip (or, with --upgrade, replace) bin/.
subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir",
     "--disable-pip-version-check", "--target", str(site), *map(str, wheels)],
    check=True,
)
with tarfile.open(ray_archive) as archive:
    archive.extractall(site, filter="tar")  # "tar" keeps the executable bits of gcs_server and raylet

sys.path.insert(0, str(site))
unmet = []
for requirement in needed:
    have = image_version(requirement.name)
    if canonicalize_name(requirement.name) != "uv" and (have is None or not requirement.specifier.contains(have, True)):
        unmet.append(f"{requirement} (found {have or 'none'})")
print(
    f"setup: {len(wheels)} wheels + Ray 2.55.1 (slim) in {site} ({time.monotonic() - started:.0f} s); "
    f"fallbacks used: {', '.join(chosen.values()) or 'none'}; "
    f"unmet pins: {', '.join(sorted(set(unmet))) or 'none'} (uv is left out: only runtime installs use it)"
)
PY

export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FEDSVD_CACHE_DIR="$GPU_DIR/cache"
export PYTHONUNBUFFERED=1
# No network there: nothing may wait on the hub or on Ray's usage report.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0

python3 - "$GPU_DIR" <<'PY' || return 1
import shutil
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

gpu_dir = Path(sys.argv[1])
target = gpu_dir / "minilm-shaped"
if not (target / "model.safetensors").is_file():
    shutil.copytree(gpu_dir / "minilm-tokenizer", target, dirs_exist_ok=True)
    torch.manual_seed(0)
    # all-MiniLM-L6-v2's own config: hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522.
    BertModel(BertConfig.from_pretrained(target)).save_pretrained(target)
print(f"setup: randomly initialised MiniLM-shaped BERT in {target}")
PY
