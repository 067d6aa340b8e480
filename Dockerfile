# The service on a CUDA host:
#   docker run --gpus all -p 8000:8000 --stop-timeout 40 -v hf-cache:/cache hunyuan-service
# PyPI's torch wheels bundle the CUDA runtime, so a slim Python base suffices; the host provides
# the driver through the NVIDIA container toolkit. --stop-timeout must exceed SHUTDOWN_TIMEOUT_S
# (30 s by default) by about 10 s, or `docker stop` kills a drain in progress.
#
# BASE and UV_IMAGE let a build without registry access use local stand-ins (any image with
# python3 >= 3.10, and an image holding /uv and /uvx); deploy/docker/smoke.sh builds both.
ARG BASE=python:3.12-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13

FROM ${UV_IMAGE} AS uv

FROM ${BASE}
# Behind a TLS-inspecting proxy, build with a base that trusts its CA and
# --build-arg UV_SYSTEM_CERTS=1, so uv reads the system store rather than its own roots.
ARG UV_SYSTEM_CERTS
COPY --from=uv /uv /uvx /bin/
# The image's own python3 runs the service: uv never downloads an interpreter.
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /app

# Dependencies first, in their own layer, so code changes do not reinstall torch.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-install-project --no-dev

COPY . /app
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /cache && chown app /cache

# The Hugging Face cache (models) lives in a volume, so it survives the container.
ENV PATH="/app/.venv/bin:$PATH" HOST=0.0.0.0 PORT=8000 HF_HOME=/cache/huggingface \
    CACHE_DIR=/cache/hunyuan-service
VOLUME ["/cache"]
USER 10001
EXPOSE 8000
STOPSIGNAL SIGTERM
# Probes the PORT the service listens on, whatever it is set to.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=4)"]
CMD ["hunyuan-service"]
