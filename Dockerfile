# syntax=docker/dockerfile:1
#
# liveness-proxy container image.
#
#   docker build -t liveness-proxy:0.1.0 .
#
# Two stages on the same base image: `build` installs the project and its pinned dependencies
# (constraints.txt) into a virtual environment at /opt/liveness-proxy; `runtime` copies only that
# environment. The venv must live at the same path and on the same Python in both stages, which is
# why both stages start FROM the same ${PYTHON_IMAGE}. Pin it by digest for production builds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ----------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /build
RUN python -m venv /opt/liveness-proxy

# Only what the install needs (see .dockerignore): no tests, no .env, no local databases.
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src

# A regular (non-editable) install: the package lands in the venv's site-packages, byte-compiled
# here, because the runtime image cannot write .pyc files.
RUN /opt/liveness-proxy/bin/pip install --constraint constraints.txt . \
    && /opt/liveness-proxy/bin/liveness-proxy --help > /dev/null

# ----------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="liveness-proxy" \
      org.opencontainers.image.description="Security-first proxy in front of the Cynopsis Liveness API"

# A fixed numeric UID/GID: Kubernetes can only verify runAsNonRoot against a numeric USER, and the
# manifests in deploy/kubernetes/ set the same ids.
RUN groupadd --system --gid 10001 liveness \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin liveness

COPY --from=build /opt/liveness-proxy /opt/liveness-proxy

# PYTHONDONTWRITEBYTECODE: the root filesystem is meant to be mounted read-only.
# LIVENESS_PROXY_*: listen on all interfaces inside the container; log JSON lines to stderr.
ENV PATH="/opt/liveness-proxy/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    LIVENESS_PROXY_HOST=0.0.0.0 \
    LIVENESS_PROXY_PORT=8080 \
    LIVENESS_PROXY_LOG_FORMAT=json

# Settings also read a `.env` file from the working directory. /app is empty and owned by root, so
# nothing running as the service user can plant one there; configuration comes from the
# environment and from secret files (*_FILE) only.
WORKDIR /app

USER 10001:10001

EXPOSE 8080

# The slim image has no curl. The opener ignores HTTP(S)_PROXY so the check never leaves the
# container; urlopen raises on any non-2xx answer, which exits non-zero.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8080/healthz', timeout=2)"]

# `serve` applies database migrations itself before it starts listening, and drains requests for
# up to 10 s on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["liveness-proxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
