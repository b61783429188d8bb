# syntax=docker/dockerfile:1
# outboxkit: `outbox relay` and `outbox consume` in a slim, non-root image (see docs/deployment.md).
#
#   docker build -t outboxkit .
#   docker run --rm --env-file outbox.env -p 9464:9464 outboxkit relay --http 0.0.0.0:9464
#
# Secrets (database URL with its password, RabbitMQ URL, SASL passwords) come from the environment
# at run time (--env-file, a Kubernetes Secret): never from a build argument or a layer.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- stage 1: build the wheel of outboxkit and of every dependency it needs
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox ./outbox
COPY consumers ./consumers
COPY alembic ./alembic
# the database drivers and the metrics endpoint; add your consumers' own dependencies in a child image
ARG EXTRAS=postgresql,mysql,metrics
RUN pip wheel --wheel-dir /wheels ".[${EXTRAS}]"

# ---- stage 2: the runtime, without compilers, caches or the source tree
FROM ${PYTHON_IMAGE}
ARG EXTRAS=postgresql,mysql,metrics
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid outbox --no-create-home --home-dir /app --shell /usr/sbin/nologin outbox
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels "outboxkit[${EXTRAS}]" && rm -rf /wheels
WORKDIR /app
USER 10001:10001
# the --http endpoint (/metrics, /healthz, /readyz) when it is asked for; off by default
EXPOSE 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["outbox"]
CMD ["--help"]
