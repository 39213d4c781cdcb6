"""X-Request-Timeout: a client's deadline, in seconds, for its request to start running (docs/api.md).

A header, not a body field, so that it means the same on every route of every server (Kaito's, OpenAI's,
llm-api's) without a change to any body's schema, and so that a proxy or gateway can set it for its clients.
"""

import re

from presets.errors import ApiError

HEADER = "X-Request-Timeout"
MAX_SECONDS = 3600  # an hour: no request should wait longer in a queue; a larger value is a client's mistake
NUMBER = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")  # plain decimal seconds: no sign, exponent, inf or nan


def parse(values: list[str]) -> float | None:
    """The seconds the header's one value says; None when it is absent. 400 naming the header for anything else
    than one decimal number in (0, MAX_SECONDS]."""
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"{HEADER} was sent {len(values)} times: send it once")
    value = values[0].strip()
    if not NUMBER.fullmatch(value) or not 0 < float(value) <= MAX_SECONDS:
        raise ApiError(
            400,
            f"{HEADER} must be a number of seconds, more than 0 and at most {MAX_SECONDS} (got {value[:40]!r})",
        )
    return float(value)
