#!/bin/sh
# First start: a cluster whose superuser is `trading` (password from
# POSTGRES_PASSWORD), with the production database `trading` and the test
# database `trading_test`; password logins from the network. Later starts
# reuse the volume.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is empty}" > "$pw"
  initdb -D "$PGDATA" -U trading --pwfile="$pw" --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pw"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  createdb -U trading trading
  createdb -U trading trading_test
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "initialised: databases trading and trading_test"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
