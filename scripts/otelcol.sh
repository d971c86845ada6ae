#!/usr/bin/env bash
# A minimal real OpenTelemetry Collector (OTLP receiver -> debug exporter) for end-to-end tracing
# tests. Source and pinned modules: tools/otelcol (go.mod/go.sum).
#
#   scripts/otelcol.sh build                 build $BIN unless it is already built from the same sources
#   scripts/otelcol.sh start PORT LOGFILE    start it (OTLP/HTTP on 127.0.0.1:PORT only), print its PID
#   scripts/otelcol.sh stop PID              stop it
#
# The debug exporter runs with `verbosity: detailed`, so every received span shows up in LOGFILE
# (collector stdout+stderr) with lines like `Trace ID       : <hex>` and `Name           : <name>`.
# The collector's own telemetry is off (no metrics listener), and there is no gRPC listener, so
# PORT is the only port it opens. The config is written next to the log, as LOGFILE.yaml.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/tools/otelcol"
BIN_DIR="$HOME/.cache/xsender-events/bin"
BIN="$BIN_DIR/xsender-otelcol"
STAMP="$BIN.stamp"

usage() {
  echo "usage: $0 build | start PORT LOGFILE | stop PID" >&2
  exit 2
}

# What the binary is built from: the pinned modules and our own source.
source_hash() {
  (cd "$SRC" && cat go.mod go.sum ./*.go) | sha256sum | cut -d' ' -f1
}

cmd_build() {
  command -v go >/dev/null 2>&1 || { echo "otelcol: go is not installed" >&2; exit 1; }
  local want
  want="$(source_hash)"
  if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "otelcol: $BIN is up to date"
    return 0
  fi
  mkdir -p "$BIN_DIR"
  echo "otelcol: building $BIN"
  (cd "$SRC" && GOFLAGS=-mod=readonly CGO_ENABLED=0 go build -trimpath -o "$BIN.tmp.$$" .)
  mv -f "$BIN.tmp.$$" "$BIN"
  echo "$want" >"$STAMP"
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

cmd_start() {
  [[ $# -eq 2 ]] || usage
  local port="$1" log="$2"
  [[ "$port" =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || { echo "otelcol: bad port '$port'" >&2; exit 2; }
  cmd_build >&2
  if port_open "$port"; then
    echo "otelcol: 127.0.0.1:$port is already in use" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$log")"
  local cfg="$log.yaml"
  cat >"$cfg" <<EOF
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:$port
exporters:
  debug:
    verbosity: detailed
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [debug]
    metrics:
      receivers: [otlp]
      exporters: [debug]
    logs:
      receivers: [otlp]
      exporters: [debug]
EOF
  nohup "$BIN" --config "file:$cfg" </dev/null >"$log" 2>&1 &
  local pid=$!
  local i
  for ((i = 0; i < 300; i++)); do # up to 30 s
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "otelcol: exited during startup; last lines of $log:" >&2
      tail -n 20 "$log" >&2
      exit 1
    fi
    if port_open "$port"; then
      echo "$pid"
      return 0
    fi
    sleep 0.1
  done
  echo "otelcol: 127.0.0.1:$port did not accept within 30 s; stopping $pid" >&2
  kill "$pid" 2>/dev/null || true
  tail -n 20 "$log" >&2
  exit 1
}

cmd_stop() {
  [[ $# -eq 1 && "$1" =~ ^[0-9]+$ ]] || usage
  local pid="$1"
  kill -0 "$pid" 2>/dev/null || return 0
  # Only ever stop our own collector binary.
  if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'xsender-otelcol'; then
    echo "otelcol: PID $pid is not an xsender-otelcol process" >&2
    exit 1
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for ((i = 0; i < 100; i++)); do # up to 10 s for a clean shutdown
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

[[ $# -ge 1 ]] || usage
case "$1" in
  build) shift; [[ $# -eq 0 ]] || usage; cmd_build ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) usage ;;
esac
