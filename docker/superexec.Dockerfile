# The image that runs this project's ServerApp and ClientApps: Flower's official SuperExec image with the
# apps' dependencies installed at build time. The apps' code is not baked in: it arrives with every run (the
# FAB that `flwr run` submits), so the image only changes when the dependencies do.
#
#   docker compose -f docker/compose.yml build      (the build context is the repository root)
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

# The CPU wheel by default: the CUDA build is gigabytes that a CPU-only owner never needs.
# docker/compose.gpu.yml builds with PyPI's CUDA wheels instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

WORKDIR /app
COPY --chown=app:app pyproject.toml /tmp/fedsvd-pyproject.toml
# torch first, so that no later requirement pulls another build of it; flwr itself comes with the base image.
# The mount points are created as the image's user, so that fresh named volumes on them are writable.
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -c "import tomllib; deps = tomllib.load(open('/tmp/fedsvd-pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('flwr[')))" > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/fedsvd-pyproject.toml \
    && mkdir -p /app/state /app/results /app/.cache

# Dependencies are in the image: never let Flower install them again at run time.
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    TOKENIZERS_PARALLELISM=false

ENTRYPOINT ["flower-superexec"]
