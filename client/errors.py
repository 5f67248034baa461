"""Typed exceptions for the client SDK, one per gRPC status the server documents."""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class KvrelayError(Exception):
    """Base class: ``code`` is the gRPC status code, ``message`` the server's details."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(KvrelayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(KvrelayError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(KvrelayError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(KvrelayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds the server asked us to wait, if it said


class UnauthenticatedError(KvrelayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(KvrelayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceededError(KvrelayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(KvrelayError):
    code = grpc.StatusCode.UNAVAILABLE


class CancelledError(KvrelayError):
    code = grpc.StatusCode.CANCELLED


class InternalError(KvrelayError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[KvrelayError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        UnauthenticatedError,
        PermissionDeniedError,
        DeadlineExceededError,
        UnavailableError,
        CancelledError,
        InternalError,
    )
}


def retry_after_s(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    for key, value in metadata or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, float(value) / 1000.0)
            except ValueError:
                return None
    return None


def from_rpc_error(err: grpc.RpcError) -> KvrelayError:
    """Map a grpc error (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``) to our type."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        return ResourceExhaustedError(details, retry_after=retry_after_s(trailers))
    cls = _BY_CODE.get(code)
    if cls is None:
        return KvrelayError(details, code=code)
    return cls(details)
