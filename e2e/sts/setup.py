#!/usr/bin/env python3
"""Seed the ENFORCED moto with the e2e IAM users, switch IAM enforcement on, and
write the credential env files.

Run with the venv's python (e2e/scripts/sts-venv.sh) after both motos are up,
normally from e2e/scripts/sts-up.sh. Must run against a FRESH enforced moto:
the users are created with enforcement still off.

  * IAM user kube-sts-admin    - inline policy Allow * on *        -> .e2e/aws-admin.env
  * IAM user kube-sts-operator - inline policy Allow sts:* and
                                 ecr:GetAuthorizationToken          -> .e2e/aws.env

Enforcement: POST /moto-api/reset-auth with the bare body "0" (text/plain) sets
moto's INITIAL_NO_AUTH_ACTION_COUNT to 0 and its request counter to 0, so every
later request (count >= 0) has its SigV4 signature and IAM policies checked.
/moto-api/* itself is never checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config

ACCOUNT_ID = "123456789012"  # moto's default account
REGION = "us-east-1"
ADMIN_USER = "kube-sts-admin"
OPERATOR_USER = "kube-sts-operator"
OPERATOR_ARN = f"arn:aws:iam::{ACCOUNT_ID}:user/{OPERATOR_USER}"

ADMIN_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
OPERATOR_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": ["sts:*", "ecr:GetAuthorizationToken"], "Resource": "*"}
    ],
}


def post(url: str, body: bytes, ctype: str = "text/plain") -> str:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


def make_user(iam, name: str, policy: dict) -> tuple[str, str]:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-inline", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def write_env(path: Path, key_id: str, secret: str, urls: dict[str, str]) -> None:
    lines = {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": urls["proxy"],
        "AWS_ENDPOINT_URL_STS": urls["proxy"],
        "AWS_ACCOUNT_ID": ACCOUNT_ID,
        "KUBE_STS_OPERATOR_ARN": OPERATOR_ARN,
        "MOTO_URL": urls["enforced"],
        "MOTO_NOAUTH_URL": urls["noauth"],
    }
    for k, v in lines.items():
        # must stay parseable by make `include`, `set -a; . file` and a trivial KEY=VALUE parser
        if any(c in v for c in " \t\n'\"$`\\#"):
            raise SystemExit(f"refusing to write unsafe value for {k}: {v!r}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def main() -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description="seed moto IAM users and switch enforcement on")
    p.add_argument("--moto-url", default="http://127.0.0.1:15000", help="ENFORCED moto")
    p.add_argument("--noauth-url", default="http://127.0.0.1:15001", help="moto without enforcement")
    p.add_argument("--proxy-url", default="http://127.0.0.1:15002", help="routing proxy (what clients use)")
    p.add_argument("--out-dir", default=str(here.parent.parent / ".e2e"), help="where aws.env / aws-admin.env go")
    args = p.parse_args()
    urls = {"enforced": args.moto_url, "noauth": args.noauth_url, "proxy": args.proxy_url}

    # Any credentials work while enforcement is off; use explicit ones so the SDK
    # never falls back to the instance metadata endpoint.
    iam = boto3.client(
        "iam",
        endpoint_url=args.moto_url,
        region_name=REGION,
        aws_access_key_id="AKIASEEDSEEDSEEDSEED",
        aws_secret_access_key="seed",
        config=Config(retries={"max_attempts": 1}),
    )
    existing = {u["UserName"] for u in iam.list_users()["Users"]}
    if existing & {ADMIN_USER, OPERATOR_USER}:
        print(f"setup: users already exist in {args.moto_url}: restart moto for a fresh state", file=sys.stderr)
        return 1
    admin = make_user(iam, ADMIN_USER, ADMIN_POLICY)
    operator = make_user(iam, OPERATOR_USER, OPERATOR_POLICY)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_env(out / "aws-admin.env", *admin, urls)

    # Switch enforcement on: bare number, text/plain (a form-encoded body reaches moto empty -> 500).
    answer = json.loads(post(f"{args.moto_url}/moto-api/reset-auth", b"0"))
    if answer.get("status") != "ok":
        print(f"setup: reset-auth answered {answer}", file=sys.stderr)
        return 1

    # Verify through the proxy with the operator key before publishing aws.env
    # (its presence is what sts-up.sh treats as "seeded and enforced").
    sts = boto3.client(
        "sts",
        endpoint_url=args.proxy_url,
        region_name=REGION,
        aws_access_key_id=operator[0],
        aws_secret_access_key=operator[1],
        config=Config(retries={"max_attempts": 1}),
    )
    arn = sts.get_caller_identity()["Arn"]
    if arn != OPERATOR_ARN:
        print(f"setup: GetCallerIdentity returned {arn}, expected {OPERATOR_ARN}", file=sys.stderr)
        return 1
    write_env(out / "aws.env", *operator, urls)
    print(f"setup: users {ADMIN_USER}, {OPERATOR_USER} created; enforcement on; wrote {out}/aws.env, aws-admin.env", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
