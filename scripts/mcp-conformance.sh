#!/usr/bin/env bash
# MCP against a real muxi-rt: builds the server, serves a small offline
# formation from a temp dir, then runs (1) scripts/mcp_check.py, the official MCP
# Python SDK (`mcp`, pinned, in the venv .venv-mcp) in its handshake and its
# 2026-07-28 modes, and (2) the official MCP conformance suite
# (@modelcontextprotocol/conformance, pinned): the server scenarios that apply to
# a tools-only server. The suite cannot send headers, so it talks to a small
# key-adding proxy on loopback (scripts/mcp-key-proxy.mjs) in front of
# /api/{id}/v1/mcp; the endpoint itself never opens without a key.
#
# Node 22 (which the suite needs) is installed by npm as the `node` package into
# tools/node22, the suite into tools/conformance (both gitignored, reused).
# Prints one line per check and per scenario, `mcp-check: N passed, N failed` and
# `mcp-conformance: N passed, N failed`; exits non-zero on any failure.
# Environment: MCP_CHECK_VENV (default .venv-mcp); MCP_CONFORMANCE_SCENARIOS (space-separated,
# default the five below); MCP_CONFORMANCE_KEEP=1 keeps the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

MCP_SDK_VERSION="2.3.0"
VENV="${MCP_CHECK_VENV:-.venv-mcp}"
CONFORMANCE_VERSION="0.1.16"
NODE_VERSION="22"
SCENARIOS=(${MCP_CONFORMANCE_SCENARIOS:-server-initialize ping tools-list server-sse-multiple-streams dns-rebinding-protection})
FORMATION_ID="conformance"
CLIENT_KEY="fmc_conformance_client_key"

log() { printf 'mcp-conformance: %s\n' "$*" >&2; }

# --- Node 22 and the suite, pinned, installed locally (reused when present). --
NODE="$PWD/tools/node22/node_modules/.bin/node"
if ! "$NODE" --version 2>/dev/null | grep -q "^v$NODE_VERSION\."; then
    log "installing node@$NODE_VERSION into tools/node22"
    npm install --silent --no-audit --no-fund --prefix tools/node22 "node@$NODE_VERSION" >/dev/null
fi
SUITE="$PWD/tools/conformance/node_modules/@modelcontextprotocol/conformance"
if [ "$(cd "$SUITE" 2>/dev/null && "$NODE" -p 'require("./package.json").version' 2>/dev/null)" != "$CONFORMANCE_VERSION" ]; then
    log "installing @modelcontextprotocol/conformance@$CONFORMANCE_VERSION into tools/conformance"
    npm install --silent --no-audit --no-fund --prefix tools/conformance \
        "@modelcontextprotocol/conformance@$CONFORMANCE_VERSION" >/dev/null
fi

# --- The MCP Python SDK, pinned, in its own venv (reused when present). -------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "mcp==$MCP_SDK_VERSION"

# --- The server (the build is reused when up to date). -----------------------
log "building muxi-rt"
cargo build --locked --quiet --bin muxi-rt
BIN="$PWD/target/debug/muxi-rt"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/muxi-mcp-conformance.XXXXXX")"
SERVER_PID=""
PROXY_PID=""
stop() {
    local pid=$1
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}
cleanup() {
    local rc=$?
    stop "$PROXY_PID"
    stop "$SERVER_PID"
    if [ "$rc" -ne 0 ] && [ -f "$TMP/server.err" ]; then
        log "server log (last 30 lines of $TMP/server.err):"
        tail -n 30 "$TMP/server.err" >&2 || true
    fi
    if [ "${MCP_CONFORMANCE_KEEP:-0}" = 1 ]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

FDIR="$TMP/formations/$FORMATION_ID"
mkdir -p "$FDIR/agents" "$TMP/data"
cat >"$FDIR/formation.afs" <<EOF
# Written by scripts/mcp-conformance.sh.
schema: "1.0.0"
id: $FORMATION_ID
description: Offline formation for the MCP conformance suite
server:
  api_keys:
    client_key: "$CLIENT_KEY"
async:
  threshold_seconds: 10
agents:
  - id: worker
    description: Works in three steps; a message "gate NAME" then waits for the file gates/NAME
    estimated_seconds: 30
    command: ["python3", "agents/work.py"]
  - id: quick
    description: One short step
    estimated_seconds: 1
    command: ["python3", "agents/work.py"]
    env: { STEPS: "1" }
EOF
mkdir -p "$FDIR/gates"
cat >"$FDIR/agents/work.py" <<'EOF'
import json, os, sys, time
request = json.load(sys.stdin)
steps = int(os.environ.get("STEPS", "3"))
for i in range(1, steps + 1):
    time.sleep(0.1)
    print(json.dumps({"progress": int(100 * i / (steps + 1)), "step": f"Step {i} of {steps}",
                      "total_steps": steps, "completed_steps": i}), flush=True)
message = request.get("message", "")
if message.startswith("gate "):
    while not os.path.exists(os.path.join("gates", message[5:])):
        time.sleep(0.05)
print(json.dumps({"result": "worked: " + message}), flush=True)
EOF

# Prints the first line of FILE matching PREFIX (without it), waiting up to 30 s.
wait_line() {
    local file=$1 prefix=$2 pid=$3 line
    for _ in $(seq 1 150); do
        line="$(grep -m1 "^$prefix" "$file" 2>/dev/null || true)"
        if [ -n "$line" ]; then
            printf '%s\n' "${line#"$prefix"}"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}

"$BIN" serve "$TMP/formations" --listen 127.0.0.1:0 --data-dir "$TMP/data" \
    >"$TMP/server.out" 2>"$TMP/server.err" &
SERVER_PID=$!
URL="$(wait_line "$TMP/server.out" 'muxi-rt listening on ' "$SERVER_PID")" || {
    log "muxi-rt did not start"
    exit 1
}
"$NODE" scripts/mcp-key-proxy.mjs "$URL" "$CLIENT_KEY" >"$TMP/proxy.out" 2>"$TMP/proxy.err" &
PROXY_PID=$!
PORT="$(wait_line "$TMP/proxy.out" 'proxy listening on ' "$PROXY_PID")" || {
    log "the key-adding proxy did not start: $(cat "$TMP/proxy.err")"
    exit 1
}
# --- The MCP Python SDK, both protocols. ---------------------------------------
"$VENV/bin/python" scripts/mcp_check.py --server-url "$URL" --formation-id "$FORMATION_ID" \
    --client-key "$CLIENT_KEY" --gates "$FDIR/gates"

# --- The conformance suite, through the key-adding proxy. ----------------------
ENDPOINT="http://localhost:$PORT/api/$FORMATION_ID/v1/mcp"
log "muxi-rt at $URL, suite against $ENDPOINT"

passed=0
failed=0
for scenario in "${SCENARIOS[@]}"; do
    if "$NODE" "$SUITE/dist/index.js" server --url "$ENDPOINT" --scenario "$scenario" \
        --output-dir "$TMP/results" >"$TMP/$scenario.log" 2>&1; then
        echo "ok - $scenario"
        passed=$((passed + 1))
    else
        echo "FAIL - $scenario"
        sed 's/^/    /' "$TMP/$scenario.log" | tail -n 40
        failed=$((failed + 1))
    fi
done
echo "mcp-conformance: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
