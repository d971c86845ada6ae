#!/usr/bin/env bash
# One Apache Kafka 4 node (KRaft: broker and controller in one process) on loopback, for tests
# and development. No Docker: the jars come from Maven Central through maven's dependency plugin
# into a cache outside the clone.
#
#   scripts/kafka.sh fetch                       fetch the jars (once; later calls re-use them)
#   scripts/kafka.sh start [--dir DIR] [--port P] [--controller-port C]
#                                                format DIR if new, start the node, wait until a
#                                                metadata request succeeds (returns at once when
#                                                the node of DIR is already up)
#   scripts/kafka.sh stop [--dir DIR]            SIGTERM (controlled shutdown), SIGKILL after 30 s
#   scripts/kafka.sh kill [--dir DIR]            SIGKILL, for crash tests; DIR keeps its data
#   scripts/kafka.sh status [--port P]           exit 0 iff a broker on 127.0.0.1:P answers metadata
#   scripts/kafka.sh producer-perf ARGS...       org.apache.kafka.tools.ProducerPerformance
#
# Defaults: DIR=~/.cache/xsender-events/kafka/node, P=9092, C=9093. Tests run private nodes with
# their own DIR and ports; starting again on the same DIR and ports keeps the data (a DIR is
# bound to its controller port: the format step records it in the quorum's voter set).
set -euo pipefail

VERSION="${KAFKA_VERSION:-4.4.0}"
# Kafka 4.4's own log4j-core version, plus the slf4j 1.7 binding (Kafka logs through slf4j 1.7;
# without the binding its logs vanish).
LOG4J_VERSION="${KAFKA_LOG4J_VERSION:-2.25.5}"
CACHE="${XSENDER_KAFKA_CACHE:-$HOME/.cache/xsender-events/kafka}"
JARS="$CACHE/lib"
HEAP="${XSENDER_KAFKA_HEAP:-512m}"
WAIT_SECS="${XSENDER_KAFKA_WAIT_SECS:-60}"
STOP_SECS="${XSENDER_KAFKA_STOP_SECS:-30}"

DIR="$CACHE/node"
PORT=9092
CPORT=9093

die() { echo "kafka.sh: $*" >&2; exit 1; }

parse_opts() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
      --port) PORT="${2:?--port needs a value}"; shift 2 ;;
      --controller-port) CPORT="${2:?--controller-port needs a value}"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  DIR="$(realpath -m "$DIR")"
}

# Ready means the broker answers a Metadata request (v1, no topics) with at least one broker in
# it, not just that the port accepts. Raw protocol over bash's /dev/tcp: no JVM per check.
#   request:  size, api_key 3, api_version 1, correlation_id, client_id "xs", topics = []
#   response: size, correlation_id, brokers array (count first), ...
broker_up() {
  local port="$1"
  (
    exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
    printf '\x00\x00\x00\x10\x00\x03\x00\x01\x00\x00\x12\x34\x00\x02xs\x00\x00\x00\x00' >&3
    read -r corr count < <(timeout 5 head -c 12 <&3 | od -An -tx1 -v | tr -d ' \n' |
      sed -E 's/^(.{8})(.{8})(.{8})$/\2 \3/')
    [ "$corr" = "00001234" ] && [ "$((16#${count:-0}))" -ge 1 ]
  ) 2>/dev/null
}

fetch() {
  [ "$(cat "$JARS/.complete" 2>/dev/null)" = "$VERSION" ] && return 0
  command -v mvn >/dev/null || die "missing mvn: apt-get install maven"
  rm -rf "$JARS"
  mkdir -p "$JARS"
  local pom="$CACHE/pom.xml"
  cat >"$pom" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>xsender-events</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$VERSION</version>
    </dependency>
    <dependency>
      <!-- ProducerPerformance and the other command-line tools -->
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
  echo "fetching Kafka $VERSION jars into $JARS" >&2
  mvn -B -q -f "$pom" org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$JARS" >&2
  echo "$VERSION" >"$JARS/.complete"
}

# A killed node lingers as a zombie until init reaps it: that counts as gone.
alive() {
  kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# The pid in DIR/pid if that process is alive and is the Kafka of this DIR (not a reused pid).
node_pid() {
  local pid
  pid=$(cat "$DIR/pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$DIR/server.properties" || return 1
  echo "$pid"
}

write_conf() {
  mkdir -p "$DIR/data" "$DIR/logs"
  cat >"$DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DIR/data
# One node: the internal topics have one replica and few partitions.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
# After a SIGKILL the controller refuses the restarted broker's registration until the old
# session expires (default 9 s): a shorter session makes crash-restart tests quick.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=3000
# Topics are created explicitly (by the application or the test), never by a stray producer.
auto.create.topics.enable=false
num.partitions=1
num.network.threads=2
num.io.threads=4
PROPS
  cat >"$DIR/log4j2.properties" <<LOG
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $DIR/logs/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.requests.name = kafka.request.logger
logger.requests.level = WARN
LOG
}

start() {
  parse_opts "$@"
  local pid
  if pid=$(node_pid); then
    if broker_up "$PORT"; then
      echo "Kafka of $DIR already answers on 127.0.0.1:$PORT (pid $pid)" >&2
      return 0
    fi
    echo "Kafka of $DIR is starting (pid $pid); waiting" >&2
  else
    if broker_up "$PORT"; then
      die "a broker not started from $DIR already answers on 127.0.0.1:$PORT"
    fi
    fetch
    command -v java >/dev/null || die "missing java: install a Java 17 JRE"
    write_conf
    if [ ! -f "$DIR/data/meta.properties" ]; then
      local cluster_id
      # A base64url UUID; one starting with '-' would be read by the format tool as an option
      # (1 in 64 ids: a start that failed at random), so draw again.
      cluster_id=-
      while [[ $cluster_id == -* ]]; do
        cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)
      done
      java -Xmx256m -Dlog4j2.configurationFile="$DIR/log4j2.properties" -cp "$JARS/*" \
        kafka.tools.StorageTool format --standalone -t "$cluster_id" \
        -c "$DIR/server.properties" --ignore-formatted >"$DIR/logs/format.log" 2>&1 ||
        { cat "$DIR/logs/format.log" >&2; die "formatting $DIR failed"; }
    fi
    nohup java -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
      -Djava.awt.headless=true -Dkafka.logs.dir="$DIR/logs" \
      -Dlog4j2.configurationFile="$DIR/log4j2.properties" \
      -cp "$JARS/*" kafka.Kafka "$DIR/server.properties" \
      >"$DIR/logs/stdout.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$DIR/pid"
    echo "starting Kafka $VERSION (pid $pid, $DIR), waiting for 127.0.0.1:$PORT" >&2
  fi
  local began=$SECONDS
  while ! broker_up "$PORT"; do
    if ! alive "$pid"; then
      echo "Kafka exited; last log lines:" >&2
      tail -n 40 "$DIR/logs/stdout.log" "$DIR/logs/server.log" >&2 2>/dev/null || true
      rm -f "$DIR/pid"
      exit 1
    fi
    if (( SECONDS - began > WAIT_SECS )); then
      echo "Kafka did not answer on 127.0.0.1:$PORT within ${WAIT_SECS}s; last log lines:" >&2
      tail -n 40 "$DIR/logs/stdout.log" "$DIR/logs/server.log" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.2
  done
  echo "Kafka answers on 127.0.0.1:$PORT after $((SECONDS - began))s" >&2
}

stop() {
  parse_opts "$@"
  local pid
  pid=$(node_pid) || { rm -f "$DIR/pid"; echo "no Kafka running from $DIR" >&2; return 0; }
  kill "$pid"
  for _ in $(seq 1 $((STOP_SECS * 10))); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then
    echo "Kafka (pid $pid) still running after ${STOP_SECS}s; SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
    while alive "$pid"; do sleep 0.05; done
  fi
  rm -f "$DIR/pid"
  echo "Kafka stopped" >&2
}

kill_node() {
  parse_opts "$@"
  local pid
  pid=$(node_pid) || { rm -f "$DIR/pid"; echo "no Kafka running from $DIR" >&2; return 0; }
  kill -9 "$pid"
  while alive "$pid"; do sleep 0.05; done
  rm -f "$DIR/pid"
  echo "Kafka killed (SIGKILL, pid $pid)" >&2
}

status() {
  parse_opts "$@"
  if broker_up "$PORT"; then
    echo "Kafka answers on 127.0.0.1:$PORT"
  else
    echo "Kafka not reachable on 127.0.0.1:$PORT" >&2
    exit 1
  fi
}

producer_perf() {
  fetch
  exec java -Xmx512m -cp "$JARS/*" org.apache.kafka.tools.ProducerPerformance "$@"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  fetch) fetch ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  kill) kill_node "$@" ;;
  status) status "$@" ;;
  producer-perf) producer_perf "$@" ;;
  *) echo "usage: $0 fetch|start|stop|kill|status|producer-perf [options]" >&2; exit 2 ;;
esac
