#!/usr/bin/env python3
"""Checks muxi-rt's webhook delivery with the MUXI Python SDK (`pip install muxi`).

Starts a receiver on 127.0.0.1:<free port>, sends an async chat through the SDK's
FormationClient with `webhook_url` pointing at it, waits for the delivery, and checks
it with `muxi.webhook.verify_signature(raw_body, X-Muxi-Signature, secret)` and
`muxi.webhook.parse`. When the secret has the `whsec_<base64>` form it also checks
the Standard Webhooks signature.

The server must accept loopback targets: start it with `--allow-webhook-host 127.0.0.1`
(or MUXI_ALLOW_WEBHOOK_HOSTS=127.0.0.1). `--secret` is what signs: the formation's
`async.webhook_secret`, else its admin key. The formation's default agent must answer
the message with a result.

    python scripts/webhook_check.py --server-url http://127.0.0.1:7890 \
        --formation-id demo --client-key <client key> --secret <secret>

Prints `webhook check: N passed, M failed`; exits 1 on any failure.
"""

import argparse
import base64
import hashlib
import hmac
import http.server
import json
import queue
import sys
import threading
import time

from muxi import FormationClient, webhook


class Receiver:
    """A webhook receiver recording (path, headers, raw body) and answering 200."""

    def __init__(self):
        self.calls = queue.Queue()
        calls = self.calls

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                calls.put((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, timeout):
        return self.calls.get(timeout=timeout)

    def close(self):
        self.server.shutdown()


def standard_signature_ok(headers, body, secret):
    key = base64.b64decode(secret[len("whsec_"):])
    signed = ("%s.%s." % (headers["webhook-id"], headers["webhook-timestamp"])).encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return expected in headers.get("webhook-signature", "").split(" ")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server-url", required=True, help="muxi-rt base URL, e.g. http://127.0.0.1:7890")
    ap.add_argument("--formation-id", required=True)
    ap.add_argument("--client-key", required=True)
    ap.add_argument("--secret", required=True, help="async.webhook_secret, else the formation's admin key")
    ap.add_argument("--message", default="webhook check", help="chat message for the default agent")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the delivery")
    args = ap.parse_args()

    results = []

    def check(name, ok, detail=""):
        results.append(ok)
        print("%s %s%s" % ("ok  " if ok else "FAIL", name, (": " + detail) if detail and not ok else ""))
        return ok

    rx = Receiver()
    try:
        client = FormationClient(
            server_url=args.server_url, formation_id=args.formation_id, client_key=args.client_key
        )
        hook_url = rx.url + "/muxi-callback"
        answer = client.chat(
            {"message": args.message, "async": True, "webhook_url": hook_url}, user_id="webhook-check"
        )
        request_id = answer.get("request_id")
        if not check("async chat answered with a request id", bool(request_id), repr(answer)):
            return finish(results)

        try:
            path, headers, body = rx.wait(args.timeout)
        except queue.Empty:
            check("webhook delivered", False, "nothing within %.0f s" % args.timeout)
            return finish(results)
        check("webhook delivered to the given path", path == "/muxi-callback", path)

        header = headers.get("x-muxi-signature")
        check("X-Muxi-Signature present", bool(header))
        check("muxi.webhook.verify_signature accepts the raw body",
              webhook.verify_signature(body, header, args.secret) is True)
        check("a wrong secret is rejected", webhook.verify_signature(body, header, args.secret + "x") is False)
        check("a modified body is rejected", webhook.verify_signature(body + b" ", header, args.secret) is False)

        event = webhook.parse(body)
        check("parse: request id", event.request_id == request_id, "%r != %r" % (event.request_id, request_id))
        check("parse: completed", event.status == "completed", "%s %r" % (event.status, event.error))
        texts = [c.text for c in event.content if c.type == "text"]
        check("parse: response text", bool(texts and texts[0]), repr(event.raw.get("response")))
        check("parse: formation and user", event.formation_id == args.formation_id
              and event.user_id == "webhook-check", "%r %r" % (event.formation_id, event.user_id))
        check("parse: processing_mode async", event.processing_mode == "async", event.processing_mode)
        check("parse: timestamp in ms", abs(event.timestamp / 1000 - time.time()) < 300, str(event.timestamp))
        raw = json.loads(body)
        check("docs keys: request_id and result.text", raw.get("request_id") == request_id
              and (raw.get("result") or {}).get("text") == (texts[0] if texts else None), repr(raw))
        check("webhook-id and webhook-timestamp present",
              bool(headers.get("webhook-id")) and bool(headers.get("webhook-timestamp")))
        if args.secret.startswith("whsec_"):
            check("Standard Webhooks signature", standard_signature_ok(headers, body, args.secret),
                  headers.get("webhook-signature", "(missing)"))

        status = client.get_request_status(request_id, "webhook-check")
        deadline = time.time() + 10
        while (status.get("webhook") or {}).get("status") == "pending" and time.time() < deadline:
            time.sleep(0.2)
            status = client.get_request_status(request_id, "webhook-check")
        check("request status shows the webhook delivered",
              (status.get("webhook") or {}).get("status") == "delivered", repr(status.get("webhook")))
    except Exception as e:  # an SDK error is a failed check, with its message
        check("no error", False, "%s: %s" % (type(e).__name__, e))
    finally:
        rx.close()
    return finish(results)


def finish(results):
    passed = sum(1 for r in results if r)
    failed = len(results) - passed
    print("webhook check: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
