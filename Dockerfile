# The ghcr.io/pluto-dev/pluto image: one image for `pluto server`, `pluto operator` (reconciler
# and webhook) and the `pluto sidecar` that the webhook injects into training pods.
#
#   docker build -t ghcr.io/pluto-dev/pluto:0.1.0 .
#
# The Helm chart (charts/pluto) runs it as user 10001 with a read-only root filesystem.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A numeric, non-root user: Kubernetes can only check runAsNonRoot against a numeric USER.
RUN groupadd --system --gid 10001 pluto \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/pluto --create-home \
        --shell /usr/sbin/nologin pluto

WORKDIR /src
# Only what the distribution is built from (.dockerignore keeps the rest out), so that a
# change to tests or docs does not rebuild this layer.
COPY pyproject.toml README.md ./
COPY pluto ./pluto
COPY server ./server
COPY sidecar ./sidecar
COPY operator ./operator
# Every wheel the extras need is published for linux amd64 and arm64: no compiler needed.
RUN pip install '.[server,sidecar,operator]' \
    && rm -rf /src

USER 10001:10001
WORKDIR /home/pluto
# The server listens here; the operator's webhook on 9443 and health on 8081; the sidecar's
# health on 7301.
EXPOSE 7300 9443 8081 7301
ENTRYPOINT ["pluto"]
CMD ["--help"]
