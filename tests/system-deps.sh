#!/usr/bin/env bash
# The programs the tests drive besides Python. `make test`: Debian's headless Chromium (the dashboard
# tests), redis-server and the PostgreSQL server (real stores for the cluster profile; the tests start
# their own on free ports, no system service) and Go (builds the pinned helm for the chart's tests).
# `make e2e` (argument `e2e`) adds what a cluster built here needs: Debian's Docker Engine, debootstrap,
# jq, openssl, capsh, iptables and libseccomp (runc links it).
# As root on Debian or Ubuntu, what is missing is installed with one apt-get; elsewhere this stops at
# once with one message naming every missing piece and how to install it.
set -euo pipefail
missing=() packages=()
need() {  # need PACKAGE CHECK...: the package is missing unless the check succeeds
  local package=$1; shift
  "$@" >/dev/null 2>&1 || { missing+=("$package"); packages+=("$package"); }
}
need chromium eval 'command -v chromium || command -v chromium-browser'
need redis-server command -v redis-server
need postgresql eval "compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' || command -v pg_ctl"
command -v go >/dev/null || [[ -x /usr/local/go/bin/go ]] ||
  { echo "error: Go is missing (it builds helm and, for make e2e, the cluster): https://go.dev/dl" >&2; exit 1; }
if [[ ${1:-} == e2e ]]; then
  need docker.io test -x /usr/sbin/dockerd
  need debootstrap command -v debootstrap
  need jq command -v jq
  need openssl command -v openssl
  need libcap2-bin command -v capsh
  need iptables command -v iptables
  need libseccomp-dev test -e /usr/include/seccomp.h
fi
((${#missing[@]})) || exit 0
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing ${packages[*]} (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  exit 0
fi
echo "error: make ${1:-test} needs ${missing[*]}: install them with" >&2
echo "  Debian/Ubuntu: sudo apt-get install ${packages[*]}" >&2
echo "  macOS:         brew install --cask chromium; brew install redis postgresql@15 (make e2e needs Linux)" >&2
exit 1
