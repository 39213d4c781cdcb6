"""The HTTP answer of a worker node: GET / and GET /healthz only, for Kubernetes probes.

Rank 0 serves the API with gunicorn; a node without rank 0 still gets probed by Kubernetes (Kaito
probes every pod), so its local rank 0 answers these two routes from a thread of its own.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start_probe_server(host: str, port: int, health) -> ThreadingHTTPServer:
    """Serve GET / and GET /healthz on (host, port) in a daemon thread; `health()` -> (ok, detail)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/":
                self._send(200, "Server is running")
            elif self.path == "/healthz":
                ok, detail = health()
                self._send(200, {"status": "Healthy"}) if ok else self._send(503, {"detail": detail})
            else:
                self._not_here()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._not_here()

        def _not_here(self):
            self._send(404, {"detail": f"{self.path} is not served by a worker node; send requests to rank 0"})

        def _send(self, status: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # probes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server
