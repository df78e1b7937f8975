"""Where corejax keeps its files: the cache root. A module of its own (no imports from the rest of corejax) so that
the native-kernel build (native.py), the hub and the runtime share it without the kernel layer importing the hub."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "COREJAX_CACHE"


def cache_dir() -> Path:
    """The cache root: $COREJAX_CACHE, else $XDG_CACHE_HOME/corejax, else ~/.cache/corejax (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return (Path(base).expanduser() / "corejax").absolute()
