#!/usr/bin/env python3
"""Independent check of nexus payloads with fastavro (used by tests/avro_interop.rs).

Usage: decode.py <dir>

For every <Type>.avsc / <Type>.bin pair in <dir> (a composed wire schema and a nexus single-object
payload): parse the schema with fastavro, compute its CRC-64-AVRO fingerprint from fastavro's own
Parsing Canonical Form, check the payload's marker and fingerprint bytes, decode the body with
schemaless_reader (which must consume every byte), and re-encode the datum with fastavro as a
single-object payload <Type>.py.bin for nexus to decode. Also writes hand_built.bin: a
MessageReceived built here from scratch. Prints {"<Type>": <decoded datum as JSON>} on stdout.
Exits non-zero on any mismatch; a missing fastavro is an error, never a skip.
"""
import base64
import datetime
import io
import json
import os
import sys
import uuid

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

MARKER = b"\xc3\x01"


def to_json(v):
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [to_json(x) for x in v]
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, datetime.datetime):
        return int(round(v.timestamp() * 1000))
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    return v


def single_object(parsed, raw_schema, datum):
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(raw_schema), "CRC-64-AVRO"))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, datum)
    return MARKER + fp + buf.getvalue()


def main(d):
    out = {}
    failures = []
    for name in sorted(os.listdir(d)):
        if not name.endswith(".avsc"):
            continue
        t = name[: -len(".avsc")]
        with open(os.path.join(d, name)) as fh:
            raw = json.load(fh)
        parsed = parse_schema(raw)
        expected_fp = fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO")
        with open(os.path.join(d, t + ".bin"), "rb") as fh:
            payload = fh.read()
        if payload[:2] != MARKER:
            failures.append(f"{t}: bad marker {payload[:2].hex()}")
            continue
        if payload[2:10].hex() != expected_fp:
            failures.append(f"{t}: fingerprint {payload[2:10].hex()} != fastavro {expected_fp}")
            continue
        body = io.BytesIO(payload[10:])
        datum = fastavro.schemaless_reader(body, parsed, None)
        rest = body.read()
        if rest:
            failures.append(f"{t}: {len(rest)} bytes left after the body")
            continue
        out[t] = to_json(datum)
        with open(os.path.join(d, t + ".py.bin"), "wb") as fh:
            fh.write(single_object(parsed, raw, datum))
        if t == "MessageReceived":
            hand = {
                "envelope": {
                    "event_id": uuid.UUID("0190f5e2-7c1a-7d3e-9a41-5b8c2d9e0f99"),
                    "event_type": "MessageReceived",
                    "tenant_id": "tenant-py",
                    "conversation_id": "conv-py-1",
                    "occurred_at": datetime.datetime(2024, 11, 25, 12, 0, tzinfo=datetime.timezone.utc),
                    "traceparent": None,
                    "producer": "python/fastavro",
                },
                "message_id": uuid.UUID("0190f5e2-7c1a-7d3e-9a41-5b8c2d9e0f98"),
                "client_message_id": None,
                "channel": "SMS",
                "channel_id": None,
                "participant_id": "p-sms-1",
                "participant_kind": "CUSTOMER",
                "nickname": None,
                "contact": {"first_name": None, "last_name": None, "email_address": None, "phone_number": "+15550001111"},
                "kind": "TEXT",
                "text": "STOP",
                "media_ids": [],
                "sent_at": None,
                "transcript_position": 3,
            }
            with open(os.path.join(d, "hand_built.bin"), "wb") as fh:
                fh.write(single_object(parsed, raw, hand))
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
