# Helpers shared by the infra scripts. Sourced, never run: `source "$(dirname "$0")/lib.sh"`.
# shellcheck shell=bash

INFRA_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$INFRA_DIR")
# shellcheck source=versions.env
source "$INFRA_DIR/versions.env"

CLUSTER_NAME=driftloop
DRIFTLOOP=$REPO_ROOT/.venv/bin/driftloop
# The project image: [REGISTRY/]driftloop:<the version in pyproject.toml>-<content hash> (infra/deploy.sh)
IMAGE_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_ROOT/pyproject.toml" | head -n 1)
IMAGE_REPOSITORY=driftloop
[[ -z ${REGISTRY:-} ]] || IMAGE_REPOSITORY=${REGISTRY%/}/driftloop
PF_PIDS=()
PF_PORT=

# AIRGAP=1: nothing is pulled. kind, kubectl and helm are the ones infra/airgap/binaries.sh built, the
# Docker engine is the one infra/airgap/dockerd.sh runs, and every image is built on this machine.
AIRGAP=${AIRGAP:-0}
if [[ $AIRGAP == 1 ]]; then
  AIRGAP_CACHE=${DRIFTLOOP_AIRGAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftloop/airgap}
  export DOCKER_HOST=unix://$AIRGAP_CACHE/docker/docker.sock
  PATH="$AIRGAP_CACHE/bin/kind-$KIND_VERSION:$AIRGAP_CACHE/bin/kubernetes-$KUBECTL_VERSION:$PATH"
  # Debian's docker CLI, the engine's own version: its BuildKit needs no buildx plugin
  PATH="$AIRGAP_CACHE/docker/cli:$AIRGAP_CACHE/bin/helm-$HELM_VERSION:$PATH"
  KIND_NODE_IMAGE=driftloop-airgap/kind-node:$KUBECTL_VERSION
  export DOCKER_BUILDKIT=1
elif [[ -x $REPO_ROOT/.tools/bin/helm ]]; then
  # The helm that `make chart-tools` builds at the pinned version when it is there, else helm from
  # PATH (infra/preflight.sh checks its version either way).
  helm() { "$REPO_ROOT/.tools/bin/helm" "$@"; }
fi

step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# port_forward NAMESPACE TARGET REMOTE_PORT [LOCAL_PORT]
# Starts `kubectl port-forward` in the background and sets PF_PORT to the local port once it listens.
# Without LOCAL_PORT kubectl picks a free one (no race with another process taking it first).
# stop_port_forwards (set it as an EXIT trap) ends exactly the processes started here.
port_forward() {
  local namespace=$1 target=$2 remote=$3 local_port=${4:-} log pid _
  log=$(mktemp)
  kubectl port-forward -n "$namespace" "$target" "$local_port:$remote" --address 127.0.0.1 >"$log" 2>&1 &
  pid=$!
  PF_PIDS+=("$pid")
  for _ in $(seq 60); do
    PF_PORT=$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9][0-9]*\) .*/\1/p' "$log" | head -n 1)
    if [[ -n $PF_PORT ]]; then
      rm -f "$log"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  printf 'error: cannot port-forward %s in namespace %s:\n' "$target" "$namespace" >&2
  cat "$log" >&2
  rm -f "$log"
  return 1
}

stop_port_forwards() {
  local pid
  for pid in ${PF_PIDS[@]+"${PF_PIDS[@]}"}; do
    kill "$pid" 2>/dev/null || true
  done
}

# wait_http URL SECONDS: until URL answers 2xx (the venv's Python: no curl needed).
wait_http() {
  local url=$1 deadline=$((SECONDS + $2))
  until "$REPO_ROOT/.venv/bin/python" -c \
    'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}
