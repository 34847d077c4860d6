"""The working-memory budget that chunked kernels stay under."""
from __future__ import annotations

import os

_DEFAULT = 64 << 20  # 64 MiB
_override: int | None = None


def chunk_bytes() -> int:
    """Bytes a kernel may use for one chunk of temporaries.

    ``set_chunk_bytes`` wins, then ``$L1FX_CHUNK_BYTES``, then 64 MiB.
    """
    if _override is not None:
        return _override
    env = os.environ.get("L1FX_CHUNK_BYTES")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"L1FX_CHUNK_BYTES={env!r} is not an integer number of bytes") from None
        if value <= 0:
            raise ValueError(f"L1FX_CHUNK_BYTES must be positive, got {value}")
        return value
    return _DEFAULT


def set_chunk_bytes(value: int | None) -> None:
    """Set the chunk budget in bytes (``None`` restores the default)."""
    global _override
    if value is not None and int(value) <= 0:
        raise ValueError(f"chunk budget must be positive, got {value}")
    _override = None if value is None else int(value)


def split(total: int, per_item_bytes: int, budget: int) -> int:
    """How many items of ``per_item_bytes`` fit in ``budget`` (at least 1)."""
    if per_item_bytes <= 0:
        return max(total, 1)
    return max(1, min(max(total, 1), budget // per_item_bytes))
