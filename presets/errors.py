"""ApiError: the one exception that becomes a JSON 4xx/5xx answer: `{"detail": ...}` on the Kaito routes,
OpenAI's error object on the /v1 routes (`openai_error`)."""


class ApiError(Exception):
    def __init__(
        self, status: int, detail: str, headers: dict | None = None, param: str | None = None, code: str | None = None
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.param = param  # the request field at fault, when there is one (OpenAI's error.param)
        self.code = code  # OpenAI's error.code ("model_not_found")


# OpenAI's error types by HTTP status (its SDKs raise a class per status and show error.message).
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if code == "model_not_found":
        kind = "invalid_request_error"  # as OpenAI types its own 404 for an unknown model
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_not_found(name, served: list[str], param: str) -> ApiError:
    return ApiError(404, f"model {name!r} not found; this server serves {served}", param=param, code="model_not_found")
