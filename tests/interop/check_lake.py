"""Reads the lake that Sluice wrote to the S3-compatible server with three engines — pyarrow
straight from S3, DuckDB over a downloaded copy, and `sluice query` — and checks that every message
the clients sent is there exactly once, with the right values: in `events` (with `violations` when
the plan flagged it) or, when the plan blocked it, in `quarantine` with the schema's errors."""

import argparse
import json
import os
import sys

import boto3
import duckdb
import pyarrow.dataset as ds
import pyarrow.fs as pafs

COLUMNS = ["message_id", "type", "event", "name", "user_id", "anonymous_id", "group_id",
           "previous_id", "source", "properties", "traits"]
# Field names in what the clients sent -> lake columns.
FIELDS = {"messageId": "message_id", "type": "type", "event": "event", "name": "name",
          "userId": "user_id", "anonymousId": "anonymous_id", "groupId": "group_id",
          "previousId": "previous_id"}


def load_sent(specs):
    """Every message sent, with `expect` (accepted, flagged, blocked)."""
    sent = []
    for spec in specs:
        source, path = spec.split("=", 1)
        with open(path) as f:
            for line in f:
                if line.strip():
                    m = json.loads(line)
                    m["source"] = source
                    sent.append(m)
    return sent


def check(engine, rows, sent):
    problems = []
    by_id = {}
    for r in rows:
        by_id.setdefault(r["message_id"], []).append(r)
    for m in sent:
        if "messageId" in m:
            found = by_id.get(m["messageId"], [])
            name = m["messageId"]
        else:
            found = [r for r in rows if r["source"] == m["source"] and all(
                r.get(FIELDS[k]) == v for k, v in m.items() if k in FIELDS)]
            name = json.dumps(m)
        if len(found) != 1:
            problems.append(f"{engine}: {name} found {len(found)} times")
            continue
        r = found[0]
        if r["source"] != m["source"]:
            problems.append(f"{engine}: {name} source {r['source']}")
        for key, column in FIELDS.items():
            if key in m and r.get(column) != m[key]:
                problems.append(f"{engine}: {name} {column} is {r.get(column)!r}, sent {m[key]!r}")
        for key in ("properties", "traits"):
            if key in m and json.loads(r[key] or "null") != m[key]:
                problems.append(f"{engine}: {name} {key} is {r[key]}, sent {m[key]}")
    if len(rows) != len(sent):
        problems.append(f"{engine}: {len(rows)} rows in events, {len(sent)} messages sent")
    return problems


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--mirror", required=True)
    p.add_argument("--sluice-json", required=True, help="`sluice query --format json` output")
    p.add_argument("sent", nargs="+")
    args = p.parse_args()
    everything = load_sent(args.sent)
    sent = [m for m in everything if m.get("expect", "accepted") != "blocked"]
    blocked = [m for m in everything if m.get("expect") == "blocked"]
    flagged = {m["messageId"] for m in everything if m.get("expect") == "flagged"}

    s3 = pafs.S3FileSystem(endpoint_override=args.endpoint, access_key="interop", secret_key="interop",
                           region="us-east-1", scheme="http")
    table = ds.dataset(f"{args.bucket}/{args.prefix}/events", filesystem=s3, format="parquet",
                       partitioning="hive").to_table(columns=COLUMNS)
    arrow_rows = table.to_pylist()

    client = boto3.client("s3", endpoint_url=args.endpoint, aws_access_key_id="interop",
                          aws_secret_access_key="interop", region_name="us-east-1")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=args.prefix):
        for obj in page.get("Contents", []):
            local = os.path.join(args.mirror, obj["Key"])
            os.makedirs(os.path.dirname(local), exist_ok=True)
            client.download_file(args.bucket, obj["Key"], local)
    events_glob = os.path.join(args.mirror, args.prefix, "events", "*", "*.parquet")
    con = duckdb.connect()
    cur = con.execute(f"SELECT {', '.join(COLUMNS)}, date FROM read_parquet('{events_glob}', hive_partitioning = true)")
    names = [d[0] for d in cur.description]
    duck_rows = [dict(zip(names, row)) for row in cur.fetchall()]
    dates = {str(r["date"]) for r in duck_rows}

    with open(args.sluice_json) as f:
        sluice_rows = [json.loads(line) for line in f if line.strip()]

    problems = check("pyarrow", arrow_rows, sent) + check("duckdb", duck_rows, sent) + check("sluice query", sluice_rows, sent)

    # The plan's verdicts, read with DuckDB: flagged rows carry their violations; blocked ones are
    # in the quarantine with the schema's errors.
    cur = con.execute(f"SELECT message_id, violations FROM read_parquet('{events_glob}', hive_partitioning = true)")
    for message_id, violations in cur.fetchall():
        if (message_id in flagged) != (violations is not None):
            problems.append(f"duckdb: {message_id} violations {violations!r}")
    quarantine_glob = os.path.join(args.mirror, args.prefix, "quarantine", "*", "*.parquet")
    cur = con.execute(f"SELECT message_id, reason FROM read_parquet('{quarantine_glob}', hive_partitioning = true)")
    quarantined = {message_id: reason for message_id, reason in cur.fetchall()}
    for m in blocked:
        reason = quarantined.get(m["messageId"])
        if not reason or not reason.startswith("schema: Order Completed v1:") or "/revenue" not in reason:
            problems.append(f"duckdb: {m['messageId']} not quarantined with its error: {reason!r}")
    if len(quarantined) != len(blocked):
        problems.append(f"duckdb: {len(quarantined)} rows in quarantine, {len(blocked)} blocked")
    if not dates:
        problems.append("duckdb: no date partition column")
    if problems:
        print(f"lake: {len(problems)} problems", file=sys.stderr)
        for line in problems[:20]:
            print("  " + line, file=sys.stderr)
        sys.exit(1)
    print(f"lake: all {len(sent)} stored messages are in the S3 lake exactly once ({len(flagged)} flagged), and the "
          f"{len(blocked)} blocked ones in its quarantine, read by pyarrow, DuckDB and sluice query (dates {sorted(dates)})")


if __name__ == "__main__":
    main()
