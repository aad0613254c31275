#!/usr/bin/env bash
# The machine's PostgreSQL for the tests and benchmarks (the PostgreSQL transport): start its
# cluster on port 5432 when it is down, and wait until it answers. Nothing to do when it runs.
set -euo pipefail

if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  exit 0
fi
if ! command -v pg_lsclusters >/dev/null; then
  echo "postgres-up: no PostgreSQL answers on 127.0.0.1:5432 and pg_lsclusters is missing;" \
    "install PostgreSQL (Debian: postgresql) or set B24QT_POSTGRES_URL" >&2
  exit 1
fi
read -r version name < <(pg_lsclusters --no-header | awk '$3 == 5432 {print $1, $2; exit}')
echo "postgres-up: starting PostgreSQL $version/$name"
pg_ctlcluster "$version" "$name" start
for _ in $(seq 1 100); do
  pg_isready -h 127.0.0.1 -p 5432 -q && exit 0
  sleep 0.2
done
echo "postgres-up: PostgreSQL did not answer on 127.0.0.1:5432" >&2
exit 1
