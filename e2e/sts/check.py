#!/usr/bin/env python3
"""Self-check of the local STS peer (run after e2e/scripts/sts-up.sh, with the
venv's python). Prints one line per check -- PASS / FAIL, plus INFO lines that
document moto behaviour tests must NOT rely on -- and exits 1 on any FAIL.

The helpers (load_env, client, recorder_*, recorded_calls) are importable by tests.

Notes on the peer (moto 5.2.5), verified by the checks below:
  * enforcement: POST /moto-api/reset-auth, body "0" (text/plain) -> every
    request is SigV4-verified and checked against identity policies; /moto-api/* never is.
  * errors: wrong secret -> SignatureDoesNotMatch (403); unknown key id ->
    InvalidClientTokenId (403); policy/trust refusal -> AccessDenied (403).
  * sts:GetCallerIdentity is always allowed (no role policy needed).
  * the trust policy is only evaluated for sts:AssumeRole on a role that EXISTS;
    sts:TagSession is never evaluated; session tags are accepted and ignored
    (visible only in the recorder).
  * recorder: /moto-api/recorder/{reset,start,stop,download,upload,replay}-recording,
    any HTTP method; download = JSON lines {"headers","method","url","body","body_encoded"},
    body base64 when body_encoded. Recorded BEFORE auth, so refused calls appear too.
    The recorder is process-global: one recording per moto at a time.
  * ECR errors come back as an XML query-style body (Content-Type text/html), so
    JSON-protocol SDKs see only HTTP 403, not the code AccessDenied.
  * trust-policy quirks (INFO lines): AssumeRole of a non-existent role succeeds;
    Principal "...:root" is refused; a Principal string that CONTAINS the caller ARN
    matches (substring test); a Deny statement in a trust policy allows;
    Principal "*" as a bare string or a Service-only Principal -> HTTP 500;
    a condition on an absent key (no ExternalId sent) passes.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

REPO = Path(__file__).resolve().parent.parent.parent


# --------------------------------------------------------------------------- helpers
def load_env(path: Path | str) -> dict[str, str]:
    """Parse a KEY=VALUE env file written by setup.py."""
    env: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    return env


def client(service: str, env: dict[str, str], key_id: str | None = None, secret: str | None = None,
           token: str | None = None, unsigned: bool = False, endpoint: str | None = None):
    cfg = Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30,
                 signature_version=UNSIGNED if unsigned else None)
    kw = {}
    if not unsigned:
        kw = dict(aws_access_key_id=key_id or env["AWS_ACCESS_KEY_ID"],
                  aws_secret_access_key=secret or env["AWS_SECRET_ACCESS_KEY"],
                  aws_session_token=token)
    return boto3.client(service, endpoint_url=endpoint or env["AWS_ENDPOINT_URL"],
                        region_name=env["AWS_REGION"], config=cfg, **kw)


def creds_client(service: str, env: dict[str, str], creds: dict):
    return client(service, env, creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"])


def moto_api(base_url: str, path: str, body: bytes | None = None) -> str:
    req = urllib.request.Request(f"{base_url}/moto-api/{path}", data=body if body is not None else b"",
                                 method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


def recorder_start(base_url: str) -> None:
    """Empty the recording and start recording (process-global on that moto)."""
    moto_api(base_url, "recorder/reset-recording")
    moto_api(base_url, "recorder/start-recording")


def recorder_stop(base_url: str) -> None:
    moto_api(base_url, "recorder/stop-recording")


def recorded_calls(base_url: str) -> list[dict]:
    """Download the recording; each entry gets 'params' (query + form body, first values)."""
    out = []
    for line in moto_api(base_url, "recorder/download-recording").splitlines():
        if not line.strip():
            continue
        e = json.loads(line)
        body = e.get("body") or ""
        if e.get("body_encoded"):
            body = base64.b64decode(body).decode("utf-8", "replace")
        e["body_text"] = body
        params = {k: v[0] for k, v in parse_qs(urlsplit(e.get("url", "")).query).items()}
        ctype = next((v for k, v in e.get("headers", {}).items() if k.lower() == "content-type"), "")
        if "x-www-form-urlencoded" in ctype:
            params.update({k: v[0] for k, v in parse_qs(body).items()})
        e["params"] = params
        out.append(e)
    return out


def error_code(fn) -> tuple[str | None, int | None]:
    try:
        fn()
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"].get("HTTPStatusCode")
    return None, None


def trust(principal, actions=("sts:AssumeRole",), condition=None) -> str:
    st = {"Effect": "Allow", "Principal": {"AWS": principal}, "Action": list(actions)}
    if condition:
        st["Condition"] = condition
    return json.dumps({"Version": "2012-10-17", "Statement": [st]})


def allow(*actions) -> str:
    return json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": "*"}]})


# --------------------------------------------------------------------------- checks
class Checker:
    def __init__(self, op: dict[str, str], admin: dict[str, str]):
        self.op, self.admin = op, admin
        self.failed = 0
        self.sfx = uuid.uuid4().hex[:8]
        self.account = op["AWS_ACCOUNT_ID"]
        self.op_arn = op["KUBE_STS_OPERATOR_ARN"]
        self.iam = client("iam", admin)
        self.sts_op = client("sts", op)

    def line(self, status: str, name: str, detail: str) -> None:
        print(f"{status:4} {name}: {detail}", flush=True)
        if status == "FAIL":
            self.failed += 1

    def run(self, name: str, fn) -> None:
        t = time.monotonic()
        try:
            detail = fn()
            self.line("PASS", name, f"{detail} ({time.monotonic() - t:.2f}s)")
        except Exception as e:  # noqa: BLE001 - report and go on
            self.line("FAIL", name, f"{type(e).__name__}: {e}")

    def role(self, base: str, trust_doc: str, policy: str | None = None) -> str:
        name = f"{base}-{self.sfx}"
        arn = self.iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust_doc)["Role"]["Arn"]
        if policy:
            self.iam.put_role_policy(RoleName=name, PolicyName="inline", PolicyDocument=policy)
        return arn

    def assume(self, role_arn: str, session: str, **kw) -> dict:
        return self.sts_op.assume_role(RoleArn=role_arn, RoleSessionName=session, **kw)

    # (a)
    def a_wrong_secret(self):
        bad = client("sts", self.op, secret="x" * 40)
        code, status = error_code(bad.get_caller_identity)
        assert code == "SignatureDoesNotMatch" and status == 403, (code, status)
        unknown = client("sts", self.op, key_id="AKIAUNKNOWNUNKNOWN00", secret="x" * 40)
        code2, status2 = error_code(unknown.get_caller_identity)
        assert code2 == "InvalidClientTokenId" and status2 == 403, (code2, status2)
        return f"wrong secret -> {code} {status}; unknown key id -> {code2} {status2}"

    # (b)
    def b_operator_identity(self):
        arn = self.sts_op.get_caller_identity()["Arn"]
        assert arn == self.op_arn, arn
        return arn

    # (c)
    def c_assume_role_with_tags(self):
        with_policy = self.role("kube-sts-check-c", trust(self.op_arn), allow("sts:GetCallerIdentity"))
        no_policy = self.role("kube-sts-check-c-nopol", trust(self.op_arn))
        tags = [{"Key": "team", "Value": "a"}, {"Key": "ns", "Value": "default"}]
        out = []
        for arn, session in ((with_policy, "sess-c"), (no_policy, "sess-c2")):
            r = self.assume(arn, session, Tags=tags, TransitiveTagKeys=["team"], DurationSeconds=900)
            creds = r["Credentials"]
            assert creds["AccessKeyId"].startswith("ASIA"), creds["AccessKeyId"]
            want = f"arn:aws:sts::{self.account}:assumed-role/{arn.split('/')[-1]}/{session}"
            assert r["AssumedRoleUser"]["Arn"] == want, r["AssumedRoleUser"]
            got = creds_client("sts", self.op, creds).get_caller_identity()["Arn"]
            assert got == want, (got, want)
            out.append(got)
        return (f"{out[0]} (role with sts:GetCallerIdentity policy); {out[1]} (role with NO policy: "
                "GetCallerIdentity needs none); trust Action only sts:AssumeRole + Tags accepted")

    # (d)
    def d_untrusted_role(self):
        arn = self.role("kube-sts-check-d", trust(f"arn:aws:iam::{self.account}:user/someone-else"))
        code, status = error_code(lambda: self.assume(arn, "sess-d"))
        assert code == "AccessDenied" and status == 403, (code, status)
        return f"{code} {status}"

    # (e)
    def e_external_id(self):
        cond = {"StringEquals": {"sts:ExternalId": "right-id"}}
        arn = self.role("kube-sts-check-e", trust(self.op_arn, condition=cond))
        code, status = error_code(lambda: self.assume(arn, "sess-e", ExternalId="wrong-id"))
        assert code == "AccessDenied", (code, status)
        self.assume(arn, "sess-e", ExternalId="right-id")
        missing, _ = error_code(lambda: self.assume(arn, "sess-e"))
        self.line("INFO", "e/missing-external-id",
                  "refused" if missing else "ACCEPTED: moto skips a condition whose key is absent (AWS refuses)")
        return f"wrong ExternalId -> {code} {status}; right ExternalId -> ok"

    # (f)
    def f_web_identity(self):
        noauth = self.op["MOTO_NOAUTH_URL"]
        recorder_start(noauth)
        token = f"check-web-token-{self.sfx}"
        role_arn = f"arn:aws:iam::{self.account}:role/kube-sts-check-web-{self.sfx}"
        try:
            r = client("sts", self.op, unsigned=True).assume_role_with_web_identity(
                RoleArn=role_arn, RoleSessionName="sess-f", WebIdentityToken=token)
        finally:
            recorder_stop(noauth)
        want = f"arn:aws:sts::{self.account}:assumed-role/kube-sts-check-web-{self.sfx}/sess-f"
        assert r["AssumedRoleUser"]["Arn"] == want, r["AssumedRoleUser"]
        calls = [c for c in recorded_calls(noauth) if c["params"].get("Action") == "AssumeRoleWithWebIdentity"]
        assert len(calls) == 1, calls
        assert calls[0]["params"].get("WebIdentityToken") == token, calls[0]["params"]
        assert "Authorization" not in calls[0]["headers"], "request was signed"
        # the credentials live in the no-auth moto only:
        code, _ = error_code(creds_client("sts", self.op, r["Credentials"]).get_caller_identity)
        self.line("INFO", "f/web-identity-creds-at-enforced-moto",
                  f"GetCallerIdentity with them through the proxy -> {code or 'ok'}")
        return f"unsigned call routed to no-auth moto, {want}; token read back from its recorder"

    # (g)
    def g_recorder_counts(self):
        moto = self.op["MOTO_URL"]
        arn = self.role("kube-sts-check-g", trust(self.op_arn))
        recorder_start(moto)
        try:
            self.assume(arn, "sess-g1")
            self.assume(arn, "sess-g2", Tags=[{"Key": "k", "Value": "v"}])
            error_code(lambda: client("sts", self.op, secret="y" * 40).assume_role(RoleArn=arn, RoleSessionName="bad"))
        finally:
            recorder_stop(moto)
        calls = [c for c in recorded_calls(moto) if c["params"].get("Action") == "AssumeRole"]
        assert len(calls) == 3, [c["params"] for c in calls]
        tagged = calls[1]["params"]
        assert tagged.get("Tags.member.1.Key") == "k" and tagged.get("Tags.member.1.Value") == "v", tagged
        return ("3 AssumeRole recorded (2 good + 1 refused bad signature: recorded before auth); "
                "session tags visible as Tags.member.N.Key/Value")

    # (h)
    def h_ecr(self):
        ecr_arn = self.role("kube-sts-check-h", trust(self.op_arn), allow("ecr:GetAuthorizationToken"))
        bare_arn = self.role("kube-sts-check-h-bare", trust(self.op_arn))
        creds = self.assume(ecr_arn, "sess-h")["Credentials"]
        d = creds_client("ecr", self.op, creds).get_authorization_token()["authorizationData"][0]
        user_pw = base64.b64decode(d["authorizationToken"]).decode()
        assert user_pw.startswith("AWS:"), user_pw
        bare = self.assume(bare_arn, "sess-h2")["Credentials"]
        try:
            creds_client("ecr", self.op, bare).get_authorization_token()
            raise AssertionError("role without ecr policy got a token")
        except ClientError as e:
            # moto answers the JSON-protocol ECR with an XML (query-style) error body and
            # Content-Type text/html: SDKs cannot read the code, only HTTP 403.
            status = e.response["ResponseMetadata"]["HTTPStatusCode"]
            assert status == 403 and "<Code>AccessDenied</Code>" in e.response["Error"]["Message"], e.response
            code = f"HTTP 403, XML body <Code>AccessDenied</Code>, SDK error code {e.response['Error']['Code']!r}"
        op_d = client("ecr", self.op).get_authorization_token()["authorizationData"][0]
        return (f"expiresAt={d['expiresAt'].isoformat()} proxyEndpoint={d['proxyEndpoint']} token=b64('{user_pw[:12]}...'); "
                f"role without ecr policy -> {code}; operator user -> expiresAt={op_d['expiresAt'].isoformat()}")

    # (i)
    def i_session_federation(self):
        st = self.sts_op.get_session_token(DurationSeconds=900)["Credentials"]
        ft = self.sts_op.get_federation_token(Name="fed-check", DurationSeconds=900)
        fc = ft["Credentials"]
        code, _ = error_code(creds_client("sts", self.op, st).get_caller_identity)
        self.line("INFO", "i/session-token-creds",
                  f"fixed example key {st['AccessKeyId']}; GetCallerIdentity with it -> {code or 'ok'}")
        return (f"GetSessionToken ok (key {st['AccessKeyId']}); GetFederationToken ok "
                f"({ft['FederatedUser']['Arn']}, key {fc['AccessKeyId']})")

    # informational quirks
    def quirks(self):
        def info(name, fn):
            try:
                code, status = error_code(fn)
                self.line("INFO", name, f"{code} {status}" if code else "ACCEPTED")
            except Exception as e:  # noqa: BLE001
                self.line("INFO", name, f"{type(e).__name__}: {e}")

        missing = f"arn:aws:iam::{self.account}:role/kube-sts-check-missing-{self.sfx}"
        info("x/assume-nonexistent-role (AWS: AccessDenied)", lambda: self.assume(missing, "sess-x"))
        root = self.role("kube-sts-check-root", trust(f"arn:aws:iam::{self.account}:root"))
        info("x/trust-account-root-principal (AWS: allowed)", lambda: self.assume(root, "sess-x"))
        prefix = self.role("kube-sts-check-prefix", trust(self.op_arn + "-other"))
        info("x/trust-principal-string-is-superstring-of-caller (AWS: AccessDenied)", lambda: self.assume(prefix, "sess-x"))
        deny_tags = self.role("kube-sts-check-denytag", json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": self.op_arn}, "Action": "sts:AssumeRole"},
            {"Effect": "Deny", "Principal": {"AWS": self.op_arn}, "Action": "sts:TagSession"}]}))
        info("x/tags-with-trust-deny-TagSession (AWS: AccessDenied)",
             lambda: self.assume(deny_tags, "sess-x", Tags=[{"Key": "k", "Value": "v"}]))
        dur = self.role("kube-sts-check-dur", trust(self.op_arn))  # MaxSessionDuration defaults to 3600
        info("x/duration-43200-on-1h-role (AWS: ValidationError)",
             lambda: self.assume(dur, "sess-x", DurationSeconds=43200))
        # chained AssumeRole from an assumed-role session
        hop2 = self.role("kube-sts-check-hop2", trust(f"arn:aws:sts::{self.account}:assumed-role/kube-sts-check-hop1-{self.sfx}/s1"))
        hop1_nopol = self.role("kube-sts-check-hop1", trust(self.op_arn))
        c1 = self.assume(hop1_nopol, "s1")["Credentials"]
        info("x/chained-assume-role, hop1 role without sts:AssumeRole policy",
             lambda: creds_client("sts", self.op, c1).assume_role(RoleArn=hop2, RoleSessionName="s2"))
        self.iam.put_role_policy(RoleName=f"kube-sts-check-hop1-{self.sfx}", PolicyName="inline",
                                 PolicyDocument=allow("sts:AssumeRole"))
        info("x/chained-assume-role, hop1 role with sts:AssumeRole policy",
             lambda: creds_client("sts", self.op, c1).assume_role(RoleArn=hop2, RoleSessionName="s2"))


def main() -> int:
    p = argparse.ArgumentParser(description="self-check of the local STS peer")
    p.add_argument("--env-dir", default=str(REPO / ".e2e"), help="dir with aws.env and aws-admin.env")
    p.add_argument("--no-info", action="store_true", help="skip the informational quirk probes")
    args = p.parse_args()
    env_dir = Path(args.env_dir)
    if not (env_dir / "aws.env").is_file():
        print(f"FAIL setup: {env_dir}/aws.env missing (run e2e/scripts/sts-up.sh)")
        return 1
    c = Checker(load_env(env_dir / "aws.env"), load_env(env_dir / "aws-admin.env"))
    t0 = time.monotonic()
    c.run("a/wrong-secret-refused", c.a_wrong_secret)
    c.run("b/operator-get-caller-identity", c.b_operator_identity)
    c.run("c/assume-role-with-session-tags", c.c_assume_role_with_tags)
    c.run("d/untrusted-principal-refused", c.d_untrusted_role)
    c.run("e/external-id-condition", c.e_external_id)
    c.run("f/unsigned-web-identity-via-proxy", c.f_web_identity)
    c.run("g/recorder-counts-assume-role", c.g_recorder_counts)
    c.run("h/ecr-authorization-token", c.h_ecr)
    c.run("i/session-and-federation-token", c.i_session_federation)
    if not args.no_info:
        c.quirks()
    print(f"{'FAILED' if c.failed else 'OK'}: {c.failed} failed checks, {time.monotonic() - t0:.1f}s")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
