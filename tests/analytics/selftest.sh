#!/usr/bin/env bash
# Self-check of the analytics consumer (consume.py) against the broker at XSENDER_TEST_KAFKA,
# or else a private Kafka node on free ports:
#   tests/analytics/selftest.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$(scripts/python-env.sh)
if [ -n "${XSENDER_TEST_KAFKA:-}" ]; then
  # The broker of scripts/test.sh: the self-check's topics have names of their own.
  "$PY" tests/analytics/selftest.py "$XSENDER_TEST_KAFKA"
  exit
fi
dir=$(mktemp -d)
read -r port cport < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
trap 'scripts/kafka.sh stop --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
scripts/kafka.sh start --dir "$dir" --port "$port" --controller-port "$cport"
"$PY" tests/analytics/selftest.py "127.0.0.1:$port"
