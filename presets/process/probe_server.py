"""The HTTP answer of a worker node: GET / and GET /healthz (or /health) only, for Kubernetes probes.

Rank 0 serves the API; a node without rank 0 still gets probed by Kubernetes (Kaito probes every
pod), so its local rank 0 answers these routes on the same HTTP server (its limits, no thread per
connection), run by an event loop on a thread of its own.
"""

import asyncio
import json
import threading

from presets.http.server import HttpServer

HEALTH = ("/healthz", "/health")


def probe_app(health):
    """An ASGI app answering the probes; `health()` -> (ok, detail)."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            status, body = 404, {"detail": f"{method} {path} is not served by a worker node; send requests to rank 0"}
        elif path == "/":
            status, body = 200, "Server is running"
        elif path in HEALTH:
            ok, detail = health()
            status, body = (200, {"status": "Healthy"}) if ok else (503, {"detail": detail})
        else:
            status, body = 404, {"detail": f"{path} is not served by a worker node; send requests to rank 0"}
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return app


def start_probe_server(host: str, port: int, health) -> HttpServer:
    """Serve the probes on (host, port) from a daemon thread; returns once it listens."""
    server = HttpServer(probe_app(health), host, port)
    started = threading.Event()

    async def main():
        await server.start()
        started.set()
        await asyncio.Event().wait()  # until the process ends

    threading.Thread(target=asyncio.run, args=(main(),), name="probes", daemon=True).start()
    started.wait(30)
    return server
