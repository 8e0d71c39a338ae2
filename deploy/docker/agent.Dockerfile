# syntax=docker/dockerfile:1
# gurutunnel-agent: normally installed on the managed machine itself (pip install ./libs/protocol
# ./agent); this image runs the demo agent of the compose file and agents of test fleets.
# Build from the repository root (the context is the whole repository, see /.dockerignore):
#   docker build -f deploy/docker/agent.Dockerfile -t gurutunnel/agent:0.1.0 .
# Health: the agent listens on no port, so there is no HTTP check; it reconnects forever on its
# own and exits only on SIGTERM/SIGINT (0), bad configuration (1) or a refused credential (2),
# which a restart policy sees. Run it with an init process (`docker run --init`, compose
# `init: true`): it starts commands and shells whose orphans must be reaped.

# ---- build: wheels of the project's distributions and of their whole dependency closure
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY libs/protocol/ libs/protocol/
COPY agent/ agent/
RUN pip wheel --wheel-dir /wheels ./libs/protocol ./agent
# The runtime environment is installed from those wheels alone (no index), then loses its own
# installers: nothing is installed at run time.
RUN python -m venv /opt/gurutunnel \
 && /opt/gurutunnel/bin/pip install --no-index --find-links /wheels gurutunnel-agent \
 && /opt/gurutunnel/bin/pip uninstall --yes setuptools pip

# ---- runtime: the interpreter, the environment above and nothing to build with
FROM python:3.11.11-slim-bookworm
# The agent's user has a home directory: it is the default working directory and the default
# allowlist for commands and file transfers (GT_AGENT_CWD_ALLOWLIST, GT_AGENT_FILE_ALLOWLIST).
RUN python -m pip uninstall --yes pip setuptools wheel \
 && groupadd --system --gid 10001 gurutunnel \
 && useradd --uid 10001 --gid gurutunnel --create-home --home-dir /home/gurutunnel \
      --shell /bin/sh gurutunnel \
 && mkdir -p /var/lib/gurutunnel/agent \
 && chown -R 10001:10001 /var/lib/gurutunnel
COPY --from=build /opt/gurutunnel /opt/gurutunnel
ENV PATH=/opt/gurutunnel/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home/gurutunnel
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["gurutunnel-agent"]
