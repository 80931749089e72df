"""An HTTP proxy on loopback between the pipeline and the S3 server, for fault tests.

It forwards every request to the upstream S3 API server, and on a seeded fraction of them
answers the way a struggling S3 does instead: 503 SlowDown, 503 ServiceUnavailable, or a
connection closed without any response. Keys matching `deny` get a real 403 AccessDenied
(an object the job's role may not read). Keys matching `stall` are held `stall_s` seconds
before any response (a source that hangs). Every request is logged, so tests can count reads.
"""

from __future__ import annotations

import dataclasses
import http.client
import random
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>fault-proxy</RequestId></Error>"
)


@dataclasses.dataclass
class Request:
    method: str
    path: str
    outcome: str  # 'ok', 'slowdown', 'unavailable', 'drop', 'denied', 'stalled'


class FaultProxy:
    FAULTS = ("slowdown", "unavailable", "drop")

    def __init__(self, upstream: str, *, fault_rate: float = 0.0, seed: int = 0, deny: tuple[str, ...] = (), stall: tuple[str, ...] = (),
                 stall_s: float = 30.0):  # fmt: skip
        up = urllib.parse.urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.fault_rate = fault_rate
        self.deny = deny
        self.stall, self.stall_s = stall, stall_s
        self._closing = threading.Event()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.log: list[Request] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                outcome = proxy._decide(self.path)
                with proxy.lock:
                    proxy.log.append(Request(self.command, self.path, outcome))
                if outcome == "stalled":
                    proxy._closing.wait(proxy.stall_s)  # hold the request, answer nothing
                    self.close_connection = True
                    return
                if outcome == "drop":
                    # Close the socket without a response, as a reset connection looks.
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if outcome in ("slowdown", "unavailable", "denied"):
                    status, code, msg = {
                        "slowdown": (503, "SlowDown", "Please reduce your request rate."),
                        "unavailable": (503, "ServiceUnavailable", "Service is unable to handle request."),
                        "denied": (403, "AccessDenied", "Access Denied"),
                    }[outcome]
                    payload = b"" if self.command == "HEAD" else _ERROR_XML.format(code=code, message=msg).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            conn.putheader(k, v)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, path: str) -> str:
        key = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        if any(d in key for d in self.deny):
            return "denied"
        if any(d in key for d in self.stall):
            return "stalled"
        with self.lock:
            if self.fault_rate and self.rng.random() < self.fault_rate:
                return self.rng.choice(self.FAULTS)
        return "ok"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()  # release held requests
        self.server.shutdown()
        self.server.server_close()

    def count(self, method: str, contains: str, outcome: str | None = None) -> int:
        with self.lock:
            return sum(
                1
                for r in self.log
                if r.method == method and contains in urllib.parse.unquote(r.path) and (outcome is None or r.outcome == outcome)
            )
