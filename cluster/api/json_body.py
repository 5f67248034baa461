"""Typed field access for JSON request bodies (the HTTP frontend): a wrong type is refused with
INVALID_ARGUMENT naming the field, before any range check (cluster/api/validation.py)."""

from __future__ import annotations

from collections.abc import Mapping

from kvrelay.cluster.api.errors import invalid


class JsonFields:
    """Typed access to a JSON object's fields for the HTTP frontend: a wrong type raises
    INVALID_ARGUMENT naming the field (bool is never accepted as a number)."""

    def __init__(self, body: Mapping[str, object]) -> None:
        self._body = body

    def has(self, name: str) -> bool:
        return self._body.get(name) is not None

    def raw(self, name: str) -> object:
        return self._body.get(name)

    def number(self, name: str) -> float | None:
        v = self._body.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise invalid(f"{name} must be a number; got {type(v).__name__}", name)
        return float(v)

    def integer(self, name: str) -> int | None:
        v = self._body.get(name)
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            return int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(f"{name} must be an integer; got {type(v).__name__}", name)
        return v

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self._body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise invalid(f"{name} must be a boolean; got {type(v).__name__}", name)
        return v

    def string(self, name: str, default: str = "") -> str:
        v = self._body.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise invalid(f"{name} must be a string; got {type(v).__name__}", name)
        return v

    def int_list(self, name: str) -> list[int] | None:
        v = self._body.get(name)
        if v is None:
            return None
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise invalid(f"{name} must be a list of integers", name)
        return v

    def str_or_str_list(self, name: str) -> list[str]:
        v = self._body.get(name)
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or any(not isinstance(x, str) for x in v):
            raise invalid(f"{name} must be a string or a list of strings", name)
        return v
