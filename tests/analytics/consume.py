#!/usr/bin/env python3
"""An analytics consumer written only from the topic contract and schemas/*.avsc.

It proves that a team with nothing but the .avsc files (no code of ours) can read the event
topics: every record of every partition, from the beginning to the end, decoded with the
confluent-kafka client and fastavro.

The contract of a record's value:
  * without a schema registry: the plain Avro binary datum of one of the schemas;
  * with a schema registry (--registry URL): the Confluent wire format, byte 0x00, the schema
    id as 4 bytes big-endian, then the Avro binary datum. The id is looked up with
    GET {URL}/schemas/ids/{id}, and the schema found there must have the Parsing Canonical Form
    of one of the local .avsc files (it is then decoded with that local file).
In both modes the record carries the headers
  * xsender-schema-fingerprint: 16 lowercase hex digits, the 8 bytes little-endian of the
    CRC-64-AVRO (Rabin) fingerprint of the schema's Parsing Canonical Form (the same 8 bytes
    that Avro's single-object encoding puts after C3 01);
  * xsender-schema: the schema's full name, e.g. com.xsender.events.v1.DeliveryEvent.

Output: one JSON object per record on stdout (the decoded datum: enums as their symbol, bytes
as base64, plus "_partition", "_offset" and "_key"), then one summary line on stderr.

Exit codes: 0 all records decoded; 1 a record could not be decoded or broke the contract (its
partition, offset and the reason on stderr); 2 the topic does not exist; 3 the end of every
partition was not reached within --timeout; 4 bad arguments or schema files.
"""

import argparse
import base64
import io
import json
import struct
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, OFFSET_BEGINNING
from fastavro import schemaless_reader
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

FINGERPRINT_HEADER = "xsender-schema-fingerprint"
NAME_HEADER = "xsender-schema"


class BadRecord(Exception):
    pass


class Schema:
    def __init__(self, path, raw):
        self.path = path
        self.canonical = to_parsing_canonical_form(raw)
        # fastavro's CRC-64-AVRO hex is already the little-endian byte order of the contract.
        self.fingerprint = fingerprint(self.canonical, "CRC-64-AVRO")
        self.parsed = parse_schema(raw, named_schemas={})
        self.name = self.parsed["name"]


def check_fingerprint_order():
    # The Avro specification's test vector: CRC-64-AVRO of "null" is the 64-bit value
    # 7195948357588979594; its 8 bytes little-endian must be what fastavro prints.
    expected = struct.pack("<q", 7195948357588979594).hex()
    got = fingerprint('"null"', "CRC-64-AVRO")
    if got != expected:
        sys.exit(f"consume.py: fastavro's CRC-64-AVRO gives {got} for \"null\", expected {expected}")


def load_schemas(directory):
    schemas = {}
    for path in sorted(Path(directory).glob("*.avsc")):
        with open(path, encoding="utf-8") as f:
            schema = Schema(path, json.load(f))
        schemas[schema.fingerprint] = schema
    if not schemas:
        print(f"consume.py: no .avsc files in {directory}", file=sys.stderr)
        sys.exit(4)
    return schemas


def to_json(value):
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    return value


class Registry:
    def __init__(self, url, schemas):
        self.url = url.rstrip("/")
        self.by_canonical = {s.canonical: s for s in schemas.values()}
        self.cache = {}

    def schema(self, schema_id):
        if schema_id not in self.cache:
            url = f"{self.url}/schemas/ids/{schema_id}"
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    body = json.load(resp)
                canonical = to_parsing_canonical_form(json.loads(body["schema"]))
            except Exception as e:  # noqa: BLE001 - any failure is a record we cannot read
                raise BadRecord(f"schema id {schema_id}: GET {url} failed: {e}") from e
            local = self.by_canonical.get(canonical)
            if local is None:
                raise BadRecord(
                    f"schema id {schema_id} from the registry matches no local .avsc file "
                    f"(canonical form {canonical[:200]})"
                )
            self.cache[schema_id] = local
        return self.cache[schema_id]


def header(msg, name):
    values = [v for k, v in (msg.headers() or []) if k == name]
    if len(values) != 1:
        raise BadRecord(f"expected one {name} header, found {len(values)}")
    try:
        return (values[0] or b"").decode("ascii")
    except UnicodeDecodeError as e:
        raise BadRecord(f"{name} header is not ASCII") from e


def decode(msg, schemas, registry):
    fp = header(msg, FINGERPRINT_HEADER)
    schema = schemas.get(fp)
    if schema is None:
        raise BadRecord(f"unknown schema fingerprint {fp!r} (known: {', '.join(schemas)})")
    name = header(msg, NAME_HEADER)
    if name != schema.name:
        raise BadRecord(f"{NAME_HEADER} header {name!r} but the fingerprint is {schema.name}'s")
    value = msg.value()
    if value is None:
        raise BadRecord("no value (tombstone)")
    if registry is not None:
        if len(value) < 5 or value[0] != 0:
            raise BadRecord("value is not in the schema registry wire format (0x00, 4-byte id)")
        (schema_id,) = struct.unpack(">I", value[1:5])
        registered = registry.schema(schema_id)
        if registered is not schema:
            raise BadRecord(
                f"schema id {schema_id} is {registered.name} ({registered.fingerprint}) "
                f"but the header says {schema.fingerprint}"
            )
        value = value[5:]
    buf = io.BytesIO(value)
    try:
        datum = schemaless_reader(buf, schema.parsed, None)
    except Exception as e:  # noqa: BLE001 - fastavro raises many kinds on bad input
        raise BadRecord(f"not a {schema.name} datum: {type(e).__name__}: {e}") from e
    if buf.tell() != len(value):
        raise BadRecord(
            f"{len(value) - buf.tell()} bytes left after a {schema.name} datum of {buf.tell()}"
        )
    key = msg.key()
    try:
        key = None if key is None else key.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("key is not UTF-8") from e
    out = to_json(datum)
    out["_partition"] = msg.partition()
    out["_offset"] = msg.offset()
    out["_key"] = key
    return schema, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--schemas", required=True, help="folder of the .avsc files")
    ap.add_argument("--registry", help="schema registry URL (values in its wire format)")
    ap.add_argument("--group", default=f"xsender-analytics-{uuid.uuid4().hex}")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to reach the end")
    args = ap.parse_args()

    check_fingerprint_order()
    schemas = load_schemas(args.schemas)
    registry = Registry(args.registry, schemas) if args.registry else None
    deadline = time.monotonic() + args.timeout

    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "allow.auto.create.topics": False,
        }
    )
    try:
        md = consumer.list_topics(args.topic, timeout=max(1.0, args.timeout))
        t = md.topics.get(args.topic)
        if t is None or t.error is not None:
            reason = t.error if t is not None else "not in metadata"
            print(f"consume.py: topic {args.topic} does not exist ({reason})", file=sys.stderr)
            return 2

        assigned = set()
        at_end = set()

        def on_assign(c, partitions):
            # From the beginning, whatever this group may have committed before.
            for p in partitions:
                p.offset = OFFSET_BEGINNING
            assigned.update(p.partition for p in partitions)
            c.assign(partitions)

        consumer.subscribe([args.topic], on_assign=on_assign)
        counts = {}
        total = 0
        while not (assigned and at_end >= assigned and len(assigned) == len(t.partitions)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                print(
                    f"consume.py: end of {args.topic} not reached within {args.timeout}s "
                    f"(assigned {sorted(assigned)} of {len(t.partitions)} partitions, "
                    f"at end: {sorted(at_end)}; {total} records read)",
                    file=sys.stderr,
                )
                return 3
            msg = consumer.poll(min(1.0, remaining))
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                    continue
                if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    print(f"consume.py: topic {args.topic} does not exist ({err})", file=sys.stderr)
                    return 2
                if err.fatal():
                    print(f"consume.py: fatal consumer error: {err}", file=sys.stderr)
                    return 1
                print(f"consume.py: (retrying) {err}", file=sys.stderr)
                continue
            at_end.discard(msg.partition())
            try:
                schema, out = decode(msg, schemas, registry)
            except BadRecord as e:
                print(
                    f"consume.py: record at partition {msg.partition()} offset {msg.offset()} "
                    f"of {args.topic}: {e}",
                    file=sys.stderr,
                )
                return 1
            print(json.dumps(out, ensure_ascii=False))
            counts[schema.name] = counts.get(schema.name, 0) + 1
            total += 1
        by_schema = ", ".join(f"{n} {c}" for n, c in sorted(counts.items())) or "none"
        mode = f"registry {args.registry}" if registry else "plain Avro datums"
        print(
            f"consume.py: {total} records decoded from all {len(assigned)} partitions of "
            f"{args.topic} ({mode}; by schema: {by_schema})",
            file=sys.stderr,
        )
        return 0
    finally:
        sys.stdout.flush()
        consumer.close()


if __name__ == "__main__":
    sys.exit(main())
