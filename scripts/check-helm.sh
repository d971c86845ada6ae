#!/usr/bin/env bash
# Checks the Helm chart in helm/xsender-events: lints it, renders it in every mode, validates
# the rendered manifests offline against the Kubernetes schemas (kubernetes-validate), makes
# sure bad values are refused, and starts the real binary with the embedded pod's arguments.
# Installs what it needs on a fresh machine (as root or not) under $HOME/.cache/xsender-events:
#   helm                 built with `go install` through the Go module proxy (no Debian package)
#   kubernetes-validate  from PyPI into a virtualenv
# Prints one line per check and ends with `helm: N passed, M failed`; exits 1 on any failure.
# BIN=path/to/xsender-events enables the smoke start (scripts/test.sh passes the release build).
set -uo pipefail
cd "$(dirname "$0")/.."

CACHE="$HOME/.cache/xsender-events"
HELM_VERSION=v3.21.4
KV_VERSION=1.37.0
HELM="$CACHE/bin/helm"
VENV="$CACHE/kubernetes-validate-$KV_VERSION"
CHART=helm/xsender-events
export PATH="$PATH:/usr/local/go/bin"

die() { echo "check-helm: $*" >&2; echo "helm: 0 passed, 1 failed"; exit 1; }

# A helm built by `go install` reports only "v3.21" itself; the module version is in the binary.
helm_module_version() { go version -m "$HELM" 2>/dev/null | awk '$1 == "mod" && $2 == "helm.sh/helm/v3" {print $3}'; }
command -v go >/dev/null 2>&1 || die "go is needed to build helm (no Debian package of helm)"
if [[ ! -x "$HELM" || "$(helm_module_version)" != "$HELM_VERSION" ]]; then
  echo "== building helm $HELM_VERSION with go install (a few minutes, once)"
  start=$(date +%s)
  GOBIN="$CACHE/bin" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || die "go install helm failed"
  echo "   built in $(( $(date +%s) - start )) s"
fi
if ! "$VENV/bin/python" -c 'import kubernetes_validate' >/dev/null 2>&1; then
  echo "== installing kubernetes-validate $KV_VERSION into $VENV"
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's python3 ships venv separately.
    (apt-get update -qq && apt-get install -y -qq python3-venv) >/dev/null 2>&1 || die "cannot install python3-venv"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "cannot create a virtualenv"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION" \
    || die "pip install kubernetes-validate failed"
fi

passed=0 failed=0
ok() { echo "ok    $*"; passed=$((passed + 1)); }
bad() { echo "FAIL  $*"; failed=$((failed + 1)); }
OUT=$(mktemp -d)
SMOKE_PID=
cleanup() {
  [[ -n "$SMOKE_PID" ]] && kill "$SMOKE_PID" 2>/dev/null
  rm -rf "$OUT"
}
trap cleanup EXIT

echo "== helm $(helm_module_version), kubernetes-validate $KV_VERSION"

# Cases: name, values file ("" = the chart's defaults), the kinds it must render.
CASES=(
  "defaults||ConfigMap=1,Service=2,ServiceAccount=1,StatefulSet=1"
  "embedded|$CHART/ci/embedded-values.yaml|ConfigMap=1,Service=2,ServiceAccount=1,StatefulSet=1"
  "cluster|$CHART/ci/cluster-values.yaml|ConfigMap=1,Deployment=3,HorizontalPodAutoscaler=1,PodDisruptionBudget=1,Service=1,ServiceAccount=1"
  "servicemonitor|$CHART/ci/servicemonitor-values.yaml|ConfigMap=1,Deployment=3,PodDisruptionBudget=1,Service=2,ServiceAccount=1,ServiceMonitor=1"
)
for c in "${CASES[@]}"; do
  IFS='|' read -r name values expect <<<"$c"
  vals=()
  [[ -n "$values" ]] && vals=(-f "$values")
  if "$HELM" lint --strict "$CHART" "${vals[@]}" >"$OUT/lint-$name.log" 2>&1; then
    ok "lint $name"
  else
    bad "lint $name"; sed 's/^/      /' "$OUT/lint-$name.log"
  fi
  if "$HELM" template xs "$CHART" --namespace mail "${vals[@]}" >"$OUT/$name.yaml" 2>"$OUT/template-$name.log"; then
    ok "template $name"
    if "$VENV/bin/python" scripts/validate-manifests.py "$name" "$OUT/$name.yaml" --expect "$expect" >"$OUT/validate-$name.log" 2>&1; then
      ok "validate $(cat "$OUT/validate-$name.log")"
    else
      bad "validate $name"; sed 's/^/      /' "$OUT/validate-$name.log"
    fi
  else
    bad "template $name"; sed 's/^/      /' "$OUT/template-$name.log"
    bad "validate $name (nothing rendered)"
  fi
done

# Values that must be refused, each with the message that says what to fix.
refuse() {
  local what=$1 expect=$2; shift 2
  if "$HELM" template xs "$CHART" "$@" >"$OUT/refuse.log" 2>&1; then
    bad "refuses $what (it rendered)"
  elif grep -q -- "$expect" "$OUT/refuse.log"; then
    ok "refuses $what"
  else
    bad "refuses $what (wrong message)"; sed 's/^/      /' "$OUT/refuse.log"
  fi
}
refuse "cluster mode without Kafka brokers" "kafka" --set mode=cluster --set 'cql.nodes={scylla:9042}'
refuse "an unknown mode" "mode" --set mode=kubernetes
refuse "a misspelt value (schema)" "replica" --set ingress.replica=3
refuse "a grace period not above preStop + shutdown grace" "terminationGracePeriodSeconds" \
  --set terminationGracePeriodSeconds=25

# The embedded pod's exact arguments, given to today's binary: it must start, pass both
# probes, and stop cleanly on SIGTERM.
if [[ -z "${BIN:-}" || ! -x "${BIN:-}" ]]; then
  echo "skip  smoke start (set BIN to the xsender-events binary)"
else
  smoke() {
    local dir="$OUT/smoke" args line port
    mkdir -p "$dir/config" "$dir/tenants" "$dir/data"
    "$VENV/bin/python" - "$OUT/embedded.yaml" "$dir" >"$dir/args" <<'EOF' || return 1
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
d = sys.argv[2]
open(f"{d}/config/config.toml", "w").write(next(x for x in docs if x["kind"] == "ConfigMap")["data"]["config.toml"])
c = next(x for x in docs if x["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
for a in c["args"]:
    print(a.replace("/etc/xsender-events/", d + "/").replace("/data", d + "/data"))
EOF
    printf '[tenants.acme]\napi_token = "smoke-test-read-token"\n' >"$dir/tenants/tenants.toml"
    mapfile -t args <"$dir/args"
    # Same arguments, on a free loopback port instead of the pod's 0.0.0.0:8080.
    XSENDER_ADMIN_TOKEN=smoke-test-admin-token "$BIN" "${args[@]}" --listen 127.0.0.1:0 2>"$dir/log" &
    SMOKE_PID=$!
    for _ in $(seq 1 100); do
      line=$(grep -m1 -o 'listening on http://[0-9.:]*' "$dir/log" || true)
      [[ -n "$line" ]] && break
      kill -0 "$SMOKE_PID" 2>/dev/null || break
      sleep 0.1
    done
    port=${line##*:}
    [[ -n "$port" ]] || { cat "$dir/log"; return 1; }
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null || return 1
    curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || return 1
    curl -fsS -H 'Authorization: Bearer smoke-test-admin-token' "http://127.0.0.1:$port/api/admin/tenants" \
      | grep -q acme || return 1
    kill -TERM "$SMOKE_PID"
    wait "$SMOKE_PID" || return 1
    SMOKE_PID=
    [[ -f "$dir/data/log.db" ]]
  }
  if smoke; then
    ok "smoke start: the embedded pod's arguments run today's binary (probes up, tenants file and admin token read, clean stop)"
  else
    bad "smoke start"; sed 's/^/      /' "$OUT/smoke/log" 2>/dev/null
  fi
fi

# The cluster pods' exact arguments (one Deployment per role), given to today's binary against
# the test Kafka and CQL nodes: topics and tables made as the README says, each role starts and
# is ready, ingress serves the admin API, the other roles refuse the APIs, all stop cleanly.
if [[ -z "${BIN:-}" || ! -x "${BIN:-}" || -z "${XSENDER_TEST_KAFKA:-}" || -z "${XSENDER_TEST_CQL:-}" ]]; then
  echo "skip  cluster smoke start (set BIN, XSENDER_TEST_KAFKA and XSENDER_TEST_CQL)"
else
  CLUSTER_PIDS=()
  cluster_smoke() {
    local dir="$OUT/cluster-smoke" ns="helmsmoke$$." ks="xs_helm_smoke_$$" role line port
    mkdir -p "$dir"
    local topo="$PWD/topology/local.toml"
    local set=(--set mode=cluster --set "kafka.brokers={$XSENDER_TEST_KAFKA}"
      --set "cql.nodes={$XSENDER_TEST_CQL}" --set "cql.keyspace=$ks" --set "kafka.namespace=$ns"
      --set tenants.existingSecret=xsender-events-tenants
      --set-json 'kafka.properties={"socket.keepalive.enable":true,"client.rack":"smoke"}')
    # One broker here: the single-broker topology, passed the chart's way for extra arguments.
    for role in ingress normalizer projector; do
      set+=(--set "$role.extraArgs={--kafka-topology,$topo}")
    done
    "$HELM" template xs "$CHART" --namespace mail "${set[@]}" >"$dir/cluster.yaml" || return 1
    # The librdkafka properties reach the pods' config file as a TOML table serve reads.
    grep -q '"client.rack" = "smoke"' "$dir/cluster.yaml" || { echo "kafka.properties not rendered"; return 1; }
    "$BIN" topology apply --kafka-brokers "$XSENDER_TEST_KAFKA" --kafka-topology "$topo" \
      --kafka-namespace "$ns" >"$dir/topology.log" 2>&1 || { cat "$dir/topology.log"; return 1; }
    "$BIN" migrate --cql-nodes "$XSENDER_TEST_CQL" --cql-keyspace "$ks" >"$dir/migrate.log" 2>&1 \
      || { cat "$dir/migrate.log"; return 1; }
    printf '[tenants.acme]\napi_token = "smoke-test-read-token"\n' >"$dir/tenants.toml"
    for role in ingress normalizer projector; do
      mkdir -p "$dir/$role/config" "$dir/$role/data"
      "$VENV/bin/python" - "$dir/cluster.yaml" "$dir/$role" "$role" "$dir/tenants.toml" >"$dir/$role/args" <<'PY' || return 1
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
d, role, tenants = sys.argv[2], sys.argv[3], sys.argv[4]
open(f"{d}/config/config.toml", "w").write(next(x for x in docs if x["kind"] == "ConfigMap")["data"]["config.toml"])
dep = next(x for x in docs if x["kind"] == "Deployment"
           and x["metadata"]["labels"]["app.kubernetes.io/component"] == role)
for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]:
    a = a.replace("/etc/xsender-events/tenants/tenants.toml", tenants)
    print(a.replace("/etc/xsender-events/", d + "/").replace("/data", d + "/data"))
PY
      mapfile -t args <"$dir/$role/args"
      grep -qx -- "$role" "$dir/$role/args" || { echo "no --role $role in its args"; return 1; }
      XSENDER_ADMIN_TOKEN=smoke-test-admin-token "$BIN" "${args[@]}" --listen 127.0.0.1:0 \
        2>"$dir/$role/log" &
      CLUSTER_PIDS+=($!)
      for _ in $(seq 1 300); do
        line=$(grep -m1 -o 'listening on http://[0-9.:]*' "$dir/$role/log" 2>/dev/null || true)
        [[ -n "$line" ]] && break
        kill -0 "${CLUSTER_PIDS[-1]}" 2>/dev/null || break
        sleep 0.1
      done
      port=${line##*:}
      [[ -n "$port" ]] || { echo "$role did not start:"; cat "$dir/$role/log"; return 1; }
      curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || return 1
      curl -fsS "http://127.0.0.1:$port/metrics" | grep -q xsender_stage_lag_records || return 1
      if [[ $role == ingress ]]; then
        curl -fsS -H 'Authorization: Bearer smoke-test-admin-token' \
          "http://127.0.0.1:$port/api/admin/tenants" | grep -q acme || return 1
      else
        curl -sS "http://127.0.0.1:$port/api/v1/contacts/a@example.com" | grep -q "$role role" || return 1
      fi
    done
    for pid in "${CLUSTER_PIDS[@]}"; do kill -TERM "$pid"; done
    for pid in "${CLUSTER_PIDS[@]}"; do wait "$pid" || return 1; done
    CLUSTER_PIDS=()
  }
  if cluster_smoke; then
    ok "cluster smoke start: each role's Deployment arguments run today's binary on Kafka + CQL (ready, /metrics, ingress admin API, other roles refuse the APIs, clean stop)"
  else
    bad "cluster smoke start"
    for r in ingress normalizer projector; do sed "s/^/      $r: /" "$OUT/cluster-smoke/$r/log" 2>/dev/null; done
  fi
  for pid in "${CLUSTER_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
fi

echo "helm: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
