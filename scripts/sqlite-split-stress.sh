#!/usr/bin/env bash
# Stresses the vendored SQLite's append split (vendor/README.md) beyond what
# tests/sqlite_splits.rs does in CI: builds vendor/libsqlite3-sys/sqlite3/sqlite3.c
# as a shared library, loads it into Python's sqlite3 module in place of the
# system's, and runs scripts/sqlite_split_stress.py for SEEDS seeds (default 3)
# at once. Run it after carrying the patch to a new SQLite. Needs gcc and
# python3; about a minute.
#
#   [SEEDS=N] scripts/sqlite-split-stress.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-3}"
WORK="$(mktemp -d -t muxi-sqlite-stress-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
gcc -O2 -shared -fPIC -DSQLITE_ENABLE_DBSTAT_VTAB -o "$WORK/libsqlite3.so.0" \
  vendor/libsqlite3-sys/sqlite3/sqlite3.c -lpthread -ldl -lm
version="$(LD_LIBRARY_PATH="$WORK" python3 -c 'import sqlite3; print(sqlite3.sqlite_version)')"
echo "sqlite-split-stress: SQLite $version from vendor/, $SEEDS seeds"
pids=()
for seed in $(seq 1 "$SEEDS"); do
  LD_LIBRARY_PATH="$WORK" python3 scripts/sqlite_split_stress.py "$seed" "$WORK" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" = 0 ] || echo "sqlite-split-stress: FAILED" >&2
exit "$status"
