"""kvrelay's client SDK (gRPC): ``Client`` (blocking) and ``AsyncClient`` (asyncio).

from kvrelay.client import Client
with Client("localhost:50051", api_key="...") as c:
    print(c.generate("Once upon a time", max_tokens=32, temperature=0).text)
    for chunk in c.chat([{"role": "user", "content": "Hi"}], stream=True):
        print(chunk.text, end="", flush=True)
"""

from kvrelay.client._common import RetryPolicy
from kvrelay.client.async_client import AsyncClient
from kvrelay.client.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    KvrelayError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from kvrelay.client.sync_client import Client
from kvrelay.client.types import (
    ClusterStatus,
    GenerationChunk,
    GenerationResult,
    ModelInfo,
    Timing,
    Usage,
    WorkerStatus,
)

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "CancelledError",
    "Client",
    "ClusterStatus",
    "DeadlineExceededError",
    "GenerationChunk",
    "GenerationResult",
    "InternalError",
    "InvalidArgumentError",
    "KvrelayError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "Timing",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
    "WorkerStatus",
]
