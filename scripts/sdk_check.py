#!/usr/bin/env python3
"""The MUXI Python SDK (`pip install muxi`), used exactly as a user would, against
a running muxi-rt serving the formation written by scripts/sdk-check.sh.

Prints `ok - NAME` or `FAIL - NAME: reason` per check, keeps going after a
failure, ends with `sdk-check: N passed, N failed[, N skipped]` and exits 1 if any failed.

Formation agents it relies on: `echo` (default; result `echo: <message>`),
`worker` (3 quick steps, a `part I. ` content line after each, result
`worked: <message>`), `slow` (60 steps of 0.5 s; cancelled mid-flight).
The server must serve only this formation (for `FormationClient(url=...)`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sys
import threading
import time
import traceback
import uuid

import httpx
import muxi
from muxi import AsyncFormationClient, FormationClient
from muxi.errors import (
    AuthenticationError,
    AuthorizationError,
    ConflictError,
    MuxiError,
    NotFoundError,
)

POLL_SECONDS = 0.25
POLL_LIMIT_SECONDS = 30.0
TOKEN_TYPES = {"progress", "thinking", "planning", "content", "completed", "failed", "cancelled"}


class Skip(Exception):
    """A check could not run because an earlier one it depends on failed."""


class Checks:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.user = f"sdk-check-{uuid.uuid4().hex[:8]}"
        self.client = FormationClient(
            server_url=args.server_url,
            formation_id=args.formation_id,
            client_key=args.client_key,
            admin_key=args.admin_key,
        )
        self.passed = 0
        self.failed = 0
        # Filled in by checks, read by later ones.
        self.sync_request_id: str | None = None
        self.async_request_id: str | None = None
        self.stream_request_id: str | None = None
        self.stream_session_id = f"sess_{uuid.uuid4().hex[:12]}"

    # --- running ---------------------------------------------------------

    def run(self, name: str, fn) -> None:
        try:
            fn()
        except Skip as e:
            self.failed += 1
            print(f"FAIL - {name}: not run: {e}", flush=True)
        except AssertionError as e:
            self.failed += 1
            print(f"FAIL - {name}: {e}", flush=True)
        except MuxiError as e:
            self.failed += 1
            print(
                f"FAIL - {name}: SDK raised {type(e).__name__} (status {e.status_code}, "
                f"code {e.code!r}): {e.message}",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - report anything, keep going
            self.failed += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(
                f"FAIL - {name}: {type(e).__name__}: {e} "
                f"(at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})",
                flush=True,
            )
        else:
            self.passed += 1
            print(f"ok - {name}", flush=True)

    def need(self, value, what: str):
        if not value:
            raise Skip(f"needs {what}, which an earlier check did not get")
        return value

    def wait_for(self, request_id: str, done, what: str) -> dict:
        """Polls get_request_status until done(status_doc) or the time limit."""
        deadline = time.monotonic() + POLL_LIMIT_SECONDS
        seen = []
        while True:
            doc = self.client.get_request_status(request_id, self.user)
            assert isinstance(doc, dict), f"get_request_status returned {type(doc).__name__}, not a dict: {doc!r}"
            status = doc.get("status")
            if not seen or seen[-1] != status:
                seen.append(status)
            if done(doc):
                return doc
            assert time.monotonic() < deadline, (
                f"request {request_id} not {what} after {POLL_LIMIT_SECONDS:.0f} s; statuses seen: {seen}; last: {compact(doc)}"
            )
            time.sleep(POLL_SECONDS)

    # --- checks ------------------------------------------------------------

    def sdk_version(self):
        want = self.args.expect_sdk_version
        assert muxi.__version__ == want, f"muxi {muxi.__version__} installed, expected {want}"

    def health(self):
        doc = self.client.health()
        assert isinstance(doc, dict), f"health() returned {doc!r}"
        assert doc.get("status") == "healthy", f"status is {doc.get('status')!r}, expected 'healthy': {compact(doc)}"

    def get_status(self):
        doc = self.client.get_status()
        assert isinstance(doc, dict), f"get_status() returned {doc!r}"
        assert doc.get("formation_id") == self.args.formation_id, (
            f"formation_id is {doc.get('formation_id')!r}, expected {self.args.formation_id!r}: {compact(doc)}"
        )
        assert doc.get("status"), f"no status in {compact(doc)}"

    def get_async_config(self):
        doc = self.client.get_async_config()
        assert isinstance(doc, dict), f"get_async_config() returned {doc!r}"
        # As written in the formation by sdk-check.sh.
        expected = {"mode": "auto", "threshold_seconds": 7, "webhook_retries": 2, "webhook_timeout": 5}
        for key, want in expected.items():
            assert doc.get(key) == want, f"{key} is {doc.get(key)!r}, expected {want!r} as written: {compact(doc)}"

    def chat_sync(self):
        doc = self.client.chat({"message": "hello from the sdk"}, user_id=self.user)
        assert isinstance(doc, dict), f"chat() returned {doc!r}"
        message = doc.get("message")
        assert isinstance(message, dict), f"no `message` object in the answer: {compact(doc)}"
        assert message.get("content") == "echo: hello from the sdk", (
            f"message.content is {message.get('content')!r}, expected 'echo: hello from the sdk'"
        )
        assert message.get("role") == "assistant", f"message.role is {message.get('role')!r}"
        assert doc.get("request_id"), f"request_id is {doc.get('request_id')!r}, expected a real id: {compact(doc)}"
        assert doc.get("user_id") == self.user, f"user_id is {doc.get('user_id')!r}, expected {self.user!r}"
        self.sync_request_id = doc["request_id"]

    def chat_async(self):
        doc = self.client.chat(
            {"message": "background job", "agent_id": "worker", "async": True}, user_id=self.user
        )
        assert isinstance(doc, dict), f"chat() returned {doc!r}"
        assert doc.get("request_id"), f"no request_id in the async answer: {compact(doc)}"
        assert doc.get("status") == "processing", f"status is {doc.get('status')!r}, expected 'processing'"
        self.async_request_id = doc["request_id"]

    def get_request_status(self):
        rid = self.need(self.async_request_id, "the async request id")
        doc = self.wait_for(rid, lambda d: d.get("status") in ("completed", "failed", "cancelled"), "finished")
        assert doc.get("status") == "completed", f"ended {doc.get('status')!r}: {compact(doc)}"
        assert doc.get("request_id") == rid, f"request_id is {doc.get('request_id')!r}, expected {rid!r}"
        result = doc.get("result")
        text = result.get("text") if isinstance(result, dict) else result
        assert text == "worked: background job", f"result is {result!r}, expected text 'worked: background job'"
        assert doc.get("progress") is not None, f"no progress in {compact(doc)}"
        assert doc.get("completed_at"), f"no completed_at in {compact(doc)}"

    def get_requests(self):
        ids = {self.need(self.sync_request_id, "the sync request id"), self.need(self.async_request_id, "the async request id")}
        doc = self.client.get_requests(self.user)
        assert isinstance(doc, dict), f"get_requests() returned {doc!r}"
        requests = doc.get("requests")
        assert isinstance(requests, list), f"no `requests` list in {compact(doc)}"
        listed = {r.get("request_id") for r in requests if isinstance(r, dict)}
        missing = ids - listed
        assert not missing, f"{sorted(missing)} not listed; listed: {sorted(x for x in listed if x)}"
        assert doc.get("count") == len(requests), f"count {doc.get('count')!r} != {len(requests)} requests"
        other = self.client.get_requests(self.user + "-other")
        leaked = ids & {r.get("request_id") for r in other.get("requests", [])}
        assert not leaked, f"another user sees {sorted(leaked)}"

    def chat_stream(self):
        events = list(
            self.client.chat_stream(
                {"message": "stream me", "agent_id": "worker", "session_id": self.stream_session_id},
                user_id=self.user,
            )
        )
        assert events, "the stream yielded no events"
        tokens = []
        names = []
        for event in events:
            names.append(event.get("event"))
            if event.get("event") == "message":
                data = json.loads(event["data"])
                assert isinstance(data.get("token"), dict), f"a message frame without a token: {event['data']}"
                tokens.append(data["token"])
        kinds = [t.get("type") for t in tokens]
        unknown = [k for k in kinds if k not in TOKEN_TYPES]
        assert not unknown, f"unknown token types {unknown}; sequence {kinds}"
        assert names and names[-1] == "done", f"the last event is {names[-1]!r}, expected 'done'; events: {names}"
        assert kinds and kinds[0] == "progress", f"the first token is {kinds[:1]}, expected progress; sequence {kinds}"
        assert kinds[-1] == "completed", f"the last token is {kinds[-1]!r}, expected completed; sequence {kinds}"
        assert "content" in kinds, f"no content token; sequence {kinds}"
        first_content = kinds.index("content")
        assert all(k in ("progress", "content", "thinking", "planning") for k in kinds[:-1]), (
            f"a final token before the end; sequence {kinds}"
        )
        assert "progress" in kinds[:first_content], f"no progress before content; sequence {kinds}"
        streamed = "".join(t.get("content", "") for t in tokens if t.get("type") == "content")
        assert streamed == "part 1. part 2. part 3. ", f"streamed content is {streamed!r}"
        final = tokens[-1]
        assert final.get("content") == "worked: stream me", f"completed content is {final.get('content')!r}"
        rids = {t.get("request_id") for t in tokens}
        assert len(rids) == 1 and None not in rids and "" not in rids, f"request ids on tokens: {rids}"
        self.stream_request_id = rids.pop()
        assert all(t.get("session_id") == self.stream_session_id for t in tokens), (
            f"session ids on tokens: {sorted({str(t.get('session_id')) for t in tokens})}, expected {self.stream_session_id}"
        )

    def stream_request(self):
        rid = self.need(self.stream_request_id, "the streamed request id")
        events = list(self.client.stream_request(self.user, self.stream_session_id, rid))
        tokens = [json.loads(e["data"])["token"] for e in events if e.get("event") == "message"]
        kinds = [t.get("type") for t in tokens]
        assert kinds and kinds[-1] == "completed", f"token sequence {kinds}, expected to end with completed"
        assert tokens[-1].get("content") == "worked: stream me", f"completed content is {tokens[-1].get('content')!r}"
        assert events[-1].get("event") == "done", f"the last event is {events[-1].get('event')!r}, expected 'done'"

    def cancel_request(self):
        doc = self.client.chat(
            {"message": "long job", "agent_id": "slow", "async": True}, user_id=self.user
        )
        rid = doc.get("request_id")
        assert rid, f"no request_id for the long request: {compact(doc)}"
        self.wait_for(rid, lambda d: d.get("status") == "processing" and (d.get("progress") or 0) > 0, "running with progress")
        returned = self.client.cancel_request(rid, self.user)
        assert returned is None, f"cancel_request returned {returned!r}"  # the SDK drops the body
        status = self.client.get_request_status(rid, self.user)
        assert status.get("status") == "cancelled", f"status after cancel is {status.get('status')!r}: {compact(status)}"
        time.sleep(1.5)  # the agent would have made progress by now had it kept running
        later = self.client.get_request_status(rid, self.user)
        assert later.get("status") == "cancelled", f"status 1.5 s after cancel is {later.get('status')!r}"
        assert later.get("progress") == status.get("progress"), (
            f"progress moved after cancel: {status.get('progress')} -> {later.get('progress')}"
        )

    def error_wrong_key(self):
        bad = FormationClient(
            server_url=self.args.server_url,
            formation_id=self.args.formation_id,
            client_key="fmc_wrong_key",
            admin_key="fma_wrong_key",
        )
        try:
            bad.chat({"message": "hi"}, user_id=self.user)
        except (AuthenticationError, AuthorizationError) as e:
            assert e.status_code in (401, 403), f"status {e.status_code}"
            readable(e)
        else:
            raise AssertionError("chat with a wrong client key did not raise")
        try:
            bad.get_status()
        except (AuthenticationError, AuthorizationError) as e:
            readable(e)
        else:
            raise AssertionError("get_status with a wrong admin key did not raise")

    def error_not_found(self):
        missing = "req_" + uuid.uuid4().hex
        try:
            self.client.get_request_status(missing, self.user)
        except NotFoundError as e:
            assert e.status_code == 404, f"status {e.status_code}"
            readable(e)
            assert missing in e.message, f"message does not name the request: {e.message!r}"
        else:
            raise AssertionError(f"get_request_status({missing!r}) did not raise")

    # --- errors on streams: `event: error` frames the SDK raises ---------------

    def stream_errors(self, call, code: str, what: str):
        """An error on a stream must reach the caller: the SDK never looks at the
        HTTP status of a stream (formation.py:354-361, stream_sse) and raises only
        for an `event: error` frame (formation.py:154-155, built from the frame's
        `type`/`error` keys at formation.py:109-129)."""
        try:
            events = list(call())
        except MuxiError as e:
            assert e.code == code, f"raised {type(e).__name__} with code {e.code!r}, expected {code!r}: {e.message!r}"
            readable(e)
        else:
            raise AssertionError(f"{what}: the stream ended without raising; events: {events!r}")

    def stream_error_wrong_key(self):
        bad = FormationClient(
            server_url=self.args.server_url,
            formation_id=self.args.formation_id,
            client_key="fmc_wrong_key",
        )
        self.stream_errors(lambda: bad.chat_stream({"message": "hi"}, user_id=self.user), "invalid_api_key", "chat_stream with a wrong key")

    def stream_error_unknown_agent(self):
        self.stream_errors(
            lambda: self.client.chat_stream({"message": "hi", "agent_id": "no-such-agent"}, user_id=self.user),
            "unknown_agent",
            "chat_stream naming an unknown agent",
        )

    def stream_error_unknown_request(self):
        # The SDK's stream_request (unlike chat_stream) yields `event: error`
        # frames instead of raising them: the frame must carry the server's code.
        rid = "req_" + uuid.uuid4().hex
        try:
            events = list(self.client.stream_request(self.user, self.stream_session_id, rid))
        except MuxiError as e:
            assert e.code == "request_not_found", f"raised with code {e.code!r}"
            return
        errors = [e for e in events if e.get("event") == "error"]
        assert errors, f"no error frame for an unknown request; events: {events}"
        frame = json.loads(errors[0]["data"])
        assert frame["code"] == "request_not_found" and frame["message"], frame

    # --- sessions, agents, config, the event stream, the root mount -----------

    def get_sessions(self):
        sid = self.need(self.stream_request_id and self.stream_session_id, "the streamed session")
        doc = self.client.get_sessions(self.user)
        assert isinstance(doc, dict), f"get_sessions returned {doc!r}"
        sessions = doc.get("sessions")
        assert isinstance(sessions, list) and sessions, f"no `sessions` list in {compact(doc)}"
        mine = [x for x in sessions if x.get("session_id") == sid]
        assert mine, f"session {sid} not listed: {compact(doc)}"
        assert mine[0].get("message_count") == 2, f"message_count {mine[0].get('message_count')!r}, expected 2"
        assert mine[0].get("last_activity"), f"no last_activity in {compact(mine[0])}"
        stamps = [x.get("last_activity") for x in sessions]
        assert stamps == sorted(stamps, reverse=True), f"not newest first: {stamps}"
        limited = self.client.get_sessions(self.user, limit=1)
        assert len(limited.get("sessions", [])) == 1, f"limit=1 gave {compact(limited)}"
        other = self.client.get_sessions(self.user + "-other")
        assert not any(x.get("session_id") == sid for x in other.get("sessions", [])), "another user sees the session"

    def get_session(self):
        sid = self.need(self.stream_request_id and self.stream_session_id, "the streamed session")
        doc = self.client.get_session(sid, self.user)
        assert doc.get("session_id") == sid, f"session_id is {doc.get('session_id')!r}: {compact(doc)}"
        try:
            self.client.get_session(sid, self.user + "-other")
        except NotFoundError as e:
            readable(e)
        else:
            raise AssertionError("another user read the session")

    def get_session_messages(self):
        sid = self.need(self.stream_request_id and self.stream_session_id, "the streamed session")
        doc = self.client.get_session_messages(sid, self.user)
        messages = doc.get("messages")
        assert isinstance(messages, list), f"no `messages` list in {compact(doc)}"
        seen = [(m.get("role"), m.get("content"), m.get("request_id")) for m in messages]
        want = [("user", "stream me", self.stream_request_id), ("assistant", "worked: stream me", self.stream_request_id)]
        assert seen == want, f"messages {seen}, expected {want}"

    def restore_session(self):
        sid = f"sess_{uuid.uuid4().hex[:12]}"
        given = [{"role": "user", "content": "from before"}, {"role": "assistant", "content": "remembered"}]
        returned = self.client.restore_session(sid, self.user, given)
        assert returned is None, f"restore_session returned {returned!r}"  # the SDK drops the body
        doc = self.client.get_session_messages(sid, self.user)
        seen = [{"role": m.get("role"), "content": m.get("content")} for m in doc.get("messages", [])]
        assert seen == given, f"restored messages read back as {seen}"
        listed = {x.get("session_id") for x in self.client.get_sessions(self.user).get("sessions", [])}
        assert sid in listed, f"restored session {sid} not listed"

    def get_agents(self):
        doc = self.client.get_agents()
        agents = doc.get("agents")
        assert isinstance(agents, list), f"no `agents` list in {compact(doc)}"
        ids = [a.get("id") for a in agents]
        assert ids == ["echo", "worker", "slow"], f"agents {ids}"

    def get_agent(self):
        doc = self.client.get_agent("worker")
        assert doc.get("id") == "worker" and doc.get("name") == "Worker", f"get_agent('worker') gave {compact(doc)}"
        try:
            self.client.get_agent("no-such-agent")
        except NotFoundError as e:
            readable(e)
        else:
            raise AssertionError("get_agent of an unknown agent did not raise")

    def get_config(self):
        doc = self.client.get_config()
        assert doc.get("id") == self.args.formation_id, f"id is {doc.get('id')!r}: {compact(doc)}"
        assert doc.get("async", {}).get("threshold_seconds") == 7, f"async as written: {compact(doc.get('async'))}"
        retry = doc.get("overlord", {}).get("workflow", {}).get("retry", {})
        assert retry.get("max_attempts") == 3, f"default retry not filled in: {compact(retry)}"
        text = json.dumps(doc)
        for secret in (self.args.client_key, self.args.admin_key):
            assert secret not in text, "a key is shown by get_config"

    def stream_events(self):
        """A request started by another client (at the root URL) reaches the
        user's event stream, accepted then completed; a reconnect with
        Last-Event-ID (which the SDK cannot send: plain httpx) replays the end."""
        got: queue.Queue = queue.Queue()

        def listen():
            try:
                for event in self.client.stream_events(self.user):
                    got.put(event)
            except Exception as e:  # noqa: BLE001 - reported through the queue
                got.put(e)

        threading.Thread(target=listen, daemon=True).start()
        # The stream subscribes when the thread first reads it: quick pings until
        # one shows up prove it is live before the watched request starts.
        for _ in range(20):
            ping = self.client.chat({"message": "ping"}, user_id=self.user).get("request_id")
            try:
                event = got.get(timeout=1.0)
            except queue.Empty:
                continue
            if isinstance(event, Exception):
                raise event
            if ping in (event.get("data") or ""):
                break
        else:
            raise AssertionError("the event stream showed none of 20 requests")
        elsewhere = FormationClient(url=self.args.server_url, client_key=self.args.client_key)
        started = elsewhere.chat({"message": "watched", "agent_id": "worker", "async": True}, user_id=self.user)
        rid = started.get("request_id")
        assert rid, f"no request id: {compact(started)}"
        seen = []
        deadline = time.monotonic() + POLL_LIMIT_SECONDS
        accepted_id = None
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no completion of {rid} on the stream; events: {seen}"
            try:
                event = got.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(event, Exception):
                raise event
            data = json.loads(event.get("data") or "{}")
            if data.get("request_id") != rid:
                continue
            seen.append(event.get("event"))
            if event.get("event") == "request.accepted":
                accepted_id = data.get("event_id")
            if event.get("event") == "request.completed":
                assert data.get("result", {}).get("text") == "worked: watched", f"completed with {compact(data)}"
                break
        assert seen[0] == "request.accepted", f"events of {rid}: {seen}"
        assert accepted_id, f"the accepted event had no event_id: {seen}"
        headers = {"X-Muxi-Client-Key": self.args.client_key, "X-Muxi-User-ID": self.user,
                   "Last-Event-ID": accepted_id, "Accept": "text/event-stream"}
        url = f"{self.args.server_url}/api/{self.args.formation_id}/v1/events"
        replayed = None
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(10.0)) as r:
            assert r.status_code == 200, f"reconnect answered {r.status_code}"
            kind = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind:
                    data = json.loads(line[5:])
                    if data.get("request_id") == rid:
                        replayed = kind
                        break
        assert replayed == "request.completed", f"after Last-Event-ID the first event of {rid} is {replayed!r}"

    def root_url(self):
        root = FormationClient(url=self.args.server_url, client_key=self.args.client_key, admin_key=self.args.admin_key)
        doc = root.health()
        assert doc.get("status") == "healthy", f"health at the root: {compact(doc)}"
        status = root.get_status()
        assert status.get("formation_id") == self.args.formation_id, f"get_status at the root: {compact(status)}"
        rid = self.need(self.sync_request_id, "the sync request id")
        assert root.get_request_status(rid, self.user).get("request_id") == rid

    def async_client(self):
        async def go():
            async with AsyncFormationClient(
                server_url=self.args.server_url,
                formation_id=self.args.formation_id,
                client_key=self.args.client_key,
                admin_key=self.args.admin_key,
            ) as client:
                answer = await client.chat({"message": "async sdk", "session_id": f"sess_{uuid.uuid4().hex[:8]}"},
                                           user_id=self.user)
                assert answer.get("message", {}).get("content") == "echo: async sdk", f"chat: {compact(answer)}"
                sid = answer.get("session_id")
                sessions = await client.get_sessions(self.user)
                assert sid in {x.get("session_id") for x in sessions.get("sessions", [])}, f"{sid} not listed"
                messages = await client.get_session_messages(sid, self.user)
                assert [m.get("role") for m in messages.get("messages", [])] == ["user", "assistant"]
                await client.restore_session(f"sess_{uuid.uuid4().hex[:8]}", self.user, [{"role": "user", "content": "x"}])
                agent = await client.get_agent("echo")
                assert agent.get("id") == "echo", compact(agent)
                config = await client.get_config()
                assert config.get("id") == self.args.formation_id, compact(config)
                status = await client.get_request_status(answer["request_id"], self.user)
                assert status.get("status") == "completed", compact(status)
                # The async event stream shows a request of this user once it is live.
                events = await client.stream_events(self.user)
                seen: asyncio.Queue = asyncio.Queue()

                async def collect():
                    async for event in events:
                        await seen.put(event.get("data") or "")

                reader = asyncio.create_task(collect())
                try:
                    for _ in range(20):
                        ping = (await client.chat({"message": "async ping"}, user_id=self.user))["request_id"]
                        try:
                            while True:
                                data = await asyncio.wait_for(seen.get(), timeout=1.0)
                                if ping in data:
                                    return
                        except asyncio.TimeoutError:
                            continue
                    raise AssertionError("the async event stream showed none of 20 requests")
                finally:
                    reader.cancel()

        asyncio.run(go())

    def error_conflict(self):
        rid = self.need(self.sync_request_id, "the completed sync request id")
        try:
            self.client.cancel_request(rid, self.user)
        except ConflictError as e:
            assert e.status_code == 409, f"status {e.status_code}"
            readable(e)
        else:
            raise AssertionError(f"cancelling the completed request {rid} did not raise")


def readable(e: MuxiError) -> None:
    """The SDK shows the server's own code and message, not a bare HTTP phrase."""
    assert isinstance(e.code, str) and e.code and e.code not in ("ERROR",), (
        f"{type(e).__name__}.code is {e.code!r}: the server's top-level `code` did not reach the SDK"
    )
    phrases = {"Unauthorized", "Forbidden", "Not Found", "Conflict", ""}
    assert isinstance(e.message, str) and e.message not in phrases, (
        f"{type(e).__name__}.message is {e.message!r}: the server's top-level `message` did not reach the SDK"
    )


def compact(doc) -> str:
    text = json.dumps(doc, default=str)
    return text if len(text) <= 400 else text[:400] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-url", required=True)
    parser.add_argument("--formation-id", required=True)
    parser.add_argument("--client-key", required=True)
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--expect-sdk-version", default="1.20260713.0")
    args = parser.parse_args()

    c = Checks(args)
    print(f"sdk-check: muxi {muxi.__version__} against {args.server_url} (formation {args.formation_id}, user {c.user})", flush=True)
    c.run("sdk version", c.sdk_version)
    c.run("health", c.health)
    c.run("get_status", c.get_status)
    c.run("get_async_config", c.get_async_config)
    c.run("chat (sync)", c.chat_sync)
    c.run("chat (async: true)", c.chat_async)
    c.run("get_request_status (poll to completed)", c.get_request_status)
    c.run("get_requests", c.get_requests)
    c.run("chat_stream", c.chat_stream)
    c.run("stream_request", c.stream_request)
    c.run("cancel_request (long-running)", c.cancel_request)
    c.run("error: wrong key -> AuthenticationError/AuthorizationError", c.error_wrong_key)
    c.run("error: unknown request id -> NotFoundError", c.error_not_found)
    c.run("error: cancel a finished request -> ConflictError (409)", c.error_conflict)
    # Errors on streams arrive as `event: error` frames, which the SDK raises.
    stream_errors = [
        ("error: chat_stream with a wrong key raises", c.stream_error_wrong_key),
        ("error: chat_stream with an unknown agent raises", c.stream_error_unknown_agent),
        ("error: stream_request of an unknown request raises", c.stream_error_unknown_request),
    ]
    for name, fn in stream_errors:
        c.run(name, fn)
    c.run("get_sessions", c.get_sessions)
    c.run("get_session", c.get_session)
    c.run("get_session_messages", c.get_session_messages)
    c.run("restore_session", c.restore_session)
    c.run("get_agents", c.get_agents)
    c.run("get_agent", c.get_agent)
    c.run("get_config (secrets redacted)", c.get_config)
    c.run("stream_events (+ Last-Event-ID resume)", c.stream_events)
    c.run("FormationClient(url=...) at the root", c.root_url)
    c.run("AsyncFormationClient", c.async_client)
    print(f"sdk-check: {c.passed} passed, {c.failed} failed", flush=True)
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
