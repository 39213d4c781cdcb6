"""One request and its answer on a connection (http/server.py): the head's checks, the ASGI scope, receive and send
around the app, the client's leaving seen by reading ahead, a stalled reader given up after `write_timeout`."""

import asyncio
import logging
from http import HTTPStatus
from urllib.parse import unquote

import h11

log = logging.getLogger(__name__)


class Reject(Exception):
    """A request the server answers itself (4xx/5xx) before or instead of the app."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Exchange:
    """One request and its answer: the ASGI receive/send pair around the app."""

    def __init__(self, conn, request: h11.Request):
        self.conn = conn
        self.request = request
        self.started = False
        self.finished = False
        self.body_done = False
        self.body_bytes = 0
        self.reject: Reject | None = None
        self.disconnected = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.body_deadline = loop.time() + conn.limits.body_timeout

    def _scope(self) -> dict:
        req, conn = self.request, self.conn
        raw_path, _, query = req.target.partition(b"?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.http_version.decode(),
            "method": req.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in req.headers],
            "client": conn.client,
            "server": conn.local,
        }

    def _check_head(self) -> None:
        limits = self.conn.limits
        if len(self.request.headers) > limits.max_headers:
            raise Reject(431, f"request has {len(self.request.headers)} header fields; at most {limits.max_headers}")
        size = len(self.request.target) + sum(len(k) + len(v) + 4 for k, v in self.request.headers)
        if size > limits.max_header_bytes:
            raise Reject(431, f"request head over {limits.max_header_bytes} bytes")
        names = {name for name, _ in self.request.headers}
        if {b"content-length", b"transfer-encoding"} <= names:
            raise Reject(
                400,
                "request has both Content-Length and Transfer-Encoding (RFC 9112 6.1: a request may "
                "be smuggled in such a body)",
            )
        if not self.request.method.isupper():
            raise Reject(400, f"unknown method {self.request.method.decode()!r}: methods are case-sensitive")
        for name, value in self.request.headers:
            if name == b"content-length" and int(value) > limits.max_body_bytes:
                raise Reject(
                    413, f"request body is {int(value)} bytes; at most {limits.max_body_bytes} (max_request_bytes)"
                )
        if self.request.method == b"CONNECT" or not self.request.target.startswith(b"/"):
            raise Reject(400, "request target must be a path")

    async def run(self) -> bool:
        """Run the app for this request; True when the connection may serve another."""
        conn = self.conn
        try:
            self._check_head()
        except Reject as e:
            conn.write_error(e.status, e.message)
            return False
        try:
            await conn.server.app(self._scope(), self._receive, self._send)
        except (ConnectionError, OSError):
            return False
        except Exception:
            log.exception("the app failed on %s %s", self.request.method.decode(), self.request.target.decode())
            if not self.started:
                conn.write_error(500, "internal error")
            return False
        finally:
            if self._watch_task:  # it holds the reader: it must be gone before the next read
                self._watch_task.cancel()
                await asyncio.gather(self._watch_task, return_exceptions=True)
        if self.reject is not None and not self.started:
            log.info("HTTP %d from %s: %s", self.reject.status, conn.client, self.reject.message)
            conn.write_error(self.reject.status, self.reject.message)
            return False
        if not self.finished:
            if not self.started:
                conn.write_error(500, "the app sent no answer")
            return False
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE and not conn.eof

    _watch_task = None

    async def _watch_disconnect(self) -> None:
        """After the body: read ahead (pipelined bytes are kept for the next request) to see the client leave.
        An end of input is not a leave: a client may close its sending side once its request is whole (a
        half-close) and still read the answer; one that closed the whole socket makes the next write fail."""
        conn = self.conn
        try:
            while not conn.eof and len(conn.h11.trailing_data[0]) < conn.limits.max_header_bytes:
                await conn._read(None)
        except (ConnectionError, OSError):  # a reset: the client is gone
            conn.eof = True
            self.disconnected.set()

    async def _receive(self) -> dict:
        if self.body_done or self.reject is not None:
            if self.reject is None and self._watch_task is None:
                self._watch_task = asyncio.ensure_future(self._watch_disconnect())
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        conn = self.conn
        loop = asyncio.get_running_loop()
        try:
            while True:
                if conn.h11.they_are_waiting_for_100_continue:
                    conn._send(h11.InformationalResponse(status_code=100, headers=[]))
                event = conn._next_event()
                if isinstance(event, h11.Data):
                    self.body_bytes += len(event.data)
                    if self.body_bytes > conn.limits.max_body_bytes:
                        raise Reject(413, f"request body over {conn.limits.max_body_bytes} bytes (max_request_bytes)")
                    return {"type": "http.request", "body": bytes(event.data), "more_body": True}
                if isinstance(event, h11.EndOfMessage):
                    self.body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                if conn.eof or isinstance(event, h11.ConnectionClosed):
                    self.disconnected.set()
                    return {"type": "http.disconnect"}
                try:
                    await conn._read(max(0.0, self.body_deadline - loop.time()))
                except TimeoutError:
                    raise Reject(
                        408, f"request body not received within {conn.limits.body_timeout:g}s (read_timeout)"
                    ) from None
        except Reject as e:
            self.reject = e  # answered by run() once the app lets go of the request
            self.disconnected.set()
            return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        conn = self.conn
        if self.disconnected.is_set() and self.reject is None:
            raise ConnectionResetError("the client disconnected")
        kind = message["type"]
        if kind == "http.response.start":
            if self.reject is not None:
                return  # run() answers with the rejection
            headers = [(k, v) for k, v in message.get("headers", [])]
            if conn.server.draining or not self.body_done:
                headers.append((b"connection", b"close"))  # an unread body cannot be skipped safely
            status = message["status"]
            conn._send(h11.Response(status_code=status, headers=headers, reason=phrase(status).encode()))
            self.started = True
        elif kind == "http.response.body":
            if self.reject is not None or not self.started:
                return
            body = message.get("body", b"")
            if body and self.request.method != b"HEAD":
                conn._send(h11.Data(data=body))
            if not message.get("more_body", False):
                conn._send(h11.EndOfMessage())
                self.finished = True
            try:  # a client that stops reading must not hold its request (and a drain) forever
                await asyncio.wait_for(conn.writer.drain(), conn.limits.write_timeout)
            except TimeoutError:
                unsent = conn.writer.transport.get_write_buffer_size()
                log.warning(
                    "gave up on %s %s from %s: the client read nothing for %gs (%d bytes unsent); connection closed",
                    self.request.method.decode(),
                    self.request.target.decode("latin-1"),
                    conn.client,
                    conn.limits.write_timeout,
                    unsent,
                )
                conn.close()
                raise ConnectionResetError(f"the client read nothing for {conn.limits.write_timeout:g}s") from None


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
