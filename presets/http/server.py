"""The HTTP/1.1 front end: one asyncio event loop serves an ASGI app, with the limits a public port needs.

h11 parses and frames HTTP; this module is the connection policy around it. Why not uvicorn or
hypercorn (docs/design.md, "The HTTP layer"): neither closes a connection whose request head trickles in with a
408 (uvicorn has no such deadline at all), neither answers an oversized or malformed head in our JSON
error shape (uvicorn answers 400 text even for oversized heads), and a graceful drain needs the
listening socket kept open so probes see 503 while requests finish, which both close at once.

A connection costs no thread: idle, slow and streaming clients are coroutines. Per connection:
- idle (before a request's first byte): closed silently after `keepalive_timeout`;
- request head: must complete within `header_timeout` of its first byte (else 408), at most
  `max_header_bytes` and `max_headers` fields (else 431); malformed framing is 400, and so is what
  request smuggling rides on (RFC 9112 6.1, 5.2, 2.2): both Content-Length and Transfer-Encoding, a
  folded header line, a bare LF or CR as a line end; a method in lower case is 400 (methods are
  case-sensitive: `head` is not HEAD);
- body: `Content-Length` over `max_body_bytes` is 413 before a byte of it is read, a chunked body is
  cut off at the limit (413); the whole body must arrive within `body_timeout` of the head (else 408);
- a client that closes its sending side after a whole request (a half-close) is answered; one that left
  entirely is noticed when writing to it fails (a stream stops there);
- an answer the client reads none of for `write_timeout` seconds is given up and its socket closed at
  once (not left to flush: a socket still open but no longer counted would escape `max_connections`);
- over `max_connections` open connections, a new one gets 503 and is closed.
Every error is JSON `{"detail": ...}` and closes the connection.
"""

import asyncio
import json
import logging
import re
import socket
from dataclasses import dataclass

import h11

from presets.http.exchange import Exchange, Reject, phrase

log = logging.getLogger(__name__)

READ_SIZE = 65536
# In a request head: a line end other than CRLF, or a line that starts with a space or tab (obs-fold).
_LAX_LINE = re.compile(rb"(?<!\r)\n|\r(?!\n)|\n[ \t]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class Limits:
    max_connections: int = 4096
    keepalive_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body_bytes: int = 1 << 20
    write_timeout: float = 60.0  # seconds an answer may wait for the client to read any of it


class HttpServer:
    """Serves `app` (ASGI 3) on (host, port). `start()`, then `drain()` and/or `close()`."""

    def __init__(self, app, host: str, port: int, limits: Limits | None = None):
        self.app = app
        self.host, self.port = host, port
        self.limits = limits or Limits()
        self.connections: set[_Connection] = set()
        self.active_requests = 0  # requests whose answer is not complete
        self.draining = False
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, family=family, reuse_address=True, backlog=2048, limit=READ_SIZE
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def drain(self) -> None:
        """Keep listening (probes must get their 503), but close keep-alive connections between requests."""
        self.draining = True
        for conn in list(self.connections):
            if conn.idle and conn.served:
                conn.close()

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening; give unfinished answers `grace` seconds, then close every connection."""
        if self._server:
            self._server.close()
        self.drain()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.active_requests and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        await asyncio.sleep(0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        if len(self.connections) >= self.limits.max_connections:
            conn.write_error(503, f"server has {self.limits.max_connections} connections open (max_connections)")
            await conn._linger(0.5)
            conn.close()
            return
        self.connections.add(conn)
        try:
            await conn.run()
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self.connections.discard(conn)
            conn.close()


class _Connection:
    def __init__(self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.limits = server.limits
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        self.idle = True  # no request in progress
        self._method = b""  # of the request being answered
        self.served = 0  # requests answered on this connection
        self.eof = False
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        self.client = tuple(peer[:2]) if peer else None
        self.local = tuple(local[:2]) if local else None

    def close(self) -> None:
        """Close the socket; at once when answer bytes are still unsent (a client that stopped reading would
        otherwise keep it open, uncounted, until the kernel gives up on it)."""
        transport = self.writer.transport
        if transport.get_write_buffer_size():
            transport.abort()
        elif not self.writer.is_closing():
            self.writer.close()

    # -- reading ---------------------------------------------------------------------------------

    async def _read(self, timeout: float | None) -> None:
        """Feed h11 the next bytes; raises TimeoutError."""
        data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
        if not data:
            self.eof = True
        self.h11.receive_data(data)

    def _next_event(self):
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431 or "buffer" in str(e).lower():  # h11's max_incomplete_event_size
                raise Reject(431, f"request head over {self.limits.max_header_bytes} bytes") from None
            raise Reject(400, f"malformed HTTP request: {e}") from None

    def _check_line_ends(self) -> None:
        """400 for a complete head that h11 would read leniently (bare LF or CR, folded lines): a proxy in front
        may read it otherwise, and the difference is how a second request gets smuggled past it."""
        head = self.h11.trailing_data[0]
        end = _HEAD_END.search(head)
        if end and (end.group() != b"\r\n\r\n" or _LAX_LINE.search(head[: end.start()])):
            raise Reject(400, "malformed HTTP request: header lines must end in CRLF and may not be folded")

    async def _request_head(self):
        """The next h11.Request, or None when the client closed or stayed idle too long."""
        loop = asyncio.get_running_loop()
        deadline = None
        while True:
            self._check_line_ends()
            event = self._next_event()
            if isinstance(event, h11.Request):
                return event
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed) or self.eof:
                return None
            if deadline is None and self.h11.trailing_data[0]:
                deadline = loop.time() + self.limits.header_timeout  # bytes of a head have arrived
            if deadline is None:
                if self.server.draining and self.served:
                    return None  # no keep-alive while draining; a new connection is still answered
                try:
                    await self._read(self.limits.keepalive_timeout)
                except TimeoutError:
                    return None  # idle: close without a word, as keep-alive timeouts do
            else:
                try:
                    await self._read(max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise Reject(
                        408, f"request head not received within {self.limits.header_timeout:g}s (read_timeout)"
                    ) from None
                self.idle = False

    # -- writing ---------------------------------------------------------------------------------

    def _send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)

    def write_error(self, status: int, message: str) -> None:
        """A JSON error and the end of this connection (only while no answer has started)."""
        body = json.dumps({"detail": message}).encode()  # the error shape of every route
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close")]
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            if self.h11.their_state is h11.ERROR or self.h11.our_state is h11.IDLE:
                # No request was parsed: h11 cannot frame an answer, so write it by hand.
                head = f"HTTP/1.1 {status} {phrase(status)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
                self.writer.write(head.encode() + b"\r\n" + body)
                return
            self._send(h11.Response(status_code=status, headers=headers, reason=phrase(status).encode()))
            if self._method != b"HEAD":
                self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())

    # -- one request after another ---------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self.idle = True
            try:
                request = await self._request_head()
            except Reject as e:
                log.info("HTTP %d from %s: %s", e.status, self.client, e.message)
                self.write_error(e.status, e.message)
                await self._linger()
                return
            if request is None:
                return
            self.idle = False
            self._method = request.method
            self.server.active_requests += 1
            try:
                keep = await Exchange(self, request).run()
            finally:
                self.server.active_requests -= 1
                self.served += 1
            if not keep or self.server.draining:
                await self._linger()
                return
            self.h11.start_next_cycle()

    async def _linger(self, seconds: float = 2.0) -> None:
        """Send what is written, then end our side and discard what the client still sends for a moment:
        closing with unread bytes would reset the connection and lose the answer on the way (an early 413)."""
        try:
            await asyncio.wait_for(self.writer.drain(), 5)
            if self.eof:
                return
            self.writer.write_eof()
            loop = asyncio.get_running_loop()
            deadline, discarded = loop.time() + seconds, 0
            while discarded < 4 * self.limits.max_body_bytes:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), max(0.0, deadline - loop.time()))
                if not data:
                    return
                discarded += len(data)
        except (TimeoutError, ConnectionError, OSError):
            pass
