#!/usr/bin/env python3
"""Routing proxy in front of two moto servers (stdlib only).

moto with IAM enforcement switched on answers HTTP 500 to unsigned requests, and
the AWS SDKs send STS AssumeRoleWithWebIdentity unsigned. So:

  * STS ``Action=AssumeRoleWithWebIdentity`` (form body or query string)
    -> the moto WITHOUT enforcement (``--noauth``, default 127.0.0.1:15001);
  * everything else, ``/moto-api/...`` included -> the ENFORCED moto
    (``--enforced``, default 127.0.0.1:15000).

A request header ``X-Kube-Sts-Upstream: noauth|enforced`` overrides the routing
(for test tooling, e.g. reaching the no-auth moto's ``/moto-api`` through the
proxy); ``--moto-api noauth`` changes the default for ``/moto-api/...``.

ECR ``GetAuthorizationToken`` answers get the token lifetime real ECR gives (12 hours from
now) in place of moto's fixed ``expiresAt`` of 2015-01-01, which kube-sts (rightly) refuses
as already expired; a request with the header ``X-Kube-Sts-Ecr-Expires: upstream`` gets
moto's answer unchanged (tests of that refusal). Nothing else of the answer changes. moto also answers IAM-enforcement
denials of JSON-protocol services (ECR) in the XML query shape; those are relayed as the
JSON error ECR sends (``{"__type": "AccessDeniedException", "message": ...}``), which is
what the SDKs parse.

Method, path, query, body and ALL request headers (Host included, in order) are
forwarded unchanged, so SigV4 signatures still verify at the upstream (the one
exception: a chunked request body is forwarded de-chunked with Content-Length,
because moto reads form bodies by Content-Length only). Status,
headers and body are streamed back. ``GET /__proxy__/healthz`` answers locally.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import time
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

WEB_IDENTITY_ACTION = "AssumeRoleWithWebIdentity"
ECR_TOKEN_ACTION = "GetAuthorizationToken"
ECR_TOKEN_LIFETIME_S = 12 * 3600
ECR_EXPIRES_HEADER = "X-Kube-Sts-Ecr-Expires"
ROUTE_HEADER = "X-Kube-Sts-Upstream"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}
CHUNK = 64 * 1024


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def sts_action(query: str, headers, body: bytes) -> str | None:
    """The STS/query-protocol Action of a request, from query string or form body."""
    action = parse_qs(query).get("Action", [None])[0]
    if action:
        return action
    ctype = (headers.get("Content-Type") or "").lower()
    if body and ctype.startswith("application/x-www-form-urlencoded"):
        try:
            form = parse_qs(body.decode("utf-8", "replace"))
        except ValueError:
            return None
        action = form.get("Action", [None])[0]
        if action:
            return action
    target = headers.get("X-Amz-Target") or ""
    if target:  # JSON-protocol style, should STS ever switch
        return target.rsplit(".", 1)[-1]
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-sts-proxy"
    # set by main()
    enforced: tuple[str, int] = ("127.0.0.1", 15000)
    noauth: tuple[str, int] = ("127.0.0.1", 15001)
    moto_api_target = "enforced"
    # Pods' listener (--also-listen): STS and IAM requests only, always to the enforced
    # moto: no /moto-api (which can reset the peer or turn its IAM checks off) and no
    # routing header (which reaches the moto without enforcement).
    restricted = False
    quiet = False
    timeout_s = 120.0
    log_lock = threading.Lock()

    # -- request body -----------------------------------------------------------
    def _read_body(self) -> tuple[bytes, bool]:
        """Returns (body, was_chunked)."""
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after chunk
            return b"".join(parts), True
        length = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(length) if length > 0 else b""), False

    # -- routing ----------------------------------------------------------------
    def _route(self, path: str, query: str, body: bytes) -> tuple[str, tuple[str, int], str]:
        override = (self.headers.get(ROUTE_HEADER) or "").strip().lower()
        if override in ("noauth", "enforced"):
            return override, getattr(self, override), "override"
        if path.startswith("/moto-api"):
            return self.moto_api_target, getattr(self, self.moto_api_target), "moto-api"
        action = sts_action(query, self.headers, body) or "-"
        if action == WEB_IDENTITY_ACTION:
            return "noauth", self.noauth, action
        return "enforced", self.enforced, action

    # -- main -------------------------------------------------------------------
    def _handle(self) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path or "/", parts.query
        if path == "/__proxy__/healthz" and self.command == "GET":
            self._local(200, b"ok\n")
            return
        if self.restricted and (path.startswith("/moto-api") or self.headers.get(ROUTE_HEADER)):
            self._local(403, b"not served on this listener\n")
            return
        try:
            body, chunked = self._read_body()
        except (ValueError, OSError) as e:
            self._local(400, f"bad request body: {e}\n".encode())
            return
        name, (host, port), why = self._route(path, query, body)

        conn = http.client.HTTPConnection(host, port, timeout=self.timeout_s)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():  # every header, in order, Host included
                if chunked and key.lower() in ("transfer-encoding", "content-length"):
                    continue
                conn.putheader(key, value)
            if chunked:
                # moto's werkzeug app reads form bodies by Content-Length only, so a
                # chunked body is passed on de-chunked (hop-by-hop framing, never signed).
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            if body:
                conn.send(body)
            resp = conn.getresponse()
        except OSError as e:
            conn.close()
            self._log(f"{self.command} {path} [{why}] -> {name} FAILED: {e}")
            self._local(502, f"kube-sts-proxy: upstream {name} {host}:{port} unreachable: {e}\n".encode())
            return

        try:
            if resp.status >= 400 and (resp.getheader("Content-Type") or "").startswith("text/html"):
                if self.headers.get("X-Amz-Target"):
                    self._relay_json_error(resp)
                else:
                    self._relay_error(resp)
            elif resp.status == 200 and why == ECR_TOKEN_ACTION and self.headers.get(ECR_EXPIRES_HEADER) != "upstream":
                self._relay_ecr_token(resp)
            else:
                self._relay(resp)
        finally:
            conn.close()
        self._log(f"{self.command} {path} [{why}] -> {name} {resp.status}")

    def _relay(self, resp: http.client.HTTPResponse) -> None:
        self.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        for key, value in resp.getheaders():
            if key.lower() in HOP_BY_HOP:
                continue
            self.send_header(key, value)
        rechunk = not no_body and length is None
        if rechunk:
            if self.request_version == "HTTP/1.1":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
        self.end_headers()
        if no_body:
            return
        while True:
            data = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)
            if not data:
                break
            if rechunk and self.request_version == "HTTP/1.1":
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
        if rechunk and self.request_version == "HTTP/1.1":
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _relay_error(self, resp: http.client.HTTPResponse) -> None:
        """Relays an error answer in the envelope real STS uses.

        moto's IAM enforcement answers query-protocol errors as
        `<ErrorResponse><Errors><Error>...</Error></Errors></ErrorResponse>` (the EC2 shape);
        AWS STS sends `<ErrorResponse><Error>...</Error><RequestId/></ErrorResponse>`, and
        that is the shape SDKs parse the error code from.
        """
        body = resp.read()
        if b"<ErrorResponse><Errors><Error>" in body:
            body = body.replace(b"<ErrorResponse><Errors><Error>", b'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>')
            body = body.replace(b"</Error></Errors>", b"</Error><RequestId>" + (resp.getheader("x-amzn-requestid") or "").encode() + b"</RequestId>")
        self.send_response_only(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() in HOP_BY_HOP or key.lower() in ("content-length", "content-type"):
                continue
            self.send_header(key, value)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _relay_json_error(self, resp: http.client.HTTPResponse) -> None:
        """Relays an XML error answer to a JSON-protocol request as the JSON error AWS sends."""
        body = resp.read().decode("utf-8", "replace")
        code = re.search(r"<Code>(.*?)</Code>", body)
        message = re.search(r"<Message>(.*?)</Message>", body, re.S)
        code = code.group(1) if code else "InternalFailure"
        if code == "AccessDenied":
            code = "AccessDeniedException"  # the JSON-protocol services' name for it
        payload = json.dumps({"__type": code, "message": message.group(1) if message else body}).encode()
        self.send_response_only(resp.status, resp.reason)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("x-amzn-ErrorType", code)
        self.send_header("x-amzn-RequestId", resp.getheader("x-amzn-requestid") or "")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _relay_ecr_token(self, resp: http.client.HTTPResponse) -> None:
        """Relays an ECR token answer with a real token lifetime (see the module doc)."""
        answer = json.loads(resp.read() or b"{}")
        for entry in answer.get("authorizationData", []):
            entry["expiresAt"] = int(time.time()) + ECR_TOKEN_LIFETIME_S
        body = json.dumps(answer).encode()
        self.send_response_only(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() in HOP_BY_HOP or key.lower() == "content-length":
                continue
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _local(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _log(self, msg: str) -> None:
        if not self.quiet:
            with self.log_lock:
                sys.stderr.write(f"{self.log_date_time_string()} {msg}\n")
                sys.stderr.flush()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - silence default access log
        pass

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=split_hostport, default=("127.0.0.1", 15002), help="HOST:PORT (default 127.0.0.1:15002)")
    p.add_argument("--also-listen", type=split_hostport, action="append", default=[],
                   help="another HOST:PORT for pods (the node link's host address): STS/IAM only, "
                        "no /moto-api and no routing header")
    p.add_argument("--enforced", type=split_hostport, default=("127.0.0.1", 15000), help="moto with IAM enforcement (default 127.0.0.1:15000)")
    p.add_argument("--noauth", type=split_hostport, default=("127.0.0.1", 15001), help="moto without enforcement (default 127.0.0.1:15001)")
    p.add_argument("--moto-api", choices=("enforced", "noauth"), default="enforced", help="where /moto-api/... goes by default")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = p.parse_args(argv)

    Handler.enforced = args.enforced
    Handler.noauth = args.noauth
    Handler.moto_api_target = args.moto_api
    Handler.quiet = args.quiet

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    srv = ThreadingHTTPServer(args.listen, Handler)
    pods_handler = type("PodsHandler", (Handler,), {"restricted": True})
    for extra in args.also_listen:
        threading.Thread(target=ThreadingHTTPServer(extra, pods_handler).serve_forever, daemon=True).start()
    also = "".join(f", {h}:{p}" for h, p in args.also_listen)
    sys.stderr.write(
        f"kube-sts-proxy listening on {args.listen[0]}:{args.listen[1]}{also}; "
        f"enforced={args.enforced[0]}:{args.enforced[1]} noauth={args.noauth[0]}:{args.noauth[1]}\n"
    )
    sys.stderr.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
