#!/usr/bin/env bash
# The one test command: installs what the tests need, starts the services they use, runs every
# test. Works on a fresh machine of this project's kind (Rust, Java, Python, Go preinstalled;
# package registries reachable). CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
# Build output and caches live outside the clone so CI's fresh clones reuse them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/xsender-events/target}"
export CARGO_TERM_COLOR=never

need() { command -v "$1" >/dev/null 2>&1 || { echo "missing $1: $2" >&2; exit 1; }; }
need cargo "install Rust (rustup) first"
for tool in openssl curl python3 java mvn; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    pkg=$tool
    case $tool in java) pkg=openjdk-17-jre-headless ;; mvn) pkg=maven ;; esac
    (apt-get update -qq && apt-get install -y -qq "$pkg") >/dev/null || { echo "cannot install $pkg" >&2; exit 1; }
  fi
done

# Cassandra (the CQL stand-in for ScyllaDB) and Kafka start while the build runs; each is
# stopped on exit if this script started it.
started_cassandra=
started_kafka=
kafka_dir="$HOME/.cache/xsender-events/kafka/test-node"
cleanup() {
  if [ -n "$started_kafka" ]; then scripts/kafka.sh stop --dir "$kafka_dir" || true; fi
  if [ -n "$started_cassandra" ]; then scripts/cassandra.sh stop || true; fi
}
trap cleanup EXIT
export XSENDER_TEST_CQL="${XSENDER_TEST_CQL:-127.0.0.1:9042}"
if ! scripts/cassandra.sh status >/dev/null 2>&1; then
  started_cassandra=1
  cassandra_log=$(mktemp)
  (time scripts/cassandra.sh start) >"$cassandra_log" 2>&1 &
  cassandra_pid=$!
fi
# The jars also serve the private brokers that tests start and stop with scripts/kafka.sh.
scripts/kafka.sh fetch
export XSENDER_TEST_KAFKA="${XSENDER_TEST_KAFKA:-127.0.0.1:9092}"
if [ "$XSENDER_TEST_KAFKA" = 127.0.0.1:9092 ] && ! scripts/kafka.sh status >/dev/null 2>&1; then
  started_kafka=1
  rm -rf "$kafka_dir"  # this script's own node: a fresh one each run
  kafka_log=$(mktemp)
  (time scripts/kafka.sh start --dir "$kafka_dir") >"$kafka_log" 2>&1 &
  kafka_pid=$!
fi
# The analytics consumer (tests/analytics) runs in this venv.
XSENDER_TEST_PYTHON=$(scripts/python-env.sh)
export XSENDER_TEST_PYTHON

need go "install Go (for the OpenTelemetry Collector used by the tracing test)"
echo "== OpenTelemetry Collector (tools/otelcol, from the Go module proxy; cached)"
scripts/otelcol.sh build
echo "== build"
cargo build --locked --release --bin xsender-events
cargo test --locked --all-targets --no-run
if [ -n "$started_cassandra" ]; then
  echo "== waiting for Cassandra"
  wait "$cassandra_pid" || { cat "$cassandra_log" >&2; exit 1; }
  cat "$cassandra_log"
fi
if [ -n "$started_kafka" ]; then
  echo "== waiting for Kafka"
  wait "$kafka_pid" || { cat "$kafka_log" >&2; exit 1; }
  cat "$kafka_log"
fi
echo "== analytics consumer (tests/analytics/consume.py) self-check against Kafka"
tests/analytics/selftest.sh
echo "== unit, property, end-to-end (embedded, CQL projections, Kafka + CQL) and process tests"
cargo test --locked --all-targets
echo "== README walk-through (embedded, then projections in CQL, then the log on Kafka too)"
BIN="$CARGO_TARGET_DIR/release/xsender-events" scripts/walkthrough.sh
BIN="$CARGO_TARGET_DIR/release/xsender-events" PORT=18081 \
  WALKTHROUGH_CQL_KEYSPACE="xs_walkthrough_$$" scripts/walkthrough.sh
BIN="$CARGO_TARGET_DIR/release/xsender-events" PORT=18082 XSENDER_KAFKA_BROKERS="$XSENDER_TEST_KAFKA" \
  WALKTHROUGH_CQL_KEYSPACE="xs_walkthrough_kafka_$$" WALKTHROUGH_KAFKA_NAMESPACE="walkthrough$$." \
  scripts/walkthrough.sh
echo "== Helm chart: lint, render both modes, validate against the Kubernetes schemas"
BIN="$CARGO_TARGET_DIR/release/xsender-events" scripts/check-helm.sh
