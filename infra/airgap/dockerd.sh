#!/usr/bin/env bash
# Starts the air-gapped builds' own Docker engine (Debian's docker.io) unless it already runs, and
# prints the DOCKER_HOST to use. Its data root is in the cache, so built images outlive a clone.
# It creates no default bridge and touches no iptables rules of the host: builds use the host's
# network, kind makes its own network. Its default runtime is runc-nosysres (see that file).
#
# Usage: infra/airgap/dockerd.sh [stop]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

root=$AIRGAP_CACHE/docker
sock=$root/docker.sock
export DOCKER_HOST=unix://$sock

if [[ ${1:-} == stop ]]; then
  [[ -f $root/dockerd.pid ]] && kill "$(cat "$root/dockerd.pid")" 2>/dev/null || true
  exit 0
fi
[[ -x /usr/sbin/dockerd && -x /usr/bin/docker ]] ||
  die "no /usr/sbin/dockerd: install Debian's Docker Engine (apt-get install docker.io)"
mkdir -p "$root/cli"
ln -sf /usr/bin/docker "$root/cli/docker"  # the CLI of the same release, first on PATH (infra/lib.sh)
if ! /usr/bin/docker version >/dev/null 2>&1; then
  mkdir -p "$root/data" "$root/exec"
  install -m 0755 "$AIRGAP_DIR/runc-nosysres" "$root/runc-nosysres"
  # --default-address-pool: away from common private ranges a host may already route
  nohup /usr/sbin/dockerd --host "$DOCKER_HOST" --data-root "$root/data" --exec-root "$root/exec" \
    --pidfile "$root/dockerd.pid" --bridge none --iptables=false --ip-masq=false --ip-forward=false \
    --default-address-pool base=10.213.0.0/16,size=24 \
    --add-runtime "runc-nosysres=$root/runc-nosysres" --default-runtime runc-nosysres \
    >"$root/dockerd.log" 2>&1 &
  for _ in $(seq 60); do /usr/bin/docker version >/dev/null 2>&1 && break; sleep 1; done
  /usr/bin/docker version >/dev/null 2>&1 || { tail -n 20 "$root/dockerd.log" >&2; die "dockerd did not start"; }
fi
printf '%s\n' "$DOCKER_HOST"
