"""Auth, admission control, the client's retry policy and error mapping."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kvrelay.client import (
    InvalidArgumentError,
    KvrelayError,
    ResourceExhaustedError,
    RetryPolicy,
    UnavailableError,
)
from kvrelay.client.errors import from_rpc_error
from kvrelay.cluster.api.auth import ApiKeys, bearer_token
from kvrelay.cluster.api.errors import ApiError, ErrorCode
from kvrelay.cluster.api.limits import Admission, FrontendLimits


def code_of(keys: ApiKeys, header: str | None, admin: bool) -> ErrorCode | None:
    try:
        keys.check(header, admin=admin)
    except ApiError as err:
        return err.code
    return None


def test_auth_rules() -> None:
    open_ = ApiKeys()
    assert code_of(open_, None, admin=True) is None
    keys = ApiKeys.from_strings(["user-key"], ["admin-key"])
    assert code_of(keys, "Bearer user-key", admin=False) is None
    assert code_of(keys, "bearer admin-key", admin=False) is None
    assert code_of(keys, "Bearer admin-key", admin=True) is None
    assert code_of(keys, None, admin=False) is ErrorCode.UNAUTHENTICATED
    assert code_of(keys, "Bearer nope", admin=False) is ErrorCode.UNAUTHENTICATED
    assert code_of(keys, "Basic user-key", admin=False) is ErrorCode.UNAUTHENTICATED
    assert code_of(keys, "Bearer user-key", admin=True) is ErrorCode.PERMISSION_DENIED
    assert code_of(keys, "Bearer nope", admin=True) is ErrorCode.UNAUTHENTICATED
    only_user = ApiKeys.from_strings(["u"])
    assert code_of(only_user, "Bearer u", admin=True) is None  # no admin keys configured
    assert "user-key" not in repr(keys) and "admin-key" not in repr(keys)
    assert bearer_token("Bearer  k ") == "k" and bearer_token("Bearer") is None
    with pytest.raises(ValueError):
        ApiKeys.from_strings([""])


def test_admission_bounds_streams_and_queue() -> None:
    async def main() -> None:
        adm = Admission(FrontendLimits(max_streams=2, max_queue=1, retry_after_s=0.5))
        await adm.acquire()
        await adm.acquire()
        waiter = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        assert adm.waiting == 1 and not waiter.done()
        with pytest.raises(ApiError) as info:
            await adm.acquire()
        assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert info.value.retry_after_s == 0.5
        adm.check_integrity()
        adm.release()  # the slot goes to the waiter, running stays 2
        await asyncio.wait_for(waiter, 1)
        assert adm.running == 2 and adm.waiting == 0
        adm.release()
        adm.release()
        assert adm.running == 0
        adm.check_integrity()

    asyncio.run(main())


def test_admission_queue_timeout_and_cancel_leave_nothing_behind() -> None:
    async def main() -> None:
        adm = Admission(FrontendLimits(max_streams=1, max_queue=4, queue_timeout_s=60))
        await adm.acquire()
        with pytest.raises(ApiError) as info:
            await adm.acquire(timeout_s=0.01)
        assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
        task = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adm.waiting == 0
        adm.release()
        assert adm.running == 0
        adm.check_integrity()

    asyncio.run(main())


def test_retry_policy_only_retries_safe_errors() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=1.0)
    assert policy.delay(1, InvalidArgumentError("x"), None) is None
    wait = policy.delay(1, UnavailableError("x"), None)
    assert wait is not None and 0 <= wait <= 0.1
    assert policy.delay(3, UnavailableError("x"), None) is None  # attempts used up
    hinted = policy.delay(1, ResourceExhaustedError("busy", retry_after=0.7), None)
    assert hinted == pytest.approx(0.7, abs=0.1) and hinted >= 0.7
    # RESOURCE_EXHAUSTED without the server's hint is not admission (e.g. message too large)
    assert policy.delay(1, ResourceExhaustedError("too big"), None) is None
    # never waits past the caller's deadline
    assert policy.delay(1, ResourceExhaustedError("busy", retry_after=2.0), 1.0) is None


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers=()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailers


def test_status_codes_map_to_typed_errors() -> None:
    err = from_rpc_error(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "250"),))
    )
    assert isinstance(err, ResourceExhaustedError) and err.retry_after == 0.25
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad top_p"))
    assert isinstance(err, InvalidArgumentError) and err.message == "bad top_p"
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.DATA_LOSS, "?"))
    assert type(err) is KvrelayError and err.code == grpc.StatusCode.DATA_LOSS
