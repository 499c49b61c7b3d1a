#!/usr/bin/env bash
# The official image's start: initialise an empty PGDATA (superuser POSTGRES_USER with
# POSTGRES_PASSWORD, database POSTGRES_DB, then /docker-entrypoint-initdb.d/*.sql and *.sh in name order,
# a .sh sourced or, when executable, run), then run postgres.
set -euo pipefail
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [[ ! -s $PGDATA/PG_VERSION ]]; then
  mkdir -p "$PGDATA" && chmod 0700 "$PGDATA"
  initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") --auth-local=trust \
    --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /var/run/postgresql" -w start >/dev/null
  [[ $db == postgres ]] || psql -v ON_ERROR_STOP=1 -h /var/run/postgresql -U "$user" -d postgres \
    -c "CREATE DATABASE \"$db\"" >/dev/null
  export POSTGRES_USER=$user POSTGRES_DB=$db PGHOST=/var/run/postgresql
  for f in /docker-entrypoint-initdb.d/*; do
    case $f in
      *.sql) echo "running $f"; psql -v ON_ERROR_STOP=1 -U "$user" -d "$db" -f "$f" >/dev/null ;;
      *.sh) if [[ -x $f ]]; then echo "running $f"; "$f"; else echo "sourcing $f"; . "$f"; fi ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "database initialised"
fi
[[ $1 == postgres ]] && set -- "$@" -c listen_addresses='*' -k /var/run/postgresql
exec "$@"
