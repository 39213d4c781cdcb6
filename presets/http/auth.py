"""Optional API keys: `Authorization: Bearer KEY` on every route but GET (and HEAD) of the open ones."""

import hmac
import os

from presets.errors import ApiError

OPEN_ROUTES = ("/", "/healthz", "/health", "/metrics", "/check")  # /check: llm-api's liveness route


def load_keys(key: str, key_file: str) -> list[str]:
    """Keys from --api_key (or PRESET_API_KEY) and --api_key_file (one per line, # comments)."""
    keys = [key] if key else []
    if key_file:
        if not os.path.isfile(key_file):
            raise ValueError(f"api_key_file not found: {key_file}")
        with open(key_file) as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return keys


def check(keys: list[str], method: str, path: str, authorization: str | None) -> None:
    """Raise 401 unless the route is open or the bearer token is one of `keys` (constant-time compare)."""
    if not keys or (method in ("GET", "HEAD") and path in OPEN_ROUTES):
        return
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    ok = False
    for key in keys:  # compare with every key, so the time does not say which one nearly matched
        ok |= hmac.compare_digest(given, key.encode())
    if not ok:
        raise ApiError(
            401, "missing or invalid API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"}
        )
