"""Checks the intake log (as `sluice log dump` printed it) against what the clients say they sent:
every message arrived exactly once, from the right source, with its fields intact, and the tracking
plan did what each message expects: stored it, stored it with its violations flagged, or blocked it
into the quarantine."""

import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    log_path, *sent_specs = sys.argv[1:]
    # Clock records are the profile stage's own readings of the time, not messages.
    records = [r for r in load(log_path) if r["status"] != "clock"]

    problems = []
    by_id = {}
    for r in records:
        by_id.setdefault(r["messageId"], []).append(r)
    expected_total = 0
    for spec in sent_specs:
        source, path = spec.split("=", 1)
        sent = load(path)
        expected_total += len(sent)
        for m in sent:
            if "messageId" in m:
                found = by_id.get(m["messageId"], [])
            else:
                # The client made the id up: find the message by its fields.
                found = [r for r in records if r["source"] == source
                         and all(r["message"].get(k) == v for k, v in m.items())]
            name = m.get("messageId") or json.dumps(m)
            if len(found) != 1:
                problems.append(f"{name}: found {len(found)} times")
                continue
            record = found[0]
            stored = record["message"]
            expect = m.pop("expect", "accepted")
            violations = (stored.get("context") or {}).get("violations")
            if expect == "blocked":
                if record["status"] != "rejected" or not record.get("reason", "").startswith("schema:"):
                    problems.append(f"{name}: expected blocked by the plan, got {record['status']} {record.get('reason')}")
            elif record["status"] != "accepted":
                problems.append(f"{name}: {record['status']}: {record.get('reason')}")
            elif (expect == "flagged") != bool(violations):
                problems.append(f"{name}: expected {expect}, violations {violations}")
            if record["source"] != source:
                problems.append(f"{name}: source {record['source']}, expected {source}")
            for key, value in m.items():
                if stored.get(key) != value:
                    problems.append(f"{name}: {key} is {stored.get(key)!r}, sent {value!r}")
            for key in ("receivedAt", "timestamp"):
                if key not in stored:
                    problems.append(f"{name}: no {key}")
            if "writeKey" in stored:
                problems.append(f"{name}: the write key was stored")
    if len(records) != expected_total:
        problems.append(f"the log holds {len(records)} messages, the clients sent {expected_total}")
    if problems:
        print(f"interop: {len(problems)} problems", file=sys.stderr)
        for p in problems[:20]:
            print("  " + p, file=sys.stderr)
        sys.exit(1)
    counts = {}
    for r in records:
        key = "blocked" if r["status"] == "rejected" else ("flagged" if (r["message"].get("context") or {}).get("violations") else "stored")
        counts[key] = counts.get(key, 0) + 1
    print(f"interop: all {expected_total} messages arrived exactly once, intact; plan: {counts}")


if __name__ == "__main__":
    main()
