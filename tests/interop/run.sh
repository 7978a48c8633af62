#!/usr/bin/env bash
# The interop suite: the official Segment clients (segment-analytics-python from PyPI,
# @segment/analytics-node from npm, and @segment/analytics-next in headless Chromium on a page of
# another origin) send real traffic to the sluice binary over loopback, and `sluice log dump` shows
# that every message arrived exactly once, intact. A tracking plan (tests/interop/schemas) blocks
# the Python client's violations and flags the Node client's. A webhook destination delivers
# every accepted message to a receiver written with Python's standard library, which verifies each
# signature with its own HMAC code. The lake goes to an S3-compatible
# server (moto, from PyPI) and is read back with pyarrow, DuckDB and `sluice query`.
#
#   tests/interop/run.sh [path/to/sluice]
#
# The binary defaults to the debug build that `cargo test` made. The script installs the clients
# itself (into $SLUICE_INTEROP_CACHE, default ~/.cache/sluice-interop, and tests/interop/node_modules).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-${SLUICE_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/sluice}}"
if [ ! -x "$bin" ]; then
  echo "interop: no sluice binary at $bin (run cargo test first, or pass its path)" >&2
  exit 1
fi
cache="${SLUICE_INTEROP_CACHE:-$HOME/.cache/sluice-interop}"
mkdir -p "$cache"

echo "interop: installing clients"
if [ ! -x "$cache/venv/bin/python" ]; then
  python3 -m venv "$cache/venv"
fi
"$cache/venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
(cd "$here" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
py="$cache/venv/bin/python"

# Chromium for the analytics.js check, from Debian's packages.
chromium="${CHROMIUM:-$(command -v chromium || true)}"
if [ -z "$chromium" ]; then
  echo "interop: installing chromium"
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; then
    chromium="$(command -v chromium)"
  else
    echo "interop: SKIPPING the browser check: chromium could not be installed (apt-get needs root)" >&2
  fi
fi

work="$(mktemp -d)"
server_pid=""
moto_pid=""
hook_pid=""
cleanup() {
  if [ -n "$hook_pid" ]; then kill "$hook_pid" 2>/dev/null || true; fi
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -9 "$server_pid" || true; fi
  if [ -n "$moto_pid" ]; then kill "$moto_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The S3-compatible server for the lake.
s3_port="$(free_port)"
"$cache/venv/bin/moto_server" -H 127.0.0.1 -p "$s3_port" > "$work/moto.log" 2>&1 &
moto_pid=$!
export AWS_ACCESS_KEY_ID=interop AWS_SECRET_ACCESS_KEY=interop AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" AWS_ALLOW_HTTP=true
for _ in $(seq 1 100); do
  if "$py" -c "import boto3; boto3.client('s3').create_bucket(Bucket='sluice-interop')" 2>/dev/null; then break; fi
  sleep 0.2
done

# A webhook destination: a receiver written with Python's standard library checks every signature.
hook_port="$(free_port)"
"$py" "$here/receive_webhook.py" --port "$hook_port" --secret interop-secret \
  --out "$work/webhook.jsonl" &
hook_pid=$!
mkdir -p "$work/destinations"
cat > "$work/destinations/hook.toml" <<TOML
type = "webhook"
url = "http://127.0.0.1:$hook_port/sluice"
secret = "interop-secret"
[delivery]
retry_backoff = "100ms"
TOML

port="$(free_port)"
cat > "$work/sluice.toml" <<TOML
[server]
listen = "127.0.0.1:$port"

[[sources]]
name = "python"
write_key = "interop-python-key"
violations = "block"

[[sources]]
name = "node"
write_key = "interop-node-key"
violations = "flag"

[[sources]]
name = "browser"
write_key = "interop-browser-key"

[storage]
url = "s3://sluice-interop/lake"
flush_interval = "1s"

[log]
dir = "data/log"

[schemas]
dir = "$here/schemas"

[destinations]
dir = "destinations"
TOML

"$bin" --config "$work/sluice.toml" serve 2> "$work/server.log" &
server_pid=$!
for _ in $(seq 1 300); do
  if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then cat "$work/server.log" >&2; exit 1; fi
  sleep 0.1
done

host="http://127.0.0.1:$port"
"$py" "$here/send_python.py" --host "$host" --write-key interop-python-key --out "$work/python.jsonl"
node "$here/send_node.mjs" --host "$host" --write-key interop-node-key --out "$work/node.jsonl"

checks=("python=$work/python.jsonl" "node=$work/node.jsonl")
if [ -n "$chromium" ]; then
  # The page is served from another port, so every call to Sluice is cross-origin.
  mkdir -p "$work/site"
  cp "$here/browser/page.html" "$work/site/"
  ln -s "$here/node_modules/@segment/analytics-next/dist/umd" "$work/site/umd"
  site_port="$(free_port)"
  "$py" -m http.server "$site_port" --bind 127.0.0.1 --directory "$work/site" >/dev/null 2>&1 &
  site_pid=$!
  sleep 0.5
  CHROMIUM="$chromium" node "$here/browser/run_page.mjs" \
    "http://127.0.0.1:$site_port/page.html?sluice=$host&writeKey=interop-browser-key"
  kill "$site_pid" || true
  checks+=("browser=$here/browser/expected.jsonl")
fi

# Every accepted client message reaches the webhook before the server stops.
for _ in $(seq 1 300); do
  "$bin" --config "$work/sluice.toml" log dump > "$work/log-now.jsonl"
  want="$("$py" -c 'import json,sys; print(len({r["messageId"] for r in map(json.loads, open(sys.argv[1])) if r["status"] == "accepted" and r["source"] != "sluice"}))' "$work/log-now.jsonl")"
  have="$("$py" -c 'import json,sys; print(len({r["messageId"] for r in map(json.loads, open(sys.argv[1])) if r["verified"]}))' "$work/webhook.jsonl" 2>/dev/null || echo 0)"
  [ "$have" -ge "$want" ] && break
  sleep 0.2
done

# A clean stop: SIGTERM, exit status 0.
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=""
if [ "$status" -ne 0 ]; then
  echo "interop: sluice exited with $status after SIGTERM" >&2
  cat "$work/server.log" >&2
  exit 1
fi

"$bin" --config "$work/sluice.toml" log dump > "$work/log.jsonl"
"$py" "$here/check.py" "$work/log.jsonl" "${checks[@]}"
"$py" "$here/check_webhook.py" "$work/log.jsonl" "$work/webhook.jsonl"
kill "$hook_pid" 2>/dev/null || true

# The lake: SIGTERM flushed it to S3; read it back three ways.
"$bin" --config "$work/sluice.toml" query --format json \
  "SELECT message_id, type, event, name, user_id, anonymous_id, group_id, previous_id, source, properties, traits FROM events" \
  > "$work/lake.jsonl"
"$py" "$here/check_lake.py" --endpoint "$AWS_ENDPOINT_URL" --bucket sluice-interop --prefix lake \
  --mirror "$work/mirror" --sluice-json "$work/lake.jsonl" "${checks[@]}"
