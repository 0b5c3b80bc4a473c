#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL server on loopback:
#   scripts/with_postgres.sh COMMAND...
# The server gets a fresh data dir (initdb, trust auth, as the `postgres`
# user when run as root: initdb refuses root), listens on a free port, and
# is stopped and removed when COMMAND ends. COMMAND sees
# GRAD_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:PORT, in which the
# tests create one database per grad they start.
set -euo pipefail

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
for tool in initdb pg_ctl; do
  if ! command -v "$tool" >/dev/null && [ ! -x "$bindir/$tool" ]; then
    echo "with_postgres: $tool is missing (apt-get install postgresql)" >&2
    exit 1
  fi
done
PATH="$bindir:$PATH"

dir=$(mktemp -d /tmp/grad-pg.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "PATH='$PATH' $*"
  else
    sh -c "$*"
  fi
}
if [ "$(id -u)" = 0 ]; then
  chown postgres "$dir"
fi
cleanup() {
  as_postgres "pg_ctl -D '$dir/data' -m immediate -w stop" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
as_postgres "initdb -D '$dir/data' -A trust -U postgres" >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
as_postgres "pg_ctl -D '$dir/data' -l '$dir/server.log' -w \
  -o \"-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=500 -c fsync=off\" start" \
  >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
export GRAD_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port"
echo "with_postgres: PostgreSQL on 127.0.0.1:$port" >&2
"$@"
