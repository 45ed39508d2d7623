#!/usr/bin/env bash
# Proves the public MUXI Python SDK, unmodified and pinned, works against a real
# muxi-rt: builds the server, serves a small offline formation from a temp dir,
# and runs scripts/sdk_check.py (one `ok - NAME` / `FAIL - NAME: reason` line per
# check, then `sdk-check: N passed, N failed`). Exits non-zero on any failure.
#
# Environment: SDK_CHECK_VENV (default .venv-sdk); SDK_CHECK_KEEP=1 keeps the temp
# dir (formation, data, server logs) for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."

SDK_VERSION="1.20260713.0"
VENV="${SDK_CHECK_VENV:-.venv-sdk}"
FORMATION_ID="sdk-check"
# Fixed keys, declared in the formation below, so the check knows them.
ADMIN_KEY="fma_sdk_check_admin_key"
CLIENT_KEY="fmc_sdk_check_client_key"

log() { printf 'sdk-check: %s\n' "$*" >&2; }

# --- The SDK, pinned, in its own venv (reused when present). -----------------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "muxi==$SDK_VERSION"

# --- The server (the build is reused when up to date). -----------------------
log "building muxi-rt"
cargo build --locked --quiet --bin muxi-rt
BIN="$PWD/target/debug/muxi-rt"

# --- A temp formation with command agents written next to it. ----------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/muxi-sdk-check.XXXXXX")"
SERVER_PID=""
cleanup() {
    local rc=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ -f "$TMP/server.err" ]; then
        log "server log (last 40 lines of $TMP/server.err):"
        tail -n 40 "$TMP/server.err" >&2 || true
    fi
    if [ "${SDK_CHECK_KEEP:-0}" = 1 ]; then
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
# Written by scripts/sdk-check.sh: the formation the MUXI SDK check talks to.
schema: "1.0.0"
id: $FORMATION_ID
version: "1.0.0"
description: Offline formation for the MUXI Python SDK compatibility check

server:
  api_keys:
    admin_key: "$ADMIN_KEY"
    client_key: "$CLIENT_KEY"

async:
  mode: auto
  threshold_seconds: 7
  webhook_retries: 2
  webhook_timeout: 5

agents:
  - id: echo
    name: Echo
    description: Answers at once with the message echoed back
    default: true
    estimated_seconds: 0.5
    command: ["python3", "agents/echo.py"]

  - id: worker
    name: Worker
    description: Three short steps, streaming a part of its answer after each
    estimated_seconds: 2
    command: ["python3", "agents/steps.py"]
    env:
      STEPS: "3"
      STEP_SECONDS: "0.3"

  - id: slow
    name: Slow
    description: Sixty half-second steps; used to cancel a request mid-flight
    estimated_seconds: 30
    command: ["python3", "agents/steps.py"]
    env:
      STEPS: "60"
      STEP_SECONDS: "0.5"
EOF

cat >"$FDIR/agents/echo.py" <<'EOF'
"""Echo agent: one result line with the message echoed back."""
import json
import sys

request = json.load(sys.stdin)
print(json.dumps({"result": "echo: " + request.get("message", "")}), flush=True)
EOF

cat >"$FDIR/agents/steps.py" <<'EOF'
"""Step agent: STEPS steps of STEP_SECONDS each; after each step a progress line
and a content line (`part I. `); then the result `worked: <message>`."""
import json
import os
import sys
import time

request = json.load(sys.stdin)
steps = int(os.environ.get("STEPS", "3"))
pause = float(os.environ.get("STEP_SECONDS", "0.2"))


def emit(line):
    print(json.dumps(line), flush=True)


for i in range(1, steps + 1):
    time.sleep(pause)
    emit({"progress": int(100 * i / (steps + 1)), "step": f"Step {i} of {steps}",
          "total_steps": steps, "completed_steps": i})
    emit({"content": f"part {i}. "})
emit({"result": "worked: " + request.get("message", ""),
      "artifacts": [{"name": "notes.txt", "content": f"{steps} steps done"}]})
EOF

# --- Start the server and read its address. ----------------------------------
log "starting muxi-rt"
"$BIN" serve "$TMP/formations" --listen 127.0.0.1:0 --data-dir "$TMP/data" \
    --allow-webhook-host 127.0.0.1 >"$TMP/server.out" 2>"$TMP/server.err" &
SERVER_PID=$!

URL=""
for _ in $(seq 1 150); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "muxi-rt exited before listening"
        exit 1
    fi
    line="$(grep -m1 '^muxi-rt listening on http://' "$TMP/server.out" || true)"
    if [ -n "$line" ]; then
        URL="${line#muxi-rt listening on }"
        break
    fi
    sleep 0.2
done
if [ -z "$URL" ]; then
    log "muxi-rt printed no 'muxi-rt listening on http://ADDR' line within 30 s"
    exit 1
fi
log "muxi-rt at $URL"

# --- The check itself. ----------------------------------------------------------
CHECK_ARGS=(--server-url "$URL" --formation-id "$FORMATION_ID"
    --client-key "$CLIENT_KEY" --admin-key "$ADMIN_KEY" --expect-sdk-version "$SDK_VERSION")
MUXI_SDK_VERSION_NOTIFICATION=0 "$VENV/bin/python" scripts/sdk_check.py "${CHECK_ARGS[@]}"
