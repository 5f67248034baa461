"""The one error type both frontends raise at the edge, and its gRPC / HTTP renderings.

Validation, auth and admission raise ``ApiError``; grpc_server turns it into a status code
(plus ``retry-after-ms`` trailing metadata), http_server into OpenAI's error JSON
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.
"""

from __future__ import annotations

import enum

import grpc


class ErrorCode(enum.Enum):
    # value: (gRPC status, HTTP status, OpenAI error type)
    INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
    NOT_FOUND = (grpc.StatusCode.NOT_FOUND, 404, "not_found_error")
    ALREADY_EXISTS = (grpc.StatusCode.ALREADY_EXISTS, 409, "invalid_request_error")
    RESOURCE_EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error")
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error")
    PERMISSION_DENIED = (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error")
    DEADLINE_EXCEEDED = (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error")
    UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error")
    INTERNAL = (grpc.StatusCode.INTERNAL, 500, "server_error")

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return int(self.value[1])

    @property
    def openai_type(self) -> str:
        return str(self.value[2])


class ApiError(Exception):
    """A request the frontend refuses; ``message`` is shown to the client as is."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the offending field, for OpenAI's error shape
        self.retry_after_s = retry_after_s  # RESOURCE_EXHAUSTED and UNAVAILABLE

    def __reduce__(self) -> tuple[object, ...]:
        # the controller raises it across Ray to the frontends (pickle rebuilds an exception
        # from ``args`` alone, which lacks the code)
        return (type(self), (self.code, self.message), self.__dict__)

    def openai_body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.code.openai_type,
                "param": self.param,
                "code": self.code.name.lower(),
            }
        }


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(ErrorCode.INVALID_ARGUMENT, message, param=param)
