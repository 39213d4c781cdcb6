"""ApiError: the one exception that becomes a JSON 4xx/5xx answer `{"detail": ...}`."""


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
