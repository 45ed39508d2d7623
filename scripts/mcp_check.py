"""The official MCP Python SDK (`mcp`, pinned by scripts/mcp-conformance.sh),
unmodified, against a real muxi-rt's /api/{id}/v1/mcp, in its handshake mode
(`legacy`: initialize, 2025-11-25) and its default `auto` mode, which probes
`server/discover` and so speaks the stateless 2026-07-28 protocol.

Prints `ok - NAME` or `FAIL - NAME: reason` per check, then
`mcp-check: N passed, N failed`; exits 1 on any failure.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

RESULTS = []


def check(name):
    def wrap(fn):
        async def run(*args):
            try:
                await fn(*args)
                RESULTS.append(True)
                print(f"ok - {name}", flush=True)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                RESULTS.append(False)
                reason = f"{type(e).__name__}: {e}"
                print(f"FAIL - {name}: {reason}", flush=True)
                if os.environ.get("MCP_CHECK_TRACE"):
                    traceback.print_exc()

        return run

    return wrap


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


class Target:
    def __init__(self, args):
        self.server_url = args.server_url.rstrip("/")
        self.formation = args.formation_id
        self.key = args.client_key
        self.gates = args.gates
        self.url = f"{self.server_url}/api/{self.formation}/v1/mcp"

    def client(self, mode, user="alice", key=None, bearer=False):
        key = key or self.key
        headers = {"X-Muxi-User-ID": user}
        if bearer:
            headers["Authorization"] = f"Bearer {key}"
        else:
            headers["X-Muxi-Client-Key"] = key
        http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120))
        return Client(streamable_http_client(self.url, http_client=http), mode=mode, raise_exceptions=True)

    def http_status(self, request_id, user="alice"):
        request = urllib.request.Request(
            f"{self.server_url}/api/{self.formation}/v1/requests/{request_id}",
            headers={"X-Muxi-Client-Key": self.key, "X-Muxi-User-ID": user},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def open_gate(self, name):
        with open(os.path.join(self.gates, name), "w") as f:
            f.write("open")


async def status(client, execution_id):
    return await client.call_tool("check_execution_status", {"execution_id": execution_id})


async def until_ended(client, execution_id, limit=60):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        result = await status(client, execution_id)
        if result.structured_content["status"] != "running":
            return result
        await asyncio.sleep(0.2)
    raise AssertionError(f"execution {execution_id} did not end within {limit}s")


def text_of(result):
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def run_mode(target, mode, expected_version):
    label = "handshake" if mode == "legacy" else f"{expected_version} ({mode})"

    @check(f"{label}: connects, negotiates {expected_version}, lists one tool per agent")
    async def tools():
        async with target.client(mode, bearer=(mode == "legacy")) as client:
            expect(client.protocol_version == expected_version, f"negotiated {client.protocol_version}")
            listed = await client.list_tools()
            names = [t.name for t in listed.tools]
            expect(names == ["worker", "quick", "check_execution_status", "cancel_execution", "list_executions"], names)
            expect(listed.tools[0].input_schema["required"] == ["message"], listed.tools[0].input_schema)

    @check(f"{label}: an agent tool answers with an execution id; running, then completed; same id over HTTP")
    async def round_trip():
        gate = f"py-{mode}"
        async with target.client(mode) as client:
            started = await client.call_tool("worker", {"message": f"gate {gate}"})
            facts = started.structured_content
            expect(facts["status"] == "running", facts)
            expect(facts["agent"] == "worker", facts)
            execution_id = facts["execution_id"]
            expect(execution_id in text_of(started), text_of(started))
            running = await status(client, execution_id)
            expect(running.structured_content["status"] == "running", running.structured_content)
            code, body = target.http_status(execution_id)
            expect(code == 200 and body["data"]["request_id"] == execution_id, (code, body))
            expect(body["data"]["status"] in ("pending", "processing"), body["data"])
            target.open_gate(gate)
            done = await until_ended(client, execution_id)
            expect(done.structured_content["status"] == "completed", done.structured_content)
            expect(done.structured_content["output"] == f"worked: gate {gate}", done.structured_content)
            expect(not done.is_error, done)
            code, body = target.http_status(execution_id)
            expect(body["data"]["status"] == "completed", body)
            # Another user cannot see it, over MCP or HTTP.
            async with target.client(mode, user="bob") as bob:
                seen = await status(bob, execution_id)
                expect(seen.is_error, seen)
                expect(seen.structured_content["error"]["code"] == "execution_not_found", seen.structured_content)
            expect(target.http_status(execution_id, user="bob")[0] == 404, "bob sees it over HTTP")

    @check(f"{label}: progress notifications arrive while a call waits")
    async def progress():
        seen = []

        async def on_progress(value, total, message):
            seen.append((value, total, message))

        async with target.client(mode) as client:
            result = await client.call_tool(
                "worker", {"message": "progress", "wait_seconds": 10}, progress_callback=on_progress
            )
            expect(result.structured_content["status"] == "completed", result.structured_content)
            expect(len(seen) >= 1, "no progress notification")
            expect(all(total == 100 for _, total, _ in seen), seen)
            expect(seen[0][2].startswith("Step 1"), seen)

    @check(f"{label}: a wrong key is refused")
    async def wrong_key():
        try:
            async with target.client(mode, key="not-the-key") as client:
                await client.list_tools()
        except BaseException:  # noqa: BLE001 - the SDK raises an exception group
            # The SDK hides the HTTP answer; this is what it got.
            request = urllib.request.Request(
                target.url,
                data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                headers={"X-Muxi-Client-Key": "not-the-key", "Content-Type": "application/json",
                         "Accept": "application/json, text/event-stream"},
            )
            try:
                urllib.request.urlopen(request, timeout=30)
            except urllib.error.HTTPError as e:
                body = json.load(e)
                expect(e.code == 403 and body["code"] == "invalid_api_key", (e.code, body))
                return
            raise AssertionError("the endpoint answered a wrong key")
        raise AssertionError("connected with a wrong key")

    await tools()
    await round_trip()
    await progress()
    await wrong_key()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-url", required=True)
    parser.add_argument("--formation-id", required=True)
    parser.add_argument("--client-key", required=True)
    parser.add_argument("--gates", required=True, help="the folder the gated agent watches")
    args = parser.parse_args()
    target = Target(args)
    await run_mode(target, "legacy", "2025-11-25")
    # `auto` probes server/discover and falls back to initialize on a legacy
    # server: negotiating 2026-07-28 proves the stateless discovery worked.
    await run_mode(target, "auto", "2026-07-28")
    passed = sum(RESULTS)
    failed = len(RESULTS) - passed
    print(f"mcp-check: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
