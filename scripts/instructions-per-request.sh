#!/usr/bin/env bash
# Counts the CPU instructions one async accept costs a server, with valgrind's
# callgrind: the same count for the same build, where CPU time on a shared
# machine moves by 20% from one round to the next. For telling changes of 1-3%
# apart; the bench (`cargo bench --bench engine`) stays the judge of speed.
#
#   [CONNECTIONS=C] [KIND=accept|poll] scripts/instructions-per-request.sh [SERVER] [N]
#
# SERVER is a muxi-rt binary (default target/release/muxi-rt) or `floor`, the
# bench's durable floor (axum + one SQLite append, built by `cargo bench --bench
# engine --no-run`). N accepts (default 2000) are counted after 400 uncounted,
# from C keep-alive connections (default 8; the bench uses 64, where the
# writer's batches are larger). KIND=poll counts status polls instead, cycling
# over 2,400 queued requests accepted first; KIND=poll-ended the same over
# 2,400 requests that have ended (their agent answers at once). Prints instructions per request, in all and per
# thread (the busiest first); KEEP=DIR keeps callgrind's files. Kernel work is not counted. Needs valgrind and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER="${1:-target/release/muxi-rt}"
N="${2:-2000}"
CONNECTIONS="${CONNECTIONS:-8}"
KIND="${KIND:-accept}"
AGENT="sleep 600"
[ "$KIND" = poll-ended ] && AGENT="echo done"
KEY="client-count-0123456789"
WORK="$(mktemp -d -t muxi-count-XXXXXX)"
trap 'kill "$PID" 2>/dev/null || true; pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT

mkdir -p "$WORK/formations/count" "$WORK/data"
cat > "$WORK/formations/count/formation.afs" <<EOF
schema: "1.0.0"
id: count
description: instruction count of an async accept
version: "1.0.0"
server:
  api_keys: {admin_key: admin-count-0123456789, client_key: $KEY}
async: {mode: async}
agents:
  - id: sleeper
    estimated_seconds: 600
    command: ["sh", "-c", "$AGENT", "$WORK"]
EOF

if [ "$SERVER" = floor ]; then
  BENCH="$(ls -t target/release/deps/engine-* | grep -v '\.d$' | head -1)"
  export MUXI_BENCH_BASELINE=floor MUXI_BENCH_FLOOR_DATA="$WORK/data"
  set -- "$BENCH"
else
  set -- "$SERVER" serve "$WORK/formations" --listen 127.0.0.1:0 --data-dir "$WORK/data"
fi
MUXI_LOG=warn valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes \
  --callgrind-out-file="$WORK/callgrind.%p" "$@" > "$WORK/server.log" 2>&1 &
PID=$!
for _ in $(seq 1 120); do
  ADDR="$(grep -o 'http://127.0.0.1:[0-9]*' "$WORK/server.log" | head -1 || true)"
  [ -n "$ADDR" ] && break
  sleep 0.5
done
[ -n "$ADDR" ] || { cat "$WORK/server.log"; echo "the server did not start" >&2; exit 1; }

# load KIND N: N accepts (KIND=accept, whose ids are kept in $WORK/ids) or N
# status polls cycling over the kept ids (KIND=poll), from $CONNECTIONS clients.
load() {
  python3 - "$ADDR" "$2" "$KEY" "$CONNECTIONS" "$1" "$WORK/ids" <<'PY'
import http.client, json, sys, threading, time, urllib.parse
addr, n, key, c = urllib.parse.urlsplit(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
kind, ids_file = sys.argv[5], sys.argv[6]
body = '{"message": "summarise the benchmark please", "async": true}'
headers = {"content-type": "application/json", "x-muxi-client-key": key, "x-muxi-user-id": "count-user"}
ids = (open(ids_file).read().split() or ["req_floor"]) if kind.startswith("poll") else []  # the floor keeps no ids
accepted = []
def client(k):
    conn = http.client.HTTPConnection(addr.hostname, addr.port)
    for i in range(n // c):
        if kind.startswith("poll"):
            conn.request("GET", f"/api/count/v1/requests/{ids[(i * c + k) % len(ids)]}", headers=headers)
        else:
            conn.request("POST", "/api/count/v1/chat", body, headers)
        answer = conn.getresponse()
        text = answer.read()
        assert answer.status < 300, answer.status
        if kind == "poll-ended":  # wait for the request to end: it is polled again
            while b'"status":"completed"' not in text:
                time.sleep(0.05)
                conn.request("GET", f"/api/count/v1/requests/{ids[(i * c + k) % len(ids)]}", headers=headers)
                text = conn.getresponse().read()
        if kind == "accept" and b'"request_id"' in text:  # the floor answers with a rowid
            accepted.append(json.loads(text)["data"]["request_id"])
threads = [threading.Thread(target=client, args=(k,)) for k in range(c)]
[t.start() for t in threads]
[t.join() for t in threads]
if kind == "accept":
    open(ids_file, "a").write("\n".join(accepted) + "\n")
PY
}

load accept 400
case "$KIND" in
  poll) load accept 2000; load poll 400 ;;
  poll-ended) load accept 2000; load poll-ended 2400 ;;  # every one, until it has ended
esac
callgrind_control -i on "$PID" > /dev/null 2>&1
load "$KIND" "$N"
callgrind_control -d "$PID" > /dev/null 2>&1
# KEEP=DIR keeps the counts for callgrind_annotate.
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$WORK"/callgrind.*.1-* "$KEEP"/; fi
python3 - "$WORK" "$N" <<'PY'
import glob, re, sys
work, n = sys.argv[1], int(sys.argv[2])
threads = []
for path in glob.glob(f"{work}/callgrind.*.1-*"):  # part 1: the dump above
    totals = re.search(r"^totals: (\d+)", open(path).read(), re.M)
    if totals and int(totals.group(1)) > 0:
        threads.append((int(totals.group(1)), path.rsplit("-", 1)[1]))
threads.sort(reverse=True)
print(f"instructions per request: {sum(t for t, _ in threads) / n:,.0f} ({n} requests)")
for total, thread in threads[:4]:
    print(f"  thread {thread}: {total / n:,.0f}")
PY
