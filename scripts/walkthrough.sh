#!/usr/bin/env bash
# The README's walk-through, executable: a signed SendGrid batch in with curl, the recipients
# read back. Run by scripts/test.sh so the README's commands cannot rot. Needs openssl, curl,
# python3 and a built binary (BIN, default: the release build in CARGO_TARGET_DIR).
set -euo pipefail
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/xsender-events}
PORT=${PORT:-18080}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"

# 1. A P-256 key pair standing in for SendGrid's; SendGrid shows you only the public half.
openssl ecparam -name prime256v1 -genkey -noout -out sendgrid-demo.pem
KEY=$(openssl ec -in sendgrid-demo.pem -pubout -outform DER 2>/dev/null | base64 -w0)
cat > tenants.toml <<EOF
[tenants.acme]
api_token = "acme-read-token-change-me"

[tenants.acme.sendgrid]
verification_key = "$KEY"
EOF

# 2. Serve (the data folder ./data is created on first start). With WALKTHROUGH_CQL_KEYSPACE
# set, projections go to that keyspace on a CQL node instead (XSENDER_CQL_NODES, default
# 127.0.0.1:9042), after `migrate` creates its schema.
store=()
if [ -n "${WALKTHROUGH_CQL_KEYSPACE:-}" ]; then
  store=(--projections cql --cql-keyspace "$WALKTHROUGH_CQL_KEYSPACE")
  "$BIN" migrate --cql-keyspace "$WALKTHROUGH_CQL_KEYSPACE"
fi
# With WALKTHROUGH_KAFKA_NAMESPACE set, the log is on Kafka (XSENDER_KAFKA_BROKERS, default
# 127.0.0.1:9092; one broker, so topology/local.toml) after `topology apply` creates the topics.
log=()
if [ -n "${WALKTHROUGH_KAFKA_NAMESPACE:-}" ]; then
  log=(--kafka-brokers "${XSENDER_KAFKA_BROKERS:-127.0.0.1:9092}"
    --kafka-topology "$ROOT/topology/local.toml" --kafka-namespace "$WALKTHROUGH_KAFKA_NAMESPACE")
  "$BIN" topology apply "${log[@]}"
fi
"$BIN" serve --listen "127.0.0.1:$PORT" "${store[@]}" "${log[@]}" 2>serve.log &
pid=$!
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

# 3. A batch as SendGrid posts it, signed over timestamp + exact body.
cat > batch.json <<'EOF'
[{"email":"alice@example.com","timestamp":1764750003,"event":"delivered","sg_message_id":"M1.filter0001","xs_campaign":"spring","xs_dispatch":"d-1"},
{"email":"alice@example.com","timestamp":1764750060,"event":"open","sg_machine_open":false,"sg_message_id":"M1.filter0001","xs_campaign":"spring","xs_dispatch":"d-1"},
{"email":"alice@example.com","timestamp":1764750090,"event":"click","url":"https://example.com/sale","sg_message_id":"M1.filter0001","xs_campaign":"spring","xs_dispatch":"d-1"},
{"email":"bob@example.com","timestamp":1764750004,"event":"bounce","type":"bounce","reason":"550 5.1.1 no such user","status":"5.1.1","sg_message_id":"M2.filter0001","xs_campaign":"spring","xs_dispatch":"d-2"},
{"email":"carol@example.com","timestamp":1764750900,"event":"spamreport","sg_message_id":"M3.filter0001","xs_campaign":"spring","xs_dispatch":"d-3"},
{"email":"dave@example.com","timestamp":1764750300,"event":"unsubscribe","sg_message_id":"M4.filter0001","xs_campaign":"spring","xs_dispatch":"d-4"}]
EOF
TS=$(date +%s)
SIG=$(cat <(printf '%s' "$TS") batch.json | openssl dgst -sha256 -sign sendgrid-demo.pem | base64 -w0)
curl -sS -X POST "http://127.0.0.1:$PORT/api/webhook/email/sendgrid" \
  -H 'Content-Type: application/json' \
  -H "X-Twilio-Email-Event-Webhook-Timestamp: $TS" \
  -H "X-Twilio-Email-Event-Webhook-Signature: $SIG" \
  --data-binary @batch.json | tee accepted.json
accepted_ns=$(date +%s%N)
echo

# 4. Read the recipients back (visible within a second; the time is printed, the benchmarks
#    measure it under load: BENCHMARKS.md).
for _ in $(seq 50); do
  curl -sS -H 'Authorization: Bearer acme-read-token-change-me' \
    "http://127.0.0.1:$PORT/api/v1/campaigns/spring/recipients" > recipients.json
  python3 -c 'import json,sys; sys.exit(0 if len(json.load(open("recipients.json"))["items"]) == 4 else 1)' && break
  sleep 0.1
done
echo "walkthrough: rows visible $(( ($(date +%s%N) - accepted_ns) / 1000000 )) ms after the 2xx"
python3 - <<'EOF'
import json
rows = {r["dispatch_id"]: r for r in json.load(open("recipients.json"))["items"]}
want = {"d-1": "Delivered", "d-2": "Bounced", "d-3": "Complained", "d-4": "Delivered"}
got = {k: v["status"] for k, v in rows.items()}
assert got == want, got
a = rows["d-1"]
assert (a["opens"], a["clicks"], a["last_click_url"]) == (1, 1, "https://example.com/sale"), a
print("walkthrough: 1 passed, 0 failed")
EOF
curl -sS -H 'Authorization: Bearer acme-read-token-change-me' "http://127.0.0.1:$PORT/api/v1/suppressions" | python3 -c 'import json,sys; r=[(i["email"],i["reason"]) for i in json.load(sys.stdin)["items"]]; assert r==[("bob@example.com","hard_bounce"),("carol@example.com","complaint"),("dave@example.com","unsubscribe")], r'
