"""Run a server process: the app on the HTTP server until POST /shutdown, SIGTERM or a fatal error.

SIGTERM (every Kubernetes rollout, scale-down and node drain) drains: new requests and the health
probes answer 503 at once, so readiness drops; requests and streams in flight go on for up to
--drain_timeout seconds; what is left then ends with an error that says so; the engine stops
(with several ranks it tells them to exit) and the process exits 0 (1 when the model had failed: torchrun
SIGTERMs rank 0 after another rank died).
"""

import asyncio
import logging
import os
import signal
import sys

from presets.http.server import HttpServer, Limits

log = logging.getLogger(__name__)


class ServerProcess:
    """The process's HTTP server and its end. `exit(code)` may be called from any thread."""

    def __init__(self, host: str, port: int, http):
        """`http`: the HTTP settings (presets.process.settings.HttpSettings)."""
        self.host, self.port, self.http = host, port, http
        self.code: int | None = None
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    def limits(self) -> Limits:
        h = self.http
        return Limits(
            max_connections=h.max_connections,
            header_timeout=h.read_timeout,
            body_timeout=h.read_timeout,
            max_body_bytes=h.max_request_bytes,
            write_timeout=h.write_timeout,
        )

    def exit(self, code: int = 0) -> None:
        """End the server: 0 after POST /shutdown (once its answer is out), non-zero on a fatal error
        (after 2 s, so that waiting requests get their 503s and the probes see them)."""
        delay = 0.2 if code == 0 else 2.0
        if self._loop is None:  # not serving yet
            logging.shutdown()
            os._exit(code)
        self._loop.call_soon_threadsafe(self._loop.call_later, delay, self._finish, code)

    def _finish(self, code: int) -> None:
        if self.code is None:
            self.code = code
            self._stopped.set()

    def serve(self, app, rt) -> None:
        """Serve `app` (whose Runtime is `rt`) until the end, then exit the process with its code."""
        code = asyncio.run(self._main(app, rt))
        sys.stdout.flush()
        logging.shutdown()
        os._exit(code)  # no atexit hooks: a process group of peers that left must not hang the exit

    async def _main(self, app, rt) -> int:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = HttpServer(app, self.host, self.port, self.limits())
        await server.start()
        log.info("serving HTTP on %s:%d (max_connections %d)", self.host, server.port, self.http.max_connections)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, lambda s=sig: self._loop.create_task(self._drain(server, rt, s)))
        await self._stopped.wait()
        await server.close(grace=5)
        await asyncio.to_thread(rt.shutdown)  # idempotent: the engine stops, other ranks are told to exit
        log.info("server stopped (exit code %d)", self.code)
        return self.code

    async def _drain(self, server: HttpServer, rt, sig) -> None:
        if self.draining:
            log.warning("%s again while draining: ending now", signal.Signals(sig).name)
            await asyncio.to_thread(rt.shutdown, "server is shutting down (a second signal)")
            self._finish(1 if rt.state == "failed" else 0)
            return
        self.draining = True
        timeout = self.http.drain_timeout
        log.info(
            "%s: draining (%d requests in flight, up to %gs)", signal.Signals(sig).name, server.active_requests, timeout
        )
        rt.drain()
        server.drain()
        deadline = self._loop.time() + timeout
        while server.active_requests and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        if server.active_requests:
            log.warning(
                "drain_timeout (%gs) ran out with %d requests in flight: ending them", timeout, server.active_requests
            )
        reason = f"server is shutting down: drain_timeout ({timeout:g}s) ran out before this request finished"
        await asyncio.to_thread(rt.shutdown, reason)
        self._finish(1 if rt.state == "failed" else 0)  # a signal after a failure (torchrun's, on a lost rank) keeps 1


def run(build_app, http, host: str, port: int) -> None:
    """Build the app with `build_app(exit)` (its model loads in the background), serve it, exit."""
    proc = ServerProcess(host, port, http)
    app = build_app(proc.exit)
    rt = app.extensions["runtime"]
    rt.request_timeout = http.request_timeout
    proc.serve(app, rt)
