#!/usr/bin/env python3
"""A long-running boto3 workload for the rotation soak test.

One boto3 STS client for the whole run, as a service would keep it, calls GetCallerIdentity
every --interval seconds until stdin closes (or --seconds pass). Credentials come from the
standard chain: the test points AWS_CONFIG_FILE at a projected Secret whose profile runs
`credential_process = cat <mountPath>/credentials.json`, so boto3 itself decides when to run
it again. One JSON line per call on stdout:
{"t": <epoch seconds>, "ok": true, "arn": "..."} or {"t": ..., "ok": false, "error": "..."}.
"""

from __future__ import annotations

import argparse
import json
import select
import sys
import time

import boto3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=3600.0)
    args = p.parse_args()
    client = boto3.client("sts")
    end = time.time() + args.seconds
    while time.time() < end:
        started = time.time()
        try:
            arn = client.get_caller_identity()["Arn"]
            line = {"t": started, "ok": True, "arn": arn}
        except Exception as e:  # noqa: BLE001 - every failure is reported, none ends the run
            line = {"t": started, "ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        wait = max(0.0, args.interval - (time.time() - started))
        # Stop as soon as the test closes stdin.
        ready, _, _ = select.select([sys.stdin], [], [], wait)
        if ready and not sys.stdin.read(1):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
