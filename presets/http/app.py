"""Quart app factory with the routes every server has: GET /, /healthz, /health, /metrics, POST /shutdown.

Quart is Flask's asyncio sibling (same API, by the same maintainers): a route awaits the engine
instead of holding a thread, so thousands of open requests and streams cost no OS thread each
(presets/http/server.py serves it; docs/design.md, "The HTTP layer").
"""

import asyncio
import logging
import time

from quart import Blueprint, Quart, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from presets.errors import ApiError, openai_error
from presets.http import auth, deadline

log = logging.getLogger("presets.requests")

common = Blueprint("common", __name__)

PROBES = ("/", "/healthz", "/health", "/check")


def runtime():
    """The Runtime of the app serving this request."""
    return current_app.extensions["runtime"]


def record(seqs) -> None:
    """Note a request's sequences for its log line."""
    record_counts(len(seqs), sum(len(s.prompt) for s in seqs), sum(len(s.output) for s in seqs))


def record_counts(sequences: int, prompt_tokens: int, generated_tokens: int) -> None:
    g.sequences, g.prompt_tokens, g.generated_tokens = sequences, prompt_tokens, generated_tokens


def log_request(method, path, status, sequences, prompt_tokens, generated_tokens, seconds, end="") -> None:
    """The one log line of a request; `end`: how a stream ended when not with its last event (the client left...)."""
    log.info(
        "%s %s %d sequences=%d prompt_tokens=%d generated_tokens=%d seconds=%.3f%s",
        method,
        path,
        status,
        sequences,
        prompt_tokens,
        generated_tokens,
        seconds,
        f" end={end}" if end else "",
    )


def logged_stream(events, usage: dict):
    """A stream's chunks (the async generator `events`) with the request's log line written when the stream
    ends: its counts from `usage` (the runner fills them), and `end=client_gone` when the client left or
    stopped reading before the last chunk, or `end=` what `events` put in usage["end"] (an error's status)."""
    started, method, path = g.get("start", time.perf_counter()), request.method, request.path
    g.streamed = True  # the log line comes when the stream ends, not with the headers

    async def logged():
        end = "client_gone"
        try:
            async for chunk in events:
                yield chunk
            end = usage.get("end", "")
        finally:
            await events.aclose()
            log_request(
                method,
                path,
                200,
                usage["sequences"],
                usage["prompt_tokens"],
                usage["completion_tokens"],
                time.perf_counter() - started,
                end,
            )

    return logged()


@common.get("/")
def index():
    """Liveness of the HTTP server itself."""
    return jsonify("Server is running")


@common.get("/healthz")
@common.get("/health")
def healthz():
    """200 only when the model is loaded, warmed up and its engine thread is stepping, and not draining
    (/health is Kaito's current probe path, /healthz its older one)."""
    ok, detail = runtime().health()
    if ok:
        return jsonify(status="Healthy")
    return jsonify(detail=detail), 503


@common.get("/metrics")
def metrics():
    """Prometheus text format."""
    return Response(runtime().metrics.render(), mimetype="text/plain; version=0.0.4")


# Headers every current browser sends with a POST (fetch, XHR or form) and command-line clients do not.
BROWSER_HEADERS = ("Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest")


@common.post("/shutdown")
async def shutdown():
    """Answer 200 {}, then stop the engine and exit 0. Never for a web browser: a page's origin proves nothing
    (under DNS rebinding a hostile page is same-origin with the server), so any browser's request is refused."""
    sent = [h for h in BROWSER_HEADERS if h in request.headers]
    if sent:
        raise ApiError(
            403,
            f"POST /shutdown from a web browser is refused (it sent {', '.join(sent)}); "
            "send it with curl or the Kubernetes preStop hook",
        )
    await asyncio.to_thread(runtime().shutdown)  # waits for the engine's current step, off the event loop
    current_app.extensions["shutdown"]()
    return jsonify({})


JSON_TYPES = ("application/json", "application/x-ndjson")


def create_app(runtime_, blueprints, shutdown=lambda: None, api_keys=()) -> Quart:
    """An app serving `runtime_` with the common routes plus the family's `blueprints`.

    `shutdown` is called by POST /shutdown after the engine stops; the launcher passes one that
    ends the process once the answer is sent. Body size and read time are the HTTP server's limits.
    """
    app = Quart("presets")
    app.config.update(MAX_CONTENT_LENGTH=None, BODY_TIMEOUT=None, RESPONSE_TIMEOUT=None)
    app.url_map.merge_slashes = False  # no redirects: werkzeug builds their Location from the Host header
    app.url_map.strict_slashes = False
    app.json.ensure_ascii = False
    app.json.sort_keys = False
    app.extensions["runtime"] = runtime_
    app.extensions["shutdown"] = shutdown
    app.register_blueprint(common)
    for bp in blueprints:
        app.register_blueprint(bp)

    _error_handlers(app)
    _request_hooks(app, runtime_, list(api_keys))
    return app


def _error(status: int, message: str, headers=None, param=None, code=None):
    """The Kaito routes' {"detail": ...}, or OpenAI's error object on the /v1 routes."""
    body = openai_error(status, message, param, code) if request.path.startswith("/v1/") else {"detail": message}
    return jsonify(body), status, headers or {}


def _error_handlers(app: Quart) -> None:
    """Every error a JSON answer: an ApiError as it says, werkzeug's (404, 405) with their text, anything else a
    500 naming only its type (its traceback goes to the log)."""

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        return _error(e.status, e.detail, e.headers, e.param, e.code)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return _error(e.code, f"{e.name}: {e.description}")

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=e)
        return _error(500, f"internal error: {type(e).__name__}")


def _request_hooks(app: Quart, runtime_, api_keys: list[str]) -> None:
    """Before a route: its start time, the API key, JSON bodies only, the client's deadline to start
    (X-Request-Timeout). After: the 503 count and the log line."""

    @app.before_request
    def start_timer():
        g.start = time.perf_counter()
        auth.check(api_keys, request.method, request.path, request.headers.get("Authorization"))
        has_body = bool(request.content_length) or "Transfer-Encoding" in request.headers
        if request.method == "POST" and has_body and request.mimetype not in JSON_TYPES:
            # Also what keeps a web page from sending a no-preflight cross-site POST with a body (a form,
            # text/plain); a bodiless one (Kaito's documented `curl -X POST .../shutdown`) meets /shutdown's
            # browser check.
            raise ApiError(
                415,
                f"POST bodies must be JSON: send Content-Type: application/json "
                f"(got {request.headers.get('Content-Type') or 'none'})",
            )

    @app.before_request
    async def client_deadline():
        # A coroutine, so that what it sets is in the request's own context (Quart runs a sync hook on a thread);
        # each request runs in a task of its own, so one without the header starts with no deadline.
        seconds = deadline.parse(request.headers.getlist(deadline.HEADER))
        if seconds is not None:
            runtime_.start_within(seconds, f"{deadline.HEADER} of {seconds:g}s")

    @app.after_request
    def after(response):
        if response.status_code == 503 and request.path not in PROBES:  # a probe is not a refused request
            runtime_.metrics.rejected.inc()
        if request.path not in PROBES and not g.get("streamed"):  # probes would drown the log; a stream logs at its end
            log_request(
                request.method,
                request.path,
                response.status_code,
                g.get("sequences", 0),
                g.get("prompt_tokens", 0),
                g.get("generated_tokens", 0),
                time.perf_counter() - g.get("start", time.perf_counter()),
            )
        return response
