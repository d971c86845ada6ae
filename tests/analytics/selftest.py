#!/usr/bin/env python3
"""Self-check of consume.py against a real broker (run by selftest.sh).

Produces records the way the contract says (fastavro datums, fingerprint and name headers; in
registry mode the Confluent wire format with a small local registry), then runs consume.py and
checks its output and exit codes: round trip of both schemas, a wrong fingerprint header (1), a
truncated datum (1), a registry schema that is no local .avsc (1), a missing topic (2).
"""

import base64
import io
import json
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from fastavro import schemaless_writer
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE.parent.parent / "schemas"
BROKERS = sys.argv[1]


def load(name):
    raw = json.loads((SCHEMAS / name).read_text())
    fp = fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO")
    return raw, parse_schema(raw, named_schemas={}), fp


DELIVERY_RAW, DELIVERY, DELIVERY_FP = load("delivery_event.avsc")
RAW_RAW, RAW, RAW_FP = load("raw_envelope.avsc")
DELIVERY_NAME = "com.xsender.events.v1.DeliveryEvent"
RAW_NAME = "com.xsender.events.v1.RawEnvelope"


def datum(schema, record):
    buf = io.BytesIO()
    schemaless_writer(buf, schema, record)
    return buf.getvalue()


def event(i, **over):
    e = {
        "event_key": f"ek-{i}", "tenant": "acme", "provider": "sendgrid",
        "kind": ["Delivered", "Bounced", "Opened", "Other"][i % 4],
        "dispatch_key": f"d:disp-{i}", "dispatch_id": f"disp-{i}", "campaign_id": None,
        "message_id": "m-1", "recipient": f"r{i}@example.com", "occurred_at_ms": 1764750003000 + i,
        "received_at_ms": 1764750004000, "envelope_id": "env-1", "provider_event": "delivered",
        "provider_event_id": None, "bounce_class": "Hard" if i % 4 == 1 else None,
        "reason": "ünïcode ✓" if i == 2 else None, "smtp_status": None, "url": None,
        "user_agent": None, "ip": None, "machine": i % 2 == 0, "group_id": None,
        "trace_parent": None,
    }
    e.update(over)
    return e


def envelope(i):
    return {
        "id": f"{i:032x}", "provider": "ses", "received_at_ms": 1764750004000 + i,
        "verified_tenants": ["acme", "globex"], "default_tenant": None,
        "content_type": "application/json", "body": bytes([0, 1, 2, 255]) + b'{"x":1}',
        "trace_parent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }


def create(topic, partitions=3):
    admin = AdminClient({"bootstrap.servers": BROKERS})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)


def produce(topic, records):
    p = Producer({"bootstrap.servers": BROKERS, "acks": "all"})
    for key, value, headers, partition in records:
        p.produce(topic, value=value, key=key, headers=headers, partition=partition)
    assert p.flush(30) == 0


def headers(fp, name):
    return [("xsender-schema-fingerprint", fp.encode()), ("xsender-schema", name.encode())]


def consume(topic, *extra):
    cmd = [sys.executable, str(HERE / "consume.py"), "--brokers", BROKERS, "--topic", topic,
           "--schemas", str(SCHEMAS), "--timeout", "60", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print(f"  exit {r.returncode}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    return r


def expect(cond, what, r=None):
    if not cond:
        if r is not None:
            print(r.stdout[-2000:], r.stderr[-2000:], sep="\n", file=sys.stderr)
        sys.exit(f"FAILED: {what}")


def check_round_trip(r, sent):
    expect(r.returncode == 0, "exit 0", r)
    got = [json.loads(line) for line in r.stdout.splitlines()]
    expect(len(got) == len(sent), f"{len(sent)} records, got {len(got)}", r)
    by_key = {g["_key"]: g for g in got}
    for key, schema_name, record, partition in sent:
        g = dict(by_key[key])
        expect(g.pop("_partition") == partition, f"partition of {key}", r)
        expect(isinstance(g.pop("_offset"), int), f"offset of {key}", r)
        g.pop("_key")
        want = dict(record)
        if "body" in want:
            want["body"] = base64.b64encode(want["body"]).decode()
        expect(g == want, f"{key} round-trips: {g} != {want}", r)


def registry(schemas_by_id):
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            sid = self.path.rsplit("/", 1)[-1]
            if self.path.startswith("/schemas/ids/") and sid in schemas_by_id:
                body = json.dumps({"schema": json.dumps(schemas_by_id[sid])}).encode()
                self.send_response(200)
            else:
                body = b'{"error_code":40403,"message":"Schema not found"}'
                self.send_response(404)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_port}"


def main():
    run = uuid.uuid4().hex[:8]

    print("plain datums, both schemas, one partition left empty")
    topic = f"selftest-plain-{run}"
    create(topic)
    sent, recs = [], []
    for i in range(5):
        e = event(i)
        sent.append((f"acme/d:disp-{i}", DELIVERY_NAME, e, i % 2))
        recs.append((f"acme/d:disp-{i}", datum(DELIVERY, e), headers(DELIVERY_FP, DELIVERY_NAME), i % 2))
    for i in range(2):
        r = envelope(i)
        sent.append((f"env-{i}", RAW_NAME, r, 1))
        recs.append((f"env-{i}", datum(RAW, r), headers(RAW_FP, RAW_NAME), 1))
    produce(topic, recs)
    check_round_trip(consume(topic), sent)

    print("wrong fingerprint header -> exit 1")
    topic = f"selftest-badfp-{run}"
    create(topic, 1)
    good = datum(DELIVERY, event(0))
    produce(topic, [("k0", good, headers(DELIVERY_FP, DELIVERY_NAME), 0),
                    ("k1", good, headers("0123456789abcdef", DELIVERY_NAME), 0)])
    r = consume(topic)
    expect(r.returncode == 1 and "offset 1" in r.stderr and "fingerprint" in r.stderr, "exit 1 at offset 1", r)

    print("byte-swapped fingerprint header -> exit 1")
    topic = f"selftest-swapped-{run}"
    create(topic, 1)
    swapped = bytes.fromhex(DELIVERY_FP)[::-1].hex()
    produce(topic, [("k0", good, headers(swapped, DELIVERY_NAME), 0)])
    r = consume(topic)
    expect(r.returncode == 1 and "offset 0" in r.stderr, "exit 1 at offset 0", r)

    print("truncated datum -> exit 1")
    topic = f"selftest-trunc-{run}"
    create(topic, 1)
    produce(topic, [("k0", good[:-3], headers(DELIVERY_FP, DELIVERY_NAME), 0)])
    r = consume(topic)
    expect(r.returncode == 1 and "offset 0" in r.stderr, "exit 1 at offset 0", r)

    print("missing topic -> exit 2")
    r = consume(f"selftest-missing-{run}")
    expect(r.returncode == 2, "exit 2", r)

    print("schema registry wire format")
    other = json.loads(json.dumps(DELIVERY_RAW))
    other["fields"].append({"name": "extra", "type": "string", "default": ""})
    srv, url = registry({"1": DELIVERY_RAW, "2": RAW_RAW, "3": other})
    topic = f"selftest-registry-{run}"
    create(topic, 2)
    wire = lambda sid, body: b"\x00" + sid.to_bytes(4, "big") + body  # noqa: E731
    e, env = event(7), envelope(9)
    produce(topic, [("a", wire(1, datum(DELIVERY, e)), headers(DELIVERY_FP, DELIVERY_NAME), 0),
                    ("b", wire(2, datum(RAW, env)), headers(RAW_FP, RAW_NAME), 1)])
    check_round_trip(consume(topic, "--registry", url),
                     [("a", DELIVERY_NAME, e, 0), ("b", RAW_NAME, env, 1)])

    print("registry mode on plain datums -> exit 1")
    r = consume(f"selftest-plain-{run}", "--registry", url)
    expect(r.returncode == 1, "exit 1", r)

    print("registry schema that is no local .avsc -> exit 1")
    topic = f"selftest-regother-{run}"
    create(topic, 1)
    produce(topic, [("c", wire(3, datum(DELIVERY, e)), headers(DELIVERY_FP, DELIVERY_NAME), 0)])
    r = consume(topic, "--registry", url)
    expect(r.returncode == 1 and "matches no local" in r.stderr, "exit 1, no local schema", r)
    srv.shutdown()
    print("selftest passed")


if __name__ == "__main__":
    main()
