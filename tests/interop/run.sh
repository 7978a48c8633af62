#!/usr/bin/env bash
# The interop suite: the official Segment clients (segment-analytics-python from PyPI,
# @segment/analytics-node from npm, and @segment/analytics-next in headless Chromium on a page of
# another origin) send real traffic to the sluice binary over loopback, and `sluice log dump` shows
# that every message arrived exactly once, intact.
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
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -9 "$server_pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat > "$work/sluice.toml" <<TOML
[server]
listen = "127.0.0.1:$port"

[[sources]]
name = "python"
write_key = "interop-python-key"

[[sources]]
name = "node"
write_key = "interop-node-key"

[[sources]]
name = "browser"
write_key = "interop-browser-key"

[log]
dir = "data/log"
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
  site_port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "$py" -m http.server "$site_port" --bind 127.0.0.1 --directory "$work/site" >/dev/null 2>&1 &
  site_pid=$!
  sleep 0.5
  CHROMIUM="$chromium" node "$here/browser/run_page.mjs" \
    "http://127.0.0.1:$site_port/page.html?sluice=$host&writeKey=interop-browser-key"
  kill "$site_pid" || true
  checks+=("browser=$here/browser/expected.jsonl")
fi

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
