#!/usr/bin/env bash
# One Apache Cassandra 5.0 node on loopback: the CQL stand-in for ScyllaDB in tests (ScyllaDB
# cannot be installed here; the `scylla` driver speaks the same protocol).
#
#   scripts/cassandra.sh start    fetch the jars (once), start the node, wait until CQL accepts
#   scripts/cassandra.sh stop     stop the node started by `start`
#   scripts/cassandra.sh status   exit 0 when CQL accepts connections
#
# Jars come from Maven Central (org.apache.cassandra:cassandra-all) through maven's
# dependency plugin into a cache outside the clone; the node's data is disposable.
set -euo pipefail

VERSION="${CASSANDRA_VERSION:-5.0.9}"
CACHE="${XSENDER_CASSANDRA_CACHE:-$HOME/.cache/xsender-events/cassandra}"
JARS="$CACHE/$VERSION/lib"
RUN="${XSENDER_CASSANDRA_RUN:-$CACHE/run}"
PORT="${XSENDER_CASSANDRA_PORT:-9042}"
HEAP="${XSENDER_CASSANDRA_HEAP:-1G}"
WAIT_SECS="${XSENDER_CASSANDRA_WAIT_SECS:-180}"

# Ready means CQL answers, not just that the port accepts: send a protocol v4 OPTIONS frame
# and expect a SUPPORTED (opcode 0x06) response header.
cql_up() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$PORT" || exit 1
    printf '\x04\x00\x00\x00\x05\x00\x00\x00\x00' >&3
    op=$(timeout 5 head -c 9 <&3 | od -An -tx1 | awk '{print $5}')
    [ "$op" = "06" ]
  ) 2>/dev/null
}

fetch() {
  [ -f "$JARS/.complete" ] && return 0
  command -v mvn >/dev/null || { echo "missing mvn: apt-get install maven" >&2; exit 1; }
  mkdir -p "$JARS"
  local pom="$CACHE/$VERSION/pom.xml"
  cat >"$pom" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>xsender-events</groupId>
  <artifactId>cassandra-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
  echo "fetching Cassandra $VERSION jars into $JARS" >&2
  mvn -B -q -f "$pom" org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$JARS" >&2
  touch "$JARS/.complete"
}

write_conf() {
  mkdir -p "$RUN/conf" "$RUN/data" "$RUN/logs" "$RUN/tmp"
  cat >"$RUN/conf/cassandra.yaml" <<YAML
cluster_name: xsender-test
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:7000"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: 7000
native_transport_port: $PORT
start_native_transport: true
commitlog_sync: periodic
commitlog_sync_period: 10000ms
auto_bootstrap: false
data_file_directories: [$RUN/data/data]
commitlog_directory: $RUN/data/commitlog
saved_caches_directory: $RUN/data/saved_caches
hints_directory: $RUN/data/hints
cdc_raw_directory: $RUN/data/cdc_raw
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
# Tests create and drop a keyspace each: keep schema changes cheap.
auto_snapshot: false
snapshot_on_duplicate_row_detection: false
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
concurrent_materialized_view_writes: 8
memtable_allocation_type: heap_buffers
read_request_timeout: 10000ms
write_request_timeout: 10000ms
range_request_timeout: 20000ms
request_timeout: 20000ms
YAML
  cat >"$RUN/conf/logback.xml" <<XML
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$RUN/logs/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
  <logger name="org.apache.cassandra" level="INFO"/>
</configuration>
XML
}

# From Cassandra 5.0's conf/jvm17-server.options (JPMS flags and netty settings).
JVM17=(
  -Djdk.attach.allowAttachSelf=true
  --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
  --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
  --add-exports java.sql/java.sql=ALL-UNNAMED
  --add-exports java.base/java.lang.ref=ALL-UNNAMED
  --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
  --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
  --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
  --add-opens java.base/java.lang.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
  --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
  --add-opens java.base/jdk.internal.math=ALL-UNNAMED
  --add-opens java.base/jdk.internal.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
  --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
  --add-opens java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens java.base/java.io=ALL-UNNAMED
  --add-opens java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
  --add-opens java.base/java.lang=ALL-UNNAMED
  --add-opens java.base/java.util=ALL-UNNAMED
  -Dio.netty.tryReflectionSetAccessible=true
  -Dio.netty.allocator.useCacheForAllThreads=true
  -Dio.netty.allocator.maxOrder=11
)

start() {
  if cql_up; then
    echo "CQL already accepts connections on 127.0.0.1:$PORT" >&2
    return 0
  fi
  fetch
  command -v java >/dev/null || { echo "missing java: install a Java 17 JRE" >&2; exit 1; }
  local jamm
  jamm=$(ls "$JARS"/jamm-*.jar | head -1)
  # A fresh node each start: tests make their own keyspaces, nothing here is worth keeping.
  rm -rf "$RUN"
  write_conf
  local began=$SECONDS
  nohup java -Xms"$HEAP" -Xmx"$HEAP" -Xss512k -XX:+UseG1GC -XX:+ParallelRefProcEnabled \
    -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m -XX:MaxGCPauseMillis=300 \
    -XX:+HeapDumpOnOutOfMemoryError -XX:HeapDumpPath="$RUN/tmp" \
    "${JVM17[@]}" \
    -javaagent:"$jamm" \
    -Dcassandra.config="file://$RUN/conf/cassandra.yaml" \
    -Dcassandra.storagedir="$RUN/data" \
    -Dcassandra.logdir="$RUN/logs" \
    -Dcassandra-foreground=yes \
    -Dcassandra.skip_wait_for_gossip_to_settle=0 \
    -Dcassandra.jmx.local.port=7199 \
    -Dlogback.configurationFile="$RUN/conf/logback.xml" \
    -Djna.tmpdir="$RUN/tmp" -Djava.io.tmpdir="$RUN/tmp" \
    -cp "$JARS/*" org.apache.cassandra.service.CassandraDaemon \
    >"$RUN/logs/stdout.log" 2>&1 </dev/null &
  echo $! >"$RUN/pid"
  echo "starting Cassandra $VERSION (pid $(cat "$RUN/pid")), waiting for CQL on 127.0.0.1:$PORT" >&2
  while ! cql_up; do
    if ! kill -0 "$(cat "$RUN/pid")" 2>/dev/null; then
      echo "Cassandra exited; last log lines:" >&2
      tail -n 40 "$RUN/logs/stdout.log" "$RUN/logs/system.log" >&2 2>/dev/null || true
      exit 1
    fi
    if (( SECONDS - began > WAIT_SECS )); then
      echo "Cassandra did not accept CQL within ${WAIT_SECS}s; see $RUN/logs/system.log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "Cassandra accepts CQL on 127.0.0.1:$PORT after $((SECONDS - began))s" >&2
}

stop() {
  [ -f "$RUN/pid" ] || { echo "no Cassandra started by this script" >&2; return 0; }
  local pid
  pid=$(cat "$RUN/pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$RUN/pid"
  echo "Cassandra stopped" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) cql_up && echo "CQL accepts connections on 127.0.0.1:$PORT" || { echo "CQL not reachable on 127.0.0.1:$PORT" >&2; exit 1; } ;;
  fetch) fetch ;;
  *) echo "usage: $0 start|stop|status|fetch" >&2; exit 2 ;;
esac
