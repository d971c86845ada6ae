#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: builds release, runs the criterion benches (each hot path beside its
# primitives, same run), then the load harness against the embedded server and the baseline
# hyper handler (same run), then the cluster backend (a private Kafka node + the CQL node at
# 127.0.0.1:9042, with Kafka's own ProducerPerformance on the same node as the log's limit), and
# writes the tables between the markers in BENCHMARKS.md.
#
#   scripts/bench.sh                 # full run (~20 min on 2 cores with its 5-minute soak, + ~6 min cluster phase)
#   QUICK=1 scripts/bench.sh         # shorter phases, no 1M-event rebuild (smoke test)
#   SOAK=120 REBUILD_EVENTS=200000 scripts/bench.sh   # shorter soak and rebuild
#   COMPARE_BIN=/path/to/older/xsender-events scripts/bench.sh   # before/after: load and rebuild
#   KAFKA=0 scripts/bench.sh         # skip the cluster phase
#   KAFKA=only scripts/bench.sh      # only the cluster phase; prints its tables, leaves
#                                    # BENCHMARKS.md alone (its other sections would be missing)
#
# Cluster phase settings: KAFKA_DURATION (s per closed-loop phase, default DURATION),
# KAFKA_LOW_RATE (req/s of the mix for the fixed-rate visibility run on the fresh server, default
# 100) and KAFKA_LOW_SECS (its length, default 20 s; QUICK 5), KAFKA_SOAK (s, default 60; QUICK 10), KAFKA_SETTLE (longest wait for the projections to catch
# up between phases, after the visibility probe's own wait of up to 30 s; default 10 s),
# KAFKA_WARMUP (s of unmeasured mix first, for the fresh broker's JIT and the consumer groups'
# joins; default 5), KAFKA_PERF_SECS (ProducerPerformance's measured part, default 20 s; QUICK
# 5), CQL_NODES (default 127.0.0.1:9042). It starts its own Kafka node (own folder, free ports;
# never the shared one on 9092), a fresh CQL keyspace and topic namespaces, and removes all three
# when it ends, also on failure. With no CQL node answering on the default 127.0.0.1:9042 it
# starts the project's Cassandra (scripts/cassandra.sh) for the phase and stops it after. Two
# full runs took 283 s and 357 s with KAFKA_SETTLE=20 (the projections fell behind in most
# phases; every wait is bounded, their sum is what makes it long); 10 s saves up to a minute.
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
  DURATION="${DURATION:-10}"; SOAK="${SOAK:-300}"; REBUILD_EVENTS="${REBUILD_EVENTS:-1000000}"
  CRITERION_ARGS=()
fi
COMPARE_ARGS=()
KAFKA="${KAFKA:-1}"
KAFKA_DURATION="${KAFKA_DURATION:-$DURATION}"
KAFKA_SETTLE="${KAFKA_SETTLE:-10}"
KAFKA_WARMUP="${KAFKA_WARMUP:-5}"
KAFKA_LOW_RATE="${KAFKA_LOW_RATE:-100}"
CQL_NODES="${CQL_NODES:-127.0.0.1:9042}"
if [[ -n "${QUICK:-}" ]]; then
  KAFKA_SOAK="${KAFKA_SOAK:-10}"; KAFKA_PERF_SECS="${KAFKA_PERF_SECS:-5}"; KAFKA_LOW_SECS="${KAFKA_LOW_SECS:-5}"
else
  KAFKA_SOAK="${KAFKA_SOAK:-60}"; KAFKA_PERF_SECS="${KAFKA_PERF_SECS:-20}"; KAFKA_LOW_SECS="${KAFKA_LOW_SECS:-20}"
fi
KAFKA_ARGS=()

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
BIN="$CARGO_TARGET_DIR/release/xsender-events"

if [[ $KAFKA != only ]]; then
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
    bin="$BIN"; [[ $who == before ]] && bin="$COMPARE_BIN"
    cargo bench --bench load -- --duration "$DURATION" --soak 0 --rebuild-events 0 --no-baseline \
      --server-bin "$bin" --out "$OUT/load-$who.json" 2>&1 | tee "$OUT/load-$who.txt"
  done
  COMPARE_ARGS=(--load-before "$OUT/load-before.json" --load-after "$OUT/load-after.json")
fi
fi

# ---------------------------------------------------------------- cluster phase (Kafka + CQL)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# DROP KEYSPACE over the CQL native protocol (v4; there is no cqlsh here), waiting for the answer.
cql_drop_keyspace() {
  python3 - "$1" "${CQL_NODES%%,*}" <<'PY'
import socket, struct, sys
ks, node = sys.argv[1], sys.argv[2]
host, port = node.rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=120)
def frame(op, body):
    s.sendall(struct.pack(">BBhBi", 4, 0, 1, op, len(body)) + body)
    head = b""
    while len(head) < 9:
        head += s.recv(9 - len(head))
    n = struct.unpack(">i", head[5:9])[0]
    data = b""
    while len(data) < n:
        data += s.recv(n - len(data))
    return head[4], data
st = lambda x: struct.pack(">H", len(x)) + x.encode()
op, _ = frame(0x01, struct.pack(">H", 1) + st("CQL_VERSION") + st("3.0.0"))
assert op == 0x02, f"CQL STARTUP: opcode {op}"
q = f"DROP KEYSPACE IF EXISTS {ks}".encode()
op, data = frame(0x07, struct.pack(">i", len(q)) + q + struct.pack(">HB", 1, 0))
if op != 0x08:
    sys.exit(f"DROP KEYSPACE {ks}: {data[6:].decode(errors='replace')}")
PY
}

# Kafka's ProducerPerformance on the envelopes topic of PERF_NS (same topology), records the size
# of ours; a short run warms the JVM and sizes the measured one. Writes kafka-perf.json.
producer_perf() {
  python3 - "$OUT/kafka-payloads.json" "$KDIR/payloads.txt" "${PERF_NS}xsender.webhook-envelopes.v1" \
    "127.0.0.1:$KPORT" "$KPID" "$KAFKA_PERF_SECS" "$OUT/kafka-perf.json" <<'PY'
import json, re, resource, subprocess, sys, time
sizes_file, payloads, topic, broker, kpid, secs, out = sys.argv[1:8]
sizes = json.load(open(sizes_file))
# As src/log/kafka/mod.rs producer(): idempotent, acks=all, zstd, linger 5 ms, 1 MiB batches,
# 20 MiB requests, 64 MiB buffer (queue.buffering.max.kbytes). Keys random (ours are random envelope ids), 12 partitions.
props = ["acks=all", "enable.idempotence=true", "compression.type=zstd", "linger.ms=5",
         "batch.size=1048576", "max.request.size=20971520", "buffer.memory=67108864"]
def ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100
def busy():
    # user nice system idle iowait irq softirq steal -> (busy, steal), as the load harness
    f = [int(x) / 100 for x in open("/proc/stat").readline().split()[1:9]]
    return (f[0] + f[1] + f[2] + f[5] + f[6], f[7])
def run(records, warmup):
    cmd = ["scripts/kafka.sh", "producer-perf", "--bootstrap-server", broker, "--topic", topic,
           "--num-records", str(records), "--throughput", "-1", "--payload-file", payloads,
           "--key-distribution", "random", "--record-key-range", "1000000000",
           "--reporting-interval", "100000", "--command-property", *props]
    if warmup:
        cmd += ["--warmup-records", str(warmup)]
    k0, m0, c0, t0 = ticks(kpid), busy(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.time() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(p.stdout.strip(), flush=True)
    if p.returncode:
        sys.exit(f"ProducerPerformance failed: {p.stderr[-3000:]}")
    lines = [l for l in p.stdout.splitlines() if "records/sec" in l]
    line = next((l for l in lines if "steady state" in l), lines[-1])
    m = re.search(r"([\d.]+) records/sec \(([\d.]+) MB/sec\), ([\d.]+) ms avg latency, ([\d.]+) ms max latency"
                  r"(?:, (\d+) ms 50th, (\d+) ms 95th, (\d+) ms 99th, (\d+) ms 99.9th)?", line)
    r = {"records": records, "warmup_records": warmup, "line": line.strip(),
         "records_per_s": float(m[1]), "mb_per_s": float(m[2]), "avg_latency_ms": float(m[3]),
         "max_latency_ms": float(m[4]), "wall_s": wall,
         "broker_cores": (ticks(kpid) - k0) / wall, "machine_cores": (busy()[0] - m0[0]) / wall,
         "machine_steal_cores": (busy()[1] - m0[1]) / wall,
         "producer_cores": (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / wall}
    if m[5]:
        r.update(p50_ms=int(m[5]), p99_ms=int(m[7]), p999_ms=int(m[8]))
    return r
probe = run(2000, 0)
n = max(2000, int(probe["records_per_s"] * float(secs)))
main = run(n + n // 4, n // 4)
main.update(events_per_record=sizes["events_per_record"], record_bytes=sizes["record_bytes"],
            body_bytes=sizes["body_bytes"], avro_value_bytes=sizes["avro_value_bytes"],
            events_per_s=main["records_per_s"] * sizes["events_per_record"], probe=probe,
            producer_props=props, topic=topic)
json.dump(main, open(out, "w"), indent=2)
print(f"ProducerPerformance: {main['records_per_s']:.0f} records/s of {sizes['record_bytes']:.0f} B "
      f"= {main['events_per_s']:.0f} SendGrid events/s; broker {main['broker_cores']:.2f} cores, "
      f"producer {main['producer_cores']:.2f}, machine {main['machine_cores']:.2f}")
PY
}

# The cluster phase. It runs in a subshell with its own errexit and EXIT trap, so a failure
# stops what it started and the embedded results are still reported.
cluster_phase() {
  set -euo pipefail
  began=$SECONDS
  local stamp
  stamp=$(date +%s)
  KDIR="$(mktemp -d /tmp/xsender-bench-kafka.XXXXXX)"
  KPORT=$(free_port); KCPORT=$(free_port); SPORT=$(free_port)
  NS="bench${stamp}."        # our topics and consumer groups
  PERF_NS="perf${stamp}."    # ProducerPerformance's copy of the envelopes topic
  KS="xsbench_${stamp}"
  SPID=""; KS_CREATED=""; CQL_STARTED=""
  cleanup() {
    local rc=$?
    set +e
    if [[ -n "$SPID" ]] && kill -0 "$SPID" 2>/dev/null; then
      kill "$SPID"
      for _ in $(seq 1 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$SPID" 2>/dev/null
    fi
    scripts/kafka.sh stop --dir "$KDIR/node"
    if [[ -n "$KS_CREATED" ]]; then
      cql_drop_keyspace "$KS" || echo "could not drop CQL keyspace $KS" >&2
    fi
    if [[ -n "$CQL_STARTED" ]]; then scripts/cassandra.sh stop; fi
    rm -rf "$KDIR"
    echo "cluster phase: stopped and removed what it started, $((SECONDS - began)) s after it began (exit $rc)"
  }
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  echo "== cluster phase: private Kafka node ($KDIR, 127.0.0.1:$KPORT), CQL keyspace $KS on $CQL_NODES"
  echo "load average at cluster start: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/kafka-machine.txt"
  # No CQL node answering on the default address (a fresh machine, or none left running by
  # the tests): start the project's own for this phase, before Kafka, and stop it at the end.
  if [[ $CQL_NODES == 127.0.0.1:9042 ]] && ! scripts/cassandra.sh status >/dev/null 2>&1; then
    echo "== no CQL node on $CQL_NODES: starting Cassandra for the cluster phase"
    CQL_STARTED=1
    scripts/cassandra.sh start
  fi
  scripts/kafka.sh start --dir "$KDIR/node" --port "$KPORT" --controller-port "$KCPORT"
  KPID=$(cat "$KDIR/node/pid")
  local kafka=(--kafka-brokers "127.0.0.1:$KPORT" --kafka-topology topology/local.toml)
  "$BIN" topology apply "${kafka[@]}" --kafka-namespace "$NS"
  "$BIN" topology apply "${kafka[@]}" --kafka-namespace "$PERF_NS"
  KS_CREATED=1
  "$BIN" migrate --cql-nodes "$CQL_NODES" --cql-keyspace "$KS"
  cargo bench --bench load -- --write-tenants "$KDIR/tenants.toml"
  # ProducerPerformance's payloads: SendGrid-100 requests from the generator, each the size of
  # the Kafka record ingress writes for it (measured by encoding it with the server's Wire).
  cargo bench --bench load -- --write-payloads "$KDIR/payloads.txt" --payloads 500 \
    | grep '^{' | tee "$OUT/kafka-payloads.json"
  # The raw log's rate first, before `serve` exists: the machine is Kafka's and its producer's
  # alone. (Measured after the load, it shared the cores with Cassandra compacting what the
  # projector had written: 0.74 cores of "rest of the machine" in the 16:55 UTC run.)
  echo "== ProducerPerformance on the same node: records the size of SendGrid-100 envelopes, settings of our producer"
  producer_perf 2>&1 | tee "$OUT/kafka-perf.txt"
  cat >"$KDIR/serve.toml" <<TOML
data_dir = "$KDIR/serve-data"
listen = "127.0.0.1:$SPORT"
tenants_file = "$KDIR/tenants.toml"
rate_limit_per_second = 100000
rate_limit_burst = 100000
TOML
  RUST_LOG=warn "$BIN" serve --config "$KDIR/serve.toml" "${kafka[@]}" --kafka-namespace "$NS" \
    --projections cql --cql-nodes "$CQL_NODES" --cql-keyspace "$KS" 2>"$OUT/kafka-serve.log" &
  SPID=$!
  local cpid
  local aux=(--aux-pid "kafka=$KPID")
  cpid=$(pgrep -f -o 'org.apache.cassandra.service.CassandraDaemon' || true)
  [[ -n "$cpid" ]] && aux+=(--aux-pid "cassandra=$cpid")
  echo "== load harness against Kafka + CQL (serve pid $SPID, Kafka pid $KPID${cpid:+, Cassandra pid $cpid})"
  # First, on the fresh server, the mix at a fixed low rate: how soon a signed webhook's rows
  # are readable when the projector keeps up (issue #5: "rows out within a second").
  echo "== Kafka + CQL: the mix at $KAFKA_LOW_RATE req/s for $KAFKA_LOW_SECS s (visibility at a rate the projector keeps up with)"
  timeout 300 cargo bench --bench load -- --target external --url "http://127.0.0.1:$SPORT" \
    --pid "$SPID" "${aux[@]}" --no-baseline --skip-peaks --rate "$KAFKA_LOW_RATE" \
    --duration "$KAFKA_LOW_SECS" --soak 0 --settle-max "$KAFKA_SETTLE" --warmup "$KAFKA_WARMUP" \
    --rebuild-events 0 --out "$OUT/load-kafka-low.json" 2>&1 | tee "$OUT/load-kafka-low.txt"
  # A hard bound for a failure; the phases themselves are bounded in time.
  timeout 600 cargo bench --bench load -- --target external --url "http://127.0.0.1:$SPORT" \
    --pid "$SPID" "${aux[@]}" --no-baseline --duration "$KAFKA_DURATION" --soak "$KAFKA_SOAK" \
    --settle-max "$KAFKA_SETTLE" --warmup "$KAFKA_WARMUP" --rebuild-events 0 --out "$OUT/load-kafka.json" 2>&1 \
    | tee "$OUT/load-kafka.txt"
  kill -0 "$SPID" 2>/dev/null || { echo "serve exited during the run; see $OUT/kafka-serve.log" >&2; exit 1; }
  kill "$SPID"; wait "$SPID" || true; SPID=""
  echo "load average at cluster end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/kafka-machine.txt"
  echo "cluster phase: $((SECONDS - began)) s" | tee -a "$OUT/kafka-machine.txt"
}

KAFKA_STATUS=skipped
if [[ $KAFKA != 0 ]]; then
  rm -f "$OUT/load-kafka.json" "$OUT/load-kafka-low.json" "$OUT/kafka-perf.json" "$OUT/kafka-payloads.json"
  set +e
  (cluster_phase)
  rc=$?
  set -e
  if [[ $rc == 0 ]]; then
    KAFKA_STATUS=ok
    KAFKA_ARGS=(--kafka-load "$OUT/load-kafka.json" --kafka-low "$OUT/load-kafka-low.json"
                --kafka-perf "$OUT/kafka-perf.json"
                --kafka-machine "$OUT/kafka-machine.txt")
  else
    KAFKA_STATUS="failed (exit $rc)"
    echo "== cluster phase FAILED (exit $rc); the report leaves it out" >&2
  fi
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

if [[ $KAFKA == only ]]; then
  [[ $KAFKA_STATUS == ok ]] || exit 1
  python3 scripts/bench-report.py --criterion /nonexistent "${KAFKA_ARGS[@]}" > "$OUT/tables-kafka.md"
  echo "== cluster tables (KAFKA=only leaves BENCHMARKS.md alone): $OUT/tables-kafka.md"
  cat "$OUT/tables-kafka.md"
  exit 0
fi

python3 scripts/bench-report.py --criterion "$CARGO_TARGET_DIR/criterion" --load "$OUT/load.json" \
  "${COMPARE_ARGS[@]}" "${KAFKA_ARGS[@]}" > "$OUT/tables.md"
{
  echo '```'; cat "$OUT/machine.txt"; echo "cluster phase: $KAFKA_STATUS"; echo '```'; echo; cat "$OUT/tables.md"
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
