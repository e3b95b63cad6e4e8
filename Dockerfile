# syntax=docker/dockerfile:1.7
#
# One image for every dsv2 pod: gateway, Ray head and workers, model download, helm test.
#
#   docker build -t dsv2 .                          # CUDA (default): torch's CUDA wheel
#   docker build -t dsv2:cpu --build-arg DEVICE=cpu .   # CPU only: torch's CPU wheel, slim base
#
# Stages: base-cuda | base-cpu -> base (runtime OS + user), builder (Python, venv, project,
# compiled protos, the C++ CPU kernels), runtime (base + Python + the venv + the kernels; no
# uv, no build tools, no sources).

ARG DEVICE=cuda
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG CPU_BASE_IMAGE=debian:bookworm-slim
ARG UV_VERSION=0.9.5
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# The CUDA base carries the CUDA user-space setup the NVIDIA container runtime expects; the
# libraries themselves come with torch's CUDA wheel.
FROM ${CUDA_BASE_IMAGE} AS base-cuda
ENV TORCH_INDEX_URL=https://pypi.org/simple

FROM ${CPU_BASE_IMAGE} AS base-cpu
# The CPU wheel lives on PyTorch's own index; PyPI's default torch is the multi-GB CUDA build.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM base-${DEVICE} AS base
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates bash \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 dsv2 \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/dsv2 --shell /bin/bash dsv2
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0

# ---------------------------------------------------------------------------------------------
FROM base AS builder
ARG PYTHON_VERSION
ARG TORCH_VERSION
COPY --from=uv /uv /usr/local/bin/uv
# g++ and ninja build the C++ CPU kernels (model/cpu_ext.py) here; the runtime has neither.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
# A standalone CPython under /opt/python (the CUDA base's distro Python is not 3.11).
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN uv python install ${PYTHON_VERSION} \
    && uv venv --python ${PYTHON_VERSION} /opt/venv
# torch first and pinned, from the index of this DEVICE (the CPU index carries torch's own
# dependencies too). Then the project's dependencies from PyPI plus grpcio-tools (to compile
# the protos), with torch held at the exact build just installed (e.g. 2.13.0+cpu), so the
# resolver cannot swap in PyPI's CUDA wheel.
RUN uv pip install --python /opt/venv/bin/python --index-url ${TORCH_INDEX_URL} \
        "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
RUN TORCH_BUILD="$(/opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))')" \
    && uv pip install --python /opt/venv/bin/python \
        --index-url https://pypi.org/simple --extra-index-url ${TORCH_INDEX_URL} \
        --index-strategy unsafe-best-match \
        -r pyproject.toml "torch==${TORCH_BUILD}" "grpcio-tools>=1.85,<2"
COPY proto ./proto
COPY model ./model
COPY services ./services
# Compile the protos into services/rpc (the committed copies are regenerated, so the image
# always matches proto/), then install the project itself without touching the dependencies.
RUN /opt/venv/bin/python -m services.rpc.generate \
    && uv pip install --python /opt/venv/bin/python --no-deps . \
    && uv pip uninstall --python /opt/venv/bin/python grpcio-tools \
    && cd / && /opt/venv/bin/python -c "import services.rpc.dsv2.v1.inference_pb2_grpc, services.cli, model"
# The C++ CPU kernels of the installed package, built once for the runtime stage to load
# without a compiler (a library of the same sources: the digest file beside it). Baseline
# x86-64 code with per-function vector paths chosen at run time, so any x86 node runs it.
RUN cd / && DSV2_CPU_EXT_DIR=/opt/dsv2_cpu /opt/venv/bin/python -m model.cpu_ext \
    && test -f /opt/dsv2_cpu/sources.sha256

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/dsv2_cpu /opt/dsv2_cpu
ENV DSV2_CPU_EXT_DIR=/opt/dsv2_cpu
USER 10001:10001
WORKDIR /home/dsv2
# Gateway HTTP, gateway gRPC, Ray Serve gRPC ingress.
EXPOSE 8000 50051 9000
ENTRYPOINT ["dsv2"]
CMD ["--help"]
