"""The one exception the gate's request path raises, and its OpenAI-format body."""

from __future__ import annotations


class GateError(Exception):
    """A request the gate answers itself with an error in OpenAI's format: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.retry_after = retry_after  # seconds, sent as a Retry-After header
        self.extra_headers = headers or {}  # e.g. the Allow of a 405

    def __reduce__(self) -> tuple:  # whole across a process boundary (workers.py), not just its message
        return (
            GateError,
            (self.status, self.message, self.code, self.param, self.type, self.retry_after, self.extra_headers),
        )

    def headers(self) -> dict[str, str]:
        out = dict(self.extra_headers)
        if self.retry_after is not None:
            out["Retry-After"] = str(self.retry_after)
        return out

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
