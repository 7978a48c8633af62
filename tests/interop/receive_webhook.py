"""A webhook receiver built on Python's standard library, as a customer would write one: it
recomputes the HMAC-SHA256 signature of every request with its own code (hmac, hashlib), refuses
stale timestamps, and appends what it got to a JSON-lines file:
{"messageId", "idempotencyKey", "verified", "type", "event"}. Answers 200 to good requests, 401
to badly signed ones.

    receive_webhook.py --port PORT --secret SECRET --out received.jsonl
"""

import argparse
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    lock = threading.Lock()
    out = open(args.out, "a", buffering=1)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            timestamp = self.headers.get("X-Sluice-Timestamp", "")
            signature = self.headers.get("X-Sluice-Signature", "")
            expected = "sha256=" + hmac.new(
                args.secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
            ).hexdigest()
            fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
            verified = fresh and hmac.compare_digest(expected, signature)
            message = json.loads(body)
            with lock:
                out.write(json.dumps({
                    "messageId": message.get("messageId"),
                    "idempotencyKey": self.headers.get("Idempotency-Key"),
                    "verified": verified,
                    "type": message.get("type"),
                    "event": message.get("event"),
                }) + "\n")
            answer = b"{}" if verified else b'{"error":"bad signature"}'
            self.send_response(200 if verified else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_):
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
