#!/usr/bin/env bash
# Self-check of the analytics consumer (consume.py) against a private Kafka node on free ports:
#   tests/analytics/selftest.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$(scripts/python-env.sh)
dir=$(mktemp -d)
read -r port cport < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
trap 'scripts/kafka.sh stop --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
scripts/kafka.sh start --dir "$dir" --port "$port" --controller-port "$cport"
"$PY" tests/analytics/selftest.py "127.0.0.1:$port"
