"""A test client that speaks real HTTP: the app on our HTTP server, in a thread of this process, on loopback.

It offers what the tests used of Flask's test client (get/post/head; status_code, get_json(), json,
get_data(), headers, mimetype), so every in-process test also goes through the real HTTP layer.
"""

import asyncio
import json as jsonlib
import threading

import requests

from presets.http.server import HttpServer, Limits


def error_message(r) -> str:
    """The message of an error answer: OpenAI's error object on /v1, {"detail": ...} elsewhere."""
    body = r.get_json()
    return body["error"]["message"] if "error" in body else body["detail"]


class LiveResponse:
    def __init__(self, r: requests.Response):
        self.raw = r
        self.status_code = r.status_code
        self.headers = r.headers
        self.data = r.content
        self.mimetype = (r.headers.get("Content-Type") or "").split(";")[0].strip()

    def get_json(self):
        return jsonlib.loads(self.data)

    @property
    def json(self):
        return self.get_json()

    @property
    def text(self) -> str:
        return self.data.decode()

    def get_data(self, as_text: bool = False):
        return self.data.decode() if as_text else self.data


class LiveClient:
    def __init__(self, app, limits: Limits | None = None):
        self.application = app  # as Flask's test client names it
        self.server = HttpServer(app, "127.0.0.1", 0, limits or Limits())
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="live-client", daemon=True)
        self.thread.start()
        started.wait(10)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.session = requests.Session()

    def open(self, method: str, path: str, json=None, data=None, headers=None, content_type=None, timeout=120):
        headers = dict(headers or {})
        if content_type:
            headers["Content-Type"] = content_type
        elif data is not None and json is None and "Content-Type" not in headers:
            headers["Content-Type"] = "application/json"
        r = requests.request(method, self.url + path, json=json, data=data, headers=headers, timeout=timeout)
        return LiveResponse(r)

    def get(self, path: str, **kw):
        return self.open("GET", path, **kw)

    def post(self, path: str, **kw):
        return self.open("POST", path, **kw)

    def head(self, path: str, **kw):
        return self.open("HEAD", path, **kw)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
