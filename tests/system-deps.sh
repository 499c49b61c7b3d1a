#!/usr/bin/env bash
# The programs `make test` drives besides Python: Debian's headless Chromium (the dashboard tests),
# redis-server and the PostgreSQL server (real stores for the cluster profile; the tests start their
# own on free ports, no system service), and Go (builds the pinned helm for the chart's tests).
# As root on Debian or Ubuntu, what is missing is installed with one apt-get; elsewhere this stops at
# once with one message naming every missing piece and how to install it.
set -euo pipefail
missing=() packages=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { missing+=(chromium); packages+=(chromium); }
command -v redis-server >/dev/null 2>&1 || { missing+=(redis-server); packages+=(redis-server); }
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || command -v pg_ctl >/dev/null 2>&1 ||
  { missing+=("PostgreSQL server"); packages+=(postgresql); }
((${#missing[@]})) || exit 0
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing ${packages[*]} (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  exit 0
fi
echo "error: make test needs ${missing[*]}: install them with" >&2
echo "  Debian/Ubuntu: sudo apt-get install ${packages[*]}" >&2
echo "  macOS:         brew install --cask chromium; brew install redis postgresql@15" >&2
exit 1
