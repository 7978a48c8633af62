"""Checks the intake log (as `sluice log dump` printed it) against what the clients say they sent:
every message arrived exactly once, from the right source, with its fields intact."""

import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    log_path, *sent_specs = sys.argv[1:]
    records = load(log_path)
    accepted = [r for r in records if r["status"] == "accepted"]
    rejected = [r for r in records if r["status"] != "accepted"]
    problems = []
    if rejected:
        problems.append(f"{len(rejected)} messages were rejected, e.g. {rejected[0]}")
    by_id = {}
    for r in accepted:
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
                found = [r for r in accepted if r["source"] == source
                         and all(r["message"].get(k) == v for k, v in m.items())]
            name = m.get("messageId") or json.dumps(m)
            if len(found) != 1:
                problems.append(f"{name}: found {len(found)} times")
                continue
            record = found[0]
            stored = record["message"]
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
    if len(accepted) != expected_total:
        problems.append(f"the log holds {len(accepted)} accepted messages, the clients sent {expected_total}")
    if problems:
        print(f"interop: {len(problems)} problems", file=sys.stderr)
        for p in problems[:20]:
            print("  " + p, file=sys.stderr)
        sys.exit(1)
    print(f"interop: all {expected_total} messages arrived exactly once, intact")


if __name__ == "__main__":
    main()
