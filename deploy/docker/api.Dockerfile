# syntax=docker/dockerfile:1
# gurutunnel-api: REST/WebSocket API for technicians, session state, audit, presence consumer.
# Build from the repository root (the context is the whole repository, see /.dockerignore):
#   docker build -f deploy/docker/api.Dockerfile -t gurutunnel/api:0.1.0 .
# Commands: `serve` (default; migrates first unless --no-migrate), `migrate`, `keygen`,
# `create-admin`. Health: GET /healthz (alive) and GET /readyz (database and NATS answer) on
# GT_API_PORT; Kubernetes uses them as probes (deploy/k8s).

# ---- build: wheels of the project's distributions and of their whole dependency closure
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY libs/protocol/ libs/protocol/
COPY services/api/ services/api/
RUN pip wheel --wheel-dir /wheels ./libs/protocol ./services/api
# The runtime environment is installed from those wheels alone (no index), then loses its own
# installers: nothing is installed at run time.
RUN python -m venv /opt/gurutunnel \
 && /opt/gurutunnel/bin/pip install --no-index --find-links /wheels gurutunnel-api \
 && /opt/gurutunnel/bin/pip uninstall --yes setuptools pip

# ---- runtime: the interpreter, the environment above and nothing to build with
FROM python:3.11.11-slim-bookworm
# /var/lib/gurutunnel belongs to the service user, so named volumes mounted there (keys, the demo
# agent's credential, an SQLite file) start out writable by it
RUN python -m pip uninstall --yes pip setuptools wheel \
 && groupadd --system --gid 10001 gurutunnel \
 && useradd --uid 10001 --gid gurutunnel --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gurutunnel \
 && mkdir -p /var/lib/gurutunnel/keys /var/lib/gurutunnel/agent \
 && chown -R 10001:10001 /var/lib/gurutunnel
COPY --from=build /opt/gurutunnel /opt/gurutunnel
ENV PATH=/opt/gurutunnel/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GT_API_HOST=0.0.0.0 \
    GT_API_PORT=8080
WORKDIR /var/lib/gurutunnel
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GT_API_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["gurutunnel-api"]
CMD ["serve"]
