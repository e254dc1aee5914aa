# syntax=docker/dockerfile:1
# eventhub: one image for every role.
#   docker build -t eventhub .
#   docker run --rm -p 8080:8080 -e EVENTHUB_DATABASE_URL=... eventhub            # all roles
#   docker run --rm eventhub run --role dispatch                                   # one role
#   docker run --rm eventhub migrate                                               # one-shot
#   docker run --rm eventhub apply -f /config/examples
# Settings are EVENTHUB_* environment variables (see eventhub/settings.py).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: install the project and its dependencies into a virtualenv -------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/eventhub \
    && /opt/eventhub/bin/pip install --upgrade pip
WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md and the packages (plus config/).
COPY . .
RUN /opt/eventhub/bin/pip install .

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/eventhub/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EVENTHUB_HOST=0.0.0.0 \
    EVENTHUB_PORT=8080 \
    EVENTHUB_LOG_FORMAT=json
RUN groupadd --system --gid 10001 eventhub \
    && useradd --system --uid 10001 --gid eventhub --home-dir /home/eventhub --create-home \
       --shell /usr/sbin/nologin eventhub
COPY --from=build /opt/eventhub /opt/eventhub
# Example resources, so `apply -f /config/examples` works without a mount.
COPY config /config
WORKDIR /home/eventhub
USER 10001:10001

EXPOSE 8080
# Only the api role serves HTTP: the dispatch and ingest roles (and the one-shot commands) should
# run with the health check disabled (`--no-healthcheck`, or `healthcheck: disable: true` in
# compose). slim has no curl, so Python asks /healthz (an error exits 1: unhealthy).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EVENTHUB_PORT', '8080') + '/healthz', timeout=4)"]

ENTRYPOINT ["eventhub"]
CMD ["run"]
