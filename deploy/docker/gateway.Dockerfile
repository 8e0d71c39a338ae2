# syntax=docker/dockerfile:1
# gurutunnel-gateway: holds agent WebSockets and bridges them onto NATS. No database.
# Build from the repository root (the context is the whole repository, see /.dockerignore):
#   docker build -f deploy/docker/gateway.Dockerfile -t gurutunnel/gateway:0.1.0 .
# Health: GET /healthz (alive) and GET /readyz (NATS connected, not draining) on GT_GATEWAY_PORT;
# Kubernetes uses them as probes (deploy/k8s), the load balancer of the compose file /readyz.
# SIGTERM drains (readiness fails, agents are told to reconnect elsewhere) within
# GT_GATEWAY_DRAIN_TIMEOUT_S, then the process exits.

# ---- build: wheels of the project's distributions and of their whole dependency closure
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY libs/protocol/ libs/protocol/
COPY services/gateway/ services/gateway/
RUN pip wheel --wheel-dir /wheels ./libs/protocol ./services/gateway
# The runtime environment is installed from those wheels alone (no index), then loses its own
# installers: nothing is installed at run time.
RUN python -m venv /opt/gurutunnel \
 && /opt/gurutunnel/bin/pip install --no-index --find-links /wheels gurutunnel-gateway \
 && /opt/gurutunnel/bin/pip uninstall --yes setuptools pip

# ---- runtime: the interpreter, the environment above and nothing to build with
FROM python:3.11.11-slim-bookworm
RUN python -m pip uninstall --yes pip setuptools wheel \
 && groupadd --system --gid 10001 gurutunnel \
 && useradd --uid 10001 --gid gurutunnel --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gurutunnel
COPY --from=build /opt/gurutunnel /opt/gurutunnel
ENV PATH=/opt/gurutunnel/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GT_GATEWAY_HOST=0.0.0.0 \
    GT_GATEWAY_PORT=8081
USER 10001:10001
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GT_GATEWAY_PORT', '8081'), timeout=2)"]
ENTRYPOINT ["gurutunnel-gateway"]
