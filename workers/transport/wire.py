"""The KV transport's wire format: transfer headers, store key names, checksums (pure, no I/O).

A transfer is one header and one packed payload. Between gloo peers the header travels through
the rendezvous store (one key per message, ``<pair prefix>/to<rank>/msg/<seq>``) and the payload
over the pair's process group; headers in the store let the receiver learn each payload's size
and owner before it posts a receive, so no receive is ever left standing on an idle pair (gloo
closes a pair whose posted receive outlives the group timeout). Between same-GPU peers the
payload stays where it is, the header carries a CUDA IPC handle instead, and it travels on the
channel's control link (link.py; its address is the one store key ``<pair prefix>/link``).

Header: a JSON object (ASCII, one line), then, for ``send_blocks``, a newline and a binary
section holding the block ids (JSON never holds a raw newline, so the first one ends it)::

    {"v": 2, "seq": 7, "tid": "req-42", "dtype": "float32", "shape": [16, 30, 2, 16, 3, 64],
     "nbytes": 5898240, "crc": 123456789 | null, "ipc": {...} | null, "blocks": 128 | null}
    <newline> <128 bytes: 16 int64 block ids in this host's byte order (one GPU, one host)>

``"blocks"`` declares the section's length (null: no section), so a short or padded frame fails
to decode; the ids cost one bytes copy each way however many there are, not a JSON number each.
Same-GPU ``ipc`` fields name either the sender's staging buffer (a packed payload) or, for
``send_blocks``, its whole KV cache plus ``"cache_shape"``: the receiver copies the blocks the
section names straight out (:func:`block_source` checks them). Either way the receiver acks on
the link once it stopped reading the sender's memory, and the sender confirms unless its
deadline passed first; so both sides agree whether the copy counted. Headers through the store
(gloo) never carry a section: they are plain JSON.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import torch

WIRE_VERSION = 2  # 2: block ids in a binary section, not a JSON list
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
_ID_BYTES = 8  # a block id in the binary section: int64


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
    blocks: bytes | None = None  # send_blocks: the binary section (block_ids_section)

    def encode(self) -> bytes:
        text = json.dumps(
            {
                "v": WIRE_VERSION,
                "seq": self.seq,
                "tid": self.transfer_id,
                "dtype": _DTYPE_NAMES[self.dtype],
                "shape": list(self.shape),
                "nbytes": self.nbytes,
                "crc": self.crc,
                "ipc": self.ipc,
                "blocks": None if self.blocks is None else len(self.blocks),
            }
        ).encode()
        return text if self.blocks is None else b"%s\n%s" % (text, self.blocks)

    @staticmethod
    def decode(raw: bytes) -> Header:
        end = raw.find(b"\n")
        text, section = (raw, None) if end < 0 else (raw[:end], raw[end + 1 :])
        try:
            obj = json.loads(text)
            if obj["v"] != WIRE_VERSION:
                raise TransferError(f"wire version {obj['v']} != {WIRE_VERSION}")
            shape = tuple(int(d) for d in obj["shape"])
            dtype = _DTYPES[obj["dtype"]]
            declared = None if obj["blocks"] is None else int(obj["blocks"])
            header = Header(
                seq=int(obj["seq"]),
                transfer_id=str(obj["tid"]),
                dtype=dtype,
                shape=shape,
                nbytes=int(obj["nbytes"]),
                crc=None if obj["crc"] is None else int(obj["crc"]),
                ipc=obj["ipc"],
                blocks=section,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferError(f"malformed transfer header: {exc}") from exc
        if declared != (None if section is None else len(section)):
            got = "none" if section is None else f"{len(section)} bytes"
            raise TransferError(f"header declares a {declared}-byte binary section, got {got}")
        if header.nbytes != payload_nbytes(header.shape, header.dtype):
            raise TransferError(f"header nbytes {header.nbytes} does not match shape/dtype")
        return header


def block_ids_section(ids: torch.Tensor) -> bytes:
    """``[n]`` block ids (any integer dtype, any device) as a header's binary section."""
    if ids.dtype != torch.int64 or not ids.is_cpu:
        ids = ids.to(device="cpu", dtype=torch.int64)
    return ids.numpy().tobytes()


def block_source(header: Header) -> tuple[tuple[int, ...], torch.Tensor] | None:
    """For a same-GPU header naming blocks of the sender's KV cache: (the cache's shape, the block
    ids as a ``[n]`` int64 host tensor), checked against the header's ``[n, ...]`` shape and the
    cache's block count; None for any other header. One vectorised pass, whatever ``n``."""
    section = header.blocks
    if section is None:
        return None
    ipc = header.ipc
    try:
        if not isinstance(ipc, dict):
            raise TypeError("block ids without IPC fields")
        cache_shape = tuple(int(d) for d in ipc["cache_shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TransferError(f"malformed block list: {exc}") from exc
    n, odd = divmod(len(section), _ID_BYTES)
    if odd or not cache_shape or min(cache_shape) < 0 or (n, *cache_shape[1:]) != header.shape:
        raise TransferError(
            f"{len(section)} bytes of block ids of a {list(cache_shape)} cache do not make "
            f"{list(header.shape)}"
        )
    if n == 0:
        return cache_shape, torch.empty(0, dtype=torch.int64)
    ids = torch.frombuffer(bytearray(section), dtype=torch.int64)  # (a writable copy)
    low, high = torch.aminmax(ids)
    if int(low) < 0 or int(high) >= cache_shape[0]:
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
