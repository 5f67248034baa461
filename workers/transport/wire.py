"""The KV transport's wire format: transfer headers, store key names, checksums (pure, no I/O).

A transfer is one header and one packed payload. Between gloo peers the header travels through
the rendezvous store (one key per message, ``<pair prefix>/to<rank>/msg/<seq>``) and the payload
over the pair's process group; headers in the store let the receiver learn each payload's size
and owner before it posts a receive, so no receive is ever left standing on an idle pair (gloo
closes a pair whose posted receive outlives the group timeout). Between same-GPU peers the
payload stays where it is, the header carries a CUDA IPC handle instead, and it travels on the
channel's control link (link.py; its address is the one store key ``<pair prefix>/link``).

Header (JSON object, UTF-8)::

    {"v": 1, "seq": 7, "tid": "req-42", "dtype": "float32", "shape": [16, 30, 2, 16, 3, 64],
     "nbytes": 5898240, "crc": 123456789 | null, "ipc": {...} | null}

Same-GPU ``ipc`` fields name either the sender's staging buffer (a packed payload) or, for
``send_blocks``, its whole KV cache plus ``"blocks"`` (ids into it) and ``"cache_shape"``: the
receiver copies those blocks straight out (:func:`block_source` checks them). Either way the
receiver acks on the link once it stopped reading the sender's memory, and the sender confirms
unless its deadline passed first; so both sides agree whether the copy counted.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import torch

WIRE_VERSION = 1
MAX_TRANSFER_ID_BYTES = 256
MAX_WORKER_ID_CHARS = 128
STOP = "__stop__"  # written by a channel's own side to wake and end its reader
BROKEN = "__broken__"  # written by one side to tell the other's reader the channel broke

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class TransferError(RuntimeError):
    """A transfer failed: peer lost, deadline passed, header mismatch or a corrupt payload."""


@dataclass(frozen=True, slots=True)
class Header:
    seq: int  # per (channel, direction), 0, 1, 2, ... in send order
    transfer_id: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    crc: int | None = None  # crc32 of the payload bytes, when the sender computed one
    ipc: dict[str, Any] | None = None  # CUDA IPC handle fields (same-GPU path only)

    def encode(self) -> str:
        return json.dumps(
            {
                "v": WIRE_VERSION,
                "seq": self.seq,
                "tid": self.transfer_id,
                "dtype": _DTYPE_NAMES[self.dtype],
                "shape": list(self.shape),
                "nbytes": self.nbytes,
                "crc": self.crc,
                "ipc": self.ipc,
            }
        )

    @staticmethod
    def decode(raw: bytes) -> Header:
        try:
            obj = json.loads(raw)
            if obj["v"] != WIRE_VERSION:
                raise TransferError(f"wire version {obj['v']} != {WIRE_VERSION}")
            shape = tuple(int(d) for d in obj["shape"])
            dtype = _DTYPES[obj["dtype"]]
            header = Header(
                seq=int(obj["seq"]),
                transfer_id=str(obj["tid"]),
                dtype=dtype,
                shape=shape,
                nbytes=int(obj["nbytes"]),
                crc=None if obj["crc"] is None else int(obj["crc"]),
                ipc=obj["ipc"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferError(f"malformed transfer header: {exc}") from exc
        if header.nbytes != payload_nbytes(header.shape, header.dtype):
            raise TransferError(f"header nbytes {header.nbytes} does not match shape/dtype")
        return header


def block_source(header: Header) -> tuple[tuple[int, ...], list[int]] | None:
    """For a same-GPU header naming blocks of the sender's KV cache: (the cache's shape, the block
    ids), checked against the header's ``[n, ...]`` shape; None for any other header."""
    ipc = header.ipc
    if not isinstance(ipc, dict) or "blocks" not in ipc:
        return None
    try:
        cache_shape = tuple(int(d) for d in ipc["cache_shape"])
        ids = [int(b) for b in ipc["blocks"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise TransferError(f"malformed block list: {exc}") from exc
    if not cache_shape or min(cache_shape) < 0 or (len(ids), *cache_shape[1:]) != header.shape:
        raise TransferError(
            f"{len(ids)} blocks of a {list(cache_shape)} cache do not make {list(header.shape)}"
        )
    if any(not 0 <= b < cache_shape[0] for b in ids):
        raise TransferError(f"block id outside the sender's {cache_shape[0]}-block cache")
    return cache_shape, ids


def dtype_supported(dtype: torch.dtype) -> bool:
    return dtype in _DTYPE_NAMES


def payload_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        if d < 0:
            raise TransferError(f"negative dimension in {shape}")
        n *= d
    return n * dtype.itemsize


def checksum(payload: torch.Tensor) -> int:
    """crc32 of the payload's bytes (a debugging aid: costs a host pass over the payload)."""
    flat = payload.detach().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.cpu().numpy().data)


def validate_worker_id(worker_id: str) -> str:
    if not isinstance(worker_id, str) or not worker_id or len(worker_id) > MAX_WORKER_ID_CHARS:
        raise ValueError(f"worker id must be 1..{MAX_WORKER_ID_CHARS} characters: {worker_id!r}")
    if "/" in worker_id or not worker_id.isprintable() or worker_id != worker_id.strip():
        raise ValueError(f"worker id must be printable, without '/' or edge spaces: {worker_id!r}")
    return worker_id


def validate_transfer_id(transfer_id: str) -> str:
    if not isinstance(transfer_id, str) or not transfer_id:
        raise ValueError(f"transfer id must be a non-empty string: {transfer_id!r}")
    if len(transfer_id.encode()) > MAX_TRANSFER_ID_BYTES:
        raise ValueError(f"transfer id longer than {MAX_TRANSFER_ID_BYTES} bytes")
    return transfer_id


# Store keys. Every pair's keys live under a prefix that names both incarnations and the epoch,
# so a restarted worker or a rebuilt group never reads a stale key.
def worker_info_key(worker_id: str) -> str:
    return f"kvrelay/worker/{worker_id}/info"


def worker_incarnation_key(worker_id: str) -> str:
    return f"kvrelay/worker/{worker_id}/incarnation"


def pair_epoch_key(a: str, b: str) -> str:
    return f"kvpair/{a}/{b}/epoch"


def pair_prefix(a: str, b: str, inc_a: int, inc_b: int, epoch: int) -> str:
    return f"kvpair/{a}/{b}/{inc_a}.{inc_b}.{epoch}"


def msg_key(prefix: str, to_rank: int, seq: int) -> str:
    return f"{prefix}/to{to_rank}/msg/{seq}"


def link_key(prefix: str) -> str:
    return f"{prefix}/link"


def hello_key(prefix: str, rank: int) -> str:
    return f"{prefix}/hello/{rank}"
