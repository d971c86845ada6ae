#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: builds release, runs the criterion benches (each hot path beside its
# primitives, same run), then the load harness against the embedded server and the baseline
# hyper handler (same run), and writes the tables between the markers in BENCHMARKS.md.
#
#   scripts/bench.sh                 # full run (~15 min on 2 cores)
#   QUICK=1 scripts/bench.sh         # shorter phases, no 1M-event rebuild (smoke test)
#   SOAK=300 REBUILD_EVENTS=1000000 scripts/bench.sh
#   COMPARE_BIN=/path/to/older/xsender-events scripts/bench.sh   # before/after: load and rebuild
#
# All traffic goes to 127.0.0.1 and every phase is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/xsender-events/target}"
export CARGO_TERM_COLOR=never
OUT="${OUT:-$CARGO_TARGET_DIR/bench-results}"
mkdir -p "$OUT"

if [[ -n "${QUICK:-}" ]]; then
  DURATION="${DURATION:-4}"; SOAK="${SOAK:-10}"; REBUILD_EVENTS="${REBUILD_EVENTS:-0}"
  CRITERION_ARGS=(--warm-up-time 1 --measurement-time 1)
else
  DURATION="${DURATION:-10}"; SOAK="${SOAK:-120}"; REBUILD_EVENTS="${REBUILD_EVENTS:-1000000}"
  CRITERION_ARGS=()
fi
COMPARE_ARGS=()

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "memory: $(grep MemTotal /proc/meminfo | awk '{printf "%.1f GiB", $2/1048576}')"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  rustc --version
} | tee "$OUT/machine.txt"

echo "== build (release)"
cargo build --release --bin xsender-events --example baseline_server
cargo bench --no-run --bench pipeline --bench load

echo "== criterion (benches/pipeline.rs)"
cargo bench --bench pipeline -- "${CRITERION_ARGS[@]}" 2>&1 | tee "$OUT/criterion.txt"

echo "== load harness (benches/load.rs): baseline handler, then the embedded server"
# COMPARE_BIN=<older xsender-events>: also time its rebuild on the same log (before/after).
cargo bench --bench load -- --duration "$DURATION" --soak "$SOAK" \
  --rebuild-events "$REBUILD_EVENTS" --out "$OUT/load.json" \
  ${COMPARE_BIN:+--rebuild-compare-bin "$COMPARE_BIN"} 2>&1 | tee "$OUT/load.txt"
if [[ -n "${COMPARE_BIN:-}" ]]; then
  echo "== load harness again, older binary then this build, back to back (before/after)"
  for who in before after; do
    bin="$CARGO_TARGET_DIR/release/xsender-events"; [[ $who == before ]] && bin="$COMPARE_BIN"
    cargo bench --bench load -- --duration "$DURATION" --soak 0 --rebuild-events 0 --no-baseline \
      --server-bin "$bin" --out "$OUT/load-$who.json" 2>&1 | tee "$OUT/load-$who.txt"
  done
  COMPARE_ARGS=(--load-before "$OUT/load-before.json" --load-after "$OUT/load-after.json")
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

python3 scripts/bench-report.py --criterion "$CARGO_TARGET_DIR/criterion" --load "$OUT/load.json" \
  "${COMPARE_ARGS[@]}" > "$OUT/tables.md"
{
  echo '```'; cat "$OUT/machine.txt"; echo '```'; echo; cat "$OUT/tables.md"
} > "$OUT/section.md"
python3 - "$OUT/section.md" <<'PY'
import re, sys
section = open(sys.argv[1]).read()
doc = open("BENCHMARKS.md").read()
begin, end = "<!-- results:begin -->", "<!-- results:end -->"
doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: begin + "\n" + section + "\n" + end, doc, flags=re.S)
open("BENCHMARKS.md", "w").write(doc)
PY
echo "== tables written to BENCHMARKS.md (and $OUT/tables.md)"
cat "$OUT/tables.md"
