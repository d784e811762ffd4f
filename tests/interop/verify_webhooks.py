"""Verifies Standard Webhooks signatures with the reference Python package `standardwebhooks`.

stdin: a JSON list of {"secret", "headers", "body"}; stdout: a JSON list with "ok" or the
verification error for each, in order.
"""
import json
import sys

from standardwebhooks import Webhook

out = []
for case in json.load(sys.stdin):
    try:
        Webhook(case["secret"]).verify(case["body"], case["headers"])
        out.append("ok")
    except Exception as e:  # noqa: BLE001 - report every failure to the Rust side
        out.append(f"{type(e).__name__}: {e}")
print(json.dumps(out))
