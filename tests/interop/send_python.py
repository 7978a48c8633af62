"""Sends messages of every type with the official Segment Python client (segment-analytics-python)
and writes what it sent, one JSON object per line, for check.py."""

import argparse
import datetime
import json
import sys

from segment.analytics import Client


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--write-key", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=300)
    args = p.parse_args()

    errors = []
    # One client posts gzip bodies, the other plain JSON.
    clients = [
        Client(args.write_key, host=args.host, gzip=gz, max_retries=3, upload_size=50,
               on_error=lambda e, batch: errors.append(repr(e)))
        for gz in (True, False)
    ]
    sent = []
    when = datetime.datetime(2026, 5, 4, 3, 2, 1, 123000, tzinfo=datetime.timezone.utc)
    for i in range(args.count):
        client = clients[i % 2]
        mid = f"py-{i}"
        user = f"py-user-{i % 17}"
        kind = ["track", "identify", "page", "screen", "group", "alias"][i % 6]
        props = {"order_id": f"o-{i}", "revenue": i * 1.5, "count": i, "paid": i % 2 == 0,
                 "note": "naïve café ☕", "tags": ["a", "b"], "nested": {"depth": {"x": i}}, "nothing": None}
        if kind == "track":
            client.track(user_id=user, event="Order Completed", properties=props, message_id=mid, timestamp=when)
            # The interop plan allows revenue up to 300 and this source blocks violations.
            sent.append({"messageId": mid, "type": kind, "userId": user, "event": "Order Completed", "properties": props,
                         "originalTimestamp": "2026-05-04T03:02:01.123Z",
                         "expect": "blocked" if props["revenue"] > 300 else "accepted"})
        elif kind == "identify":
            traits = {"email": f"{user}@example.com", "plan": "pro"}
            client.identify(user_id=user, traits=traits, message_id=mid)
            sent.append({"messageId": mid, "type": kind, "userId": user, "traits": traits})
        elif kind == "page":
            client.page(anonymous_id=f"anon-{i}", name="Pricing", properties={"path": "/pricing"}, message_id=mid)
            sent.append({"messageId": mid, "type": kind, "anonymousId": f"anon-{i}", "name": "Pricing"})
        elif kind == "screen":
            client.screen(user_id=user, name="Home", message_id=mid)
            sent.append({"messageId": mid, "type": kind, "userId": user, "name": "Home"})
        elif kind == "group":
            client.group(user_id=user, group_id=f"g-{i % 3}", traits={"name": "Acme"}, message_id=mid)
            sent.append({"messageId": mid, "type": kind, "userId": user, "groupId": f"g-{i % 3}"})
        else:
            client.alias(previous_id=f"anon-{i}", user_id=user, message_id=mid)
            sent.append({"messageId": mid, "type": kind, "userId": user, "previousId": f"anon-{i}"})
    for c in clients:
        c.flush()
        c.join()
    if errors:
        print("python client errors:", errors[:5], file=sys.stderr)
        sys.exit(1)
    with open(args.out, "w") as f:
        for m in sent:
            f.write(json.dumps(m) + "\n")
    print(f"python: sent {len(sent)} messages")


if __name__ == "__main__":
    main()
