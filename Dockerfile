# syntax=docker/dockerfile:1
#
# One image for every sagaline role; the command picks the role:
#   sagaline orchestrator examples.order_saga.workflows:registry
#   sagaline participant examples.order_saga.services:payment
#   sagaline projector                        (visibility tables and the web UI)
#   sagaline topics create --partitions 12 --participants inventory,payment,shipping
# infra/docker-compose.yml and infra/k8s/ run it; docs/deploy.md explains both.
#
# The base is pinned by exact version tag. Tags can be re-pushed, so the release pipeline
# pins each FROM by digest too (python:3.11.11-slim-bookworm@sha256:...): digests cannot be
# looked up where this file was written, without a registry.
#
# Your own workflows and services: build FROM this image and COPY your package into /app
# (the working directory is importable, so `sagaline orchestrator shop.workflows:registry`
# finds /app/shop), or add your package to the builder's venv.

# --- builder: the sagaline wheel and its dependencies, in a venv the final stage copies --
FROM python:3.11.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/sagaline

WORKDIR /src
# README.md is the package's long description (pyproject.toml's readme): the build needs it.
COPY pyproject.toml README.md ./
COPY orchestrator/ orchestrator/
COPY participants/ participants/

# A wheel, not an editable install: the final stage holds the installed package only.
# --only-binary: neither stage has a compiler, and a dependency that would need one must
# fail the build here rather than be compiled somewhere else.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/sagaline/bin/pip install --only-binary=:all: /wheels/sagaline-*.whl

# --- final: the venv, the Avro schemas and the example code; no build tools, not root --
FROM python:3.11.11-slim-bookworm

# A numeric UID, so Kubernetes' runAsNonRoot can verify it without a passwd lookup; the
# passwd entry exists too, for libraries that ask who they run as.
RUN groupadd --system --gid 10001 sagaline \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin sagaline

COPY --from=builder /opt/sagaline /opt/sagaline

WORKDIR /app
# The codec reads the schemas from a directory at run time (SAGALINE_SCHEMA_DIR below):
# the wheel does not carry them.
COPY schemas/ /app/schemas/
# The order saga example, so the image runs the demo topology as it is.
COPY examples/ /app/examples/
# Compiled now: the root filesystem is read-only at run time (infra/k8s).
RUN python -m compileall -q /app/examples

# SAGALINE_METRICS_HOST / SAGALINE_UI_HOST: the defaults (127.0.0.1) would be unreachable
# from outside the container. PYTHONDONTWRITEBYTECODE: nothing is written to the image.
ENV PATH=/opt/sagaline/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SAGALINE_SCHEMA_DIR=/app/schemas/avro \
    SAGALINE_METRICS_HOST=0.0.0.0 \
    SAGALINE_UI_HOST=0.0.0.0

USER 10001:10001

# Metrics of the orchestrator, participant and projector; the projector's web UI.
EXPOSE 9400 9410 9420 9430

ENTRYPOINT ["sagaline"]
CMD ["--help"]
