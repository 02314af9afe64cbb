"""A forward HTTP proxy on the host side of a virtual Pi's link: the Pi's only way out.

The Pi has no route to the internet (the host does no NAT). Provisioning it as a real Pi is
provisioned (apt, pip) goes through this proxy, as it would at a site behind an HTTP proxy:
`http_proxy`/`https_proxy` = http://10.213.N.1:3128. It listens on that address only, so only
the Pi reaches it, and it connects to ports 80 and 443 only. Plain HTTP requests (apt) are
forwarded; HTTPS (pip) is tunnelled with CONNECT, so the Pi still checks certificates itself.

Run as `python -m virtualpi.proxy --listen ADDRESS:PORT`; `start`/`stop` manage it per instance.
"""

from __future__ import annotations

import argparse
import http.client
import os
import select
import signal
import socket
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PORT = 3128
ALLOWED_PORTS = {80, 443}
IDLE_SECONDS = 120
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade"}


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write(f"{self.client_address[0]} {fmt % args}\n")

    def do_CONNECT(self) -> None:
        host, _, port = self.path.rpartition(":")
        if not port.isdigit() or int(port) not in ALLOWED_PORTS:
            self.send_error(403, "only ports 80 and 443")
            return
        try:
            upstream = socket.create_connection((host, int(port)), timeout=30)
        except OSError as error:
            self.send_error(502, f"cannot reach {self.path}: {error}")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self._relay(upstream)

    def _relay(self, upstream: socket.socket) -> None:
        sockets = [self.connection, upstream]
        with upstream:
            while True:
                readable, _, _ = select.select(sockets, [], [], IDLE_SECONDS)
                if not readable:
                    return
                for source in readable:
                    data = source.recv(1 << 16)
                    if not data:
                        return
                    (upstream if source is self.connection else self.connection).sendall(data)

    def _forward(self) -> None:
        target = urllib.parse.urlsplit(self.path)
        if target.scheme != "http" or (target.port or 80) not in ALLOWED_PORTS:
            self.send_error(400, "send absolute http:// URLs; use CONNECT for https")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        connection = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
        try:
            path = target.path or "/"
            connection.request(self.command, path + (f"?{target.query}" if target.query else ""),
                               body, headers)
            reply = connection.getresponse()
        except OSError as error:
            connection.close()
            self.send_error(502, f"cannot reach {target.hostname}: {error}")
            return
        try:
            self._send_reply(reply)
        finally:
            connection.close()

    def _send_reply(self, reply: http.client.HTTPResponse) -> None:
        self.send_response(reply.status, reply.reason)
        for key, value in reply.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        chunked = reply.getheader("Content-Length") is None and self.command != "HEAD"
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        while block := reply.read(1 << 16):
            self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    do_GET = do_HEAD = do_POST = _forward


def _pid_file(state: Path) -> Path:
    return state / "proxy.pid"


def start(listen: str, state: Path) -> int:
    """Start the proxy for one instance, detached (its log is `<state>/proxy.log`)."""
    stop(listen, state)
    log = str(state / "proxy.log")
    # posix_spawn, not Popen: the proxy outlives this process, which never waits for it.
    pid = os.posix_spawn(
        sys.executable, [sys.executable, "-m", "virtualpi.proxy", "--listen", listen],
        {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                      (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                       0o600),
                      (os.POSIX_SPAWN_DUP2, 1, 2)],
        setsid=True)
    _pid_file(state).write_text(f"{pid}\n")
    return pid


def stop(listen: str, state: Path) -> None:
    """Stop it, also when its pid file is gone: found by its command line."""
    marker = f"virtualpi.proxy\0--listen\0{listen}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGTERM)
        except (OSError, ValueError):
            continue
    _pid_file(state).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="ADDRESS:PORT")
    args = parser.parse_args()
    address, _, port = args.listen.rpartition(":")
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer((address, int(port)), Proxy).serve_forever()


if __name__ == "__main__":
    main()
