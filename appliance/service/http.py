"""The HTTP server: waitress, with the limits a service on a LAN needs set where the bytes arrive.

- **Slow clients** (one header line every few seconds, a body that stops) are disconnected: the
  request line and headers must arrive within `server.header_timeout_seconds` of connecting (or
  of the next request's first byte), and a connection idle for `server.idle_timeout_seconds` is
  closed. One address holds at most `server.connections_per_client` connections, so that one
  host cannot take all `server.connection_limit` and lock out `/health` and monitoring.
- **Bodies** over `server.max_request_bytes` are refused from their Content-Length (or as a
  chunked body passes it), before they are stored.
- **Errors of the HTTP layer itself** (a bad start line, bad chunking, a header too large) are
  OpenAI-shaped JSON like the application's, and close the connection.
- **Content-Length beside Transfer-Encoding** is refused and the connection closed (RFC 9112
  §6.3: a proxy in front may have framed the body otherwise — request smuggling).
"""

from __future__ import annotations

import json
import time
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from appliance.service.errors import body_too_large, error_body
from appliance.settings import ServerSettings

IDENT = "pi-llm-appliance"
# How often connections are looked at for their deadlines (waitress's default is 30 s).
CHECK_INTERVAL_SECONDS = 1


class RequestParser(HTTPRequestParser):
    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.chunked and "CONTENT_LENGTH" in self.headers:
            raise ParsingError("Content-Length and Transfer-Encoding: chunked together; send "
                               "one of them")


class JsonErrorTask(ErrorTask):
    """waitress's own error responses (400, 413, 431, 501), in the API's error shape."""

    def execute(self) -> None:
        error = self.request.error
        code = error.reason.lower().replace(" ", "_")
        message = error.body
        if error.code == 413:
            message = body_too_large(self.channel.adj.max_request_body_size - 1)
        body = json.dumps(error_body(error.code, message, code)).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Channel(HTTPChannel):
    parser_class = RequestParser
    error_task_class = JsonErrorTask

    def __init__(self, server: Server, sock: Any, addr: Any, adj: Adjustments,
                 map: dict | None = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        # When the headers now being waited for are due (None: none are).
        self.headers_due: float | None = self.creation_time + server.header_timeout

    def received(self, data: bytes) -> bool:
        if self.request is None and self.headers_due is None and data:
            self.headers_due = time.time() + self.server.header_timeout
        result = super().received(data)
        if self.request is None or self.request.headers_finished:
            self.headers_due = None
        return result


class Server(TcpWSGIServer):
    channel_class = Channel

    def __init__(self, *args: Any, header_timeout: float, connections_per_client: int,
                 **kwargs: Any) -> None:
        self.header_timeout = header_timeout
        self.connections_per_client = connections_per_client
        super().__init__(*args, **kwargs)

    def handle_accept(self) -> None:
        try:
            accepted = self.accept()
        except OSError:
            return
        if accepted is None:
            return
        conn, addr = accepted
        held = sum(1 for channel in self.active_channels.values()
                   if channel.addr[0] == addr[0])
        if held >= self.connections_per_client:
            _refuse(conn, addr[0], self.connections_per_client)
            return
        self.set_socket_options(conn)
        self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # the idle timeout
        for channel in self.active_channels.values():
            if (channel.headers_due is not None and channel.headers_due < now
                    and not channel.requests):
                channel.will_close = True


def _refuse(conn: Any, address: str, limit: int) -> None:
    """Answer 429 and close, without reading the request: the socket is fresh, so the few
    hundred bytes go into its empty send buffer at once."""
    body = json.dumps(error_body(
        429, f"{address} already holds {limit} connections (server.connections_per_client); "
        "close some, or reuse them with keep-alive", "too_many_connections")).encode()
    head = (f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n"
            f"Server: {IDENT}\r\n\r\n").encode()
    try:
        conn.send(head + body)
    except OSError:
        pass
    finally:
        conn.close()


def create_server(application: Any, settings: ServerSettings) -> Server | MultiSocketServer:
    """A waitress server for `application` on `settings.host`:`settings.port` (each address a
    host name resolves to), its limits and timeouts taken from `settings`."""
    adj = Adjustments(
        host=settings.host, port=settings.port, threads=settings.http_threads, ident=IDENT,
        clear_untrusted_proxy_headers=True,
        connection_limit=settings.connection_limit,
        channel_timeout=settings.idle_timeout_seconds,
        cleanup_interval=CHECK_INTERVAL_SECONDS,
        # waitress refuses a body whose length reaches it; Flask, one over its limit.
        max_request_body_size=settings.max_request_bytes + 1,
        # Lets the app notice a client that hangs up while its request is generating.
        channel_request_lookahead=1,
        # Each streamed token is sent by the thread that produced it, at once. The default
        # (18000) leaves small writes to the I/O thread: one more thread to wake per token,
        # competing with the inference threads for the cores.
        send_bytes=1,
    )
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    socket_map: dict = {}
    servers = [Server(application, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo,
                      header_timeout=settings.header_timeout_seconds,
                      connections_per_client=settings.connections_per_client)
               for sockinfo in adj.listen]
    if len(servers) == 1:
        return servers[0]
    return MultiSocketServer(socket_map, adj,
                             [(server.effective_host, server.effective_port)
                              for server in servers], dispatcher, servers[-1].log_info)
