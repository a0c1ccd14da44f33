#!/usr/bin/env bash
# End-to-end run on a throwaway kind cluster, for machines with Docker (not the CI machines of
# this project, which have no Docker engine).
#
#   tests/e2e/kind.sh            # create the cluster, build and load the image, run, delete
#   KEEP=1 tests/e2e/kind.sh     # keep the cluster afterwards
#
# Needs: docker, kind, and `make venv` done. The operator and the server run on this machine;
# the cluster reaches them through the Docker bridge gateway.
set -euo pipefail
cd "$(dirname "$0")/../.."

cluster=pluto-e2e
image=ghcr.io/pluto-dev/pluto:e2e
kubeconfig=$(mktemp)

cleanup() {
    if [ -z "${KEEP:-}" ]; then kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; fi
    rm -f "$kubeconfig"
}
trap cleanup EXIT

kind create cluster --name "$cluster" --kubeconfig "$kubeconfig" --wait 120s
docker build -t "$image" .
kind load docker-image "$image" --name "$cluster"

# The address the kind nodes use to reach this machine: the gateway of the `kind` network.
host=$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' \
    | tr ' ' '\n' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$' | head -1)

PLUTO_E2E_KUBECONFIG="$kubeconfig" PLUTO_E2E_HOST="$host" PLUTO_E2E_IMAGE="$image" \
    .venv/bin/pytest -q tests/e2e
