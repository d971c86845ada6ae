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
for tool in openssl curl python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq "$tool") >/dev/null || { echo "cannot install $tool" >&2; exit 1; }
  fi
done

need go "install Go (for the OpenTelemetry Collector used by the tracing test)"
echo "== OpenTelemetry Collector (tools/otelcol, from the Go module proxy; cached)"
scripts/otelcol.sh build
echo "== build"
cargo build --locked --release --bin xsender-events
echo "== unit, property, end-to-end and process tests"
cargo test --locked --all-targets
echo "== README walk-through"
BIN="$CARGO_TARGET_DIR/release/xsender-events" scripts/walkthrough.sh
echo "== Helm chart: lint, render both modes, validate against the Kubernetes schemas"
BIN="$CARGO_TARGET_DIR/release/xsender-events" scripts/check-helm.sh
