#!/usr/bin/env python3
"""Independent reader of a TCG Canonical Event Log in the JSON encoding.

Written from the CEL specification, not from umbra's encoder: it validates the log
against cel-json.schema.json (python-jsonschema), checks that recnums count up from
0, that each PCCLIENT_STD event whose event type extends its data (EV_EVENT_TAG and
the other measured types) has SHA-256(event_data) as its sha256 digest, and replays
every PCR's SHA-256 bank from zero. It prints the replayed PCRs as JSON and, given
--pcr N --expect HEX, exits 1 unless PCR N replays to HEX.

Exit status: 0 ok, 1 the log is not valid CEL-JSON or does not replay, 2 usage,
3 python-jsonschema is not installed.
"""
import argparse
import hashlib
import json
import os
import sys

EV_NO_ACTION = 0x00000003
EV_EVENT_TAG = 0x00000006
EVENT_TYPE_NAMES = {"ev_no_action": EV_NO_ACTION, "ev_event_tag": EV_EVENT_TAG}


def fail(msg):
    print("celjson_check: " + msg, file=sys.stderr)
    sys.exit(1)


def event_type(v):
    if isinstance(v, int):
        return v
    if v.lower() in EVENT_TYPE_NAMES:
        return EVENT_TYPE_NAMES[v.lower()]
    fail("unknown PC Client event type %r" % v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--pcr", type=int)
    ap.add_argument("--expect")
    a = ap.parse_args()
    try:
        import jsonschema
    except ImportError:
        print("celjson_check: python-jsonschema is not installed", file=sys.stderr)
        sys.exit(3)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "cel-json.schema.json")) as f:
        schema = json.load(f)

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            fail("duplicate key in %r" % keys)
        return dict(pairs)

    try:
        with open(a.log) as f:
            log = json.load(f, object_pairs_hook=no_duplicates)
    except ValueError as e:
        fail("not JSON: %s" % e)
    try:
        jsonschema.validate(log, schema)
    except jsonschema.ValidationError as e:
        fail("not CEL-JSON: %s at %s" % (e.message, list(e.absolute_path)))

    pcrs = {}
    for i, rec in enumerate(log):
        if rec["recnum"] != i:
            fail("record %d has recnum %d" % (i, rec["recnum"]))
        if "pcr" not in rec:
            continue
        sha256 = [d["digest"] for d in rec["digests"] if d["hashAlg"] == "sha256"]
        if len(sha256) != 1 or len(sha256[0]) != 64:
            fail("record %d: want one sha256 digest" % i)
        digest = bytes.fromhex(sha256[0])
        if rec["content_type"] == "pcclient_std":
            et = event_type(rec["content"]["event_type"])
            if et == EV_NO_ACTION:
                continue  # not extended
            data = bytes.fromhex(rec["content"]["event_data"])
            if et == EV_EVENT_TAG and hashlib.sha256(data).digest() != digest:
                fail("record %d: the sha256 digest is not SHA-256 of the event data" % i)
        cur = pcrs.get(rec["pcr"], bytes(32))
        pcrs[rec["pcr"]] = hashlib.sha256(cur + digest).digest()

    out = {str(k): v.hex() for k, v in sorted(pcrs.items())}
    print(json.dumps({"records": len(log), "pcrs": out}))
    if a.pcr is not None:
        got = out.get(str(a.pcr), "00" * 32)
        if got != (a.expect or "").lower():
            fail("PCR %d replays to %s, not %s" % (a.pcr, got, a.expect))


if __name__ == "__main__":
    main()
