"""Byte sizes as users write them ("2GiB", "512MiB", "1.5GB") and as messages print them; no JAX."""

from __future__ import annotations

import re
from typing import Any

from corejax.errors import InvalidParameterError

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: Any, name: str = "memory_limit") -> int:
    """A byte count from an int or a string such as "512MiB", "2GiB", "1.5GB", "800M" (K/M/G/T without B are
    binary, as in Docker; KB/MB/GB/TB are decimal) -> int bytes > 0, or InvalidParameterError."""
    if isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be a number of bytes or a size like '2GiB'; got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidParameterError(f"{name} must be a positive number of bytes; got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        unit = m and _UNITS.get(m.group(2).lower())
        if m and unit:
            n = int(float(m.group(1)) * unit)
            if n > 0:
                return n
            raise InvalidParameterError(f"{name} must be larger than zero; got {value!r}")
        raise InvalidParameterError(
            f"{name} {value!r} is not a size; write a number of bytes or a number with a unit, such as "
            "'512MiB', '2GiB' or '1.5GB' (units: B, KiB/K, MiB/M, GiB/G, TiB/T binary; KB, MB, GB, TB decimal)")
    raise InvalidParameterError(
        f"{name} must be an int (bytes) or a string like '2GiB'; got {type(value).__name__} {value!r}")


def format_size(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
