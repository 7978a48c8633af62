"""Checks what the webhook receiver got against the intake log: every accepted client message
arrived (at least once), every request's signature verified with the receiver's own HMAC code,
and each request's Idempotency-Key is its messageId.

    check_webhook.py log.jsonl received.jsonl
"""

import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    log_path, received_path = sys.argv[1:]
    accepted = {r["messageId"] for r in load(log_path)
                if r["status"] == "accepted" and r["source"] != "sluice"}
    received = load(received_path)
    problems = []
    for r in received:
        if not r["verified"]:
            problems.append(f"{r['messageId']}: signature did not verify")
        if r["idempotencyKey"] != r["messageId"]:
            problems.append(f"{r['messageId']}: Idempotency-Key {r['idempotencyKey']}")
    got = {r["messageId"] for r in received if r["verified"]}
    for missing in sorted(accepted - got):
        problems.append(f"{missing}: accepted but never delivered")
    for extra in sorted(got - accepted):
        problems.append(f"{extra}: delivered but not accepted from a client")
    if problems:
        print("webhook check failed:")
        for p in problems[:50]:
            print("  " + p)
        sys.exit(1)
    repeats = len(received) - len(got)
    print(f"webhook: {len(got)} messages delivered, every signature verified "
          f"({repeats} repeats, allowed by at-least-once)")


if __name__ == "__main__":
    main()
