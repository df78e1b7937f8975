"""The repacked-weights cache's files, the part without JAX: where a model's cache file is, the file's fixed
prefix, the switch that turns the cache off, and a sandboxed worker's staging folder. The parent process (which
never imports JAX) names the file for its worker and moves what the worker wrote into place; writing and mapping
the params is corejax/loading/weights_cache.py, whose docstring has the format and its rules."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

ENV = "COREJAX_WEIGHTS_CACHE"
LAYOUT_VERSION = 1
SUFFIX = ".cjw"
MAGIC = b"CJWEIGHT"
FORMAT = 1
PREFIX = struct.Struct("<8sIIIQQ")  # magic, format, header length, header CRC-32, data start, total size
PREFIX_BYTES = 64
ALIGN = 4096
MAX_HEADER = 64 << 20


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Where a load looks for a cache file (read) and where it writes a new one (write): the same path
    in-process; in a sandboxed worker, write is in the staging folder the parent moves it from (WorkerStage); None:
    a read-only cache, nothing is written."""

    read: Path
    write: Path | None


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_root() -> Path:
    from corejax.paths import cache_dir

    return cache_dir() / "weights"


def identity(source: Path) -> dict[str, Any]:
    """The model file's identity: a file replaced, rewritten or touched gets a new one."""
    path = Path(source).resolve()
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "device": st.st_dev}


def cache_key(ident: dict[str, Any], kernels: str) -> dict[str, Any]:
    from corejax.version import __version__

    return {"source": ident, "layout": LAYOUT_VERSION, "corejax": __version__, "kernels": kernels}


def cache_file(source: Path, kernels: str, root: Path | None = None) -> Path:
    """The cache file of one model file (its identity) for one native-kernel build (ffi.library_key)."""
    ident = identity(source)
    digest = hashlib.sha256(json.dumps(cache_key(ident, kernels), sort_keys=True).encode()).hexdigest()[:16]
    where = hashlib.sha256(ident["path"].encode()).hexdigest()[:8]  # files of one name in two folders differ
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(source).stem)[:80]
    return (root or cache_root()) / f"{stem}-{where}-{digest}{SUFFIX}"


def from_options(options: dict | None) -> CachePlan | None:
    """A sandboxed worker's plan, as the parent passed it (WorkerStage.options); None: the cache is off."""
    if not options:
        return None
    return CachePlan(Path(options["read"]), Path(options["write"]) if options.get("write") else None)


@dataclasses.dataclass
class WorkerStage:
    """The parent's side for a sandboxed worker: the worker may read the model's cache file (final) and write
    a new one only into its own staging folder (stage, beside the cache files: the same file system, so the
    rename is atomic), which the parent moves into place once the worker reports it loaded the model, before
    any request reached it (as client/programs.py merges compiled programs). A worker never writes a file
    another worker or an unsandboxed load reads; what it wrote is validated by every reader all the same."""

    final: Path
    stage: Path | None

    @classmethod
    def open(cls, source: Any, native_kernels: str | None) -> WorkerStage | None:
        """None when the cache is off or the model is not a GGUF file (no staging folder is made)."""
        if not enabled() or source is None or getattr(source, "format", None) != "gguf":
            return None
        import tempfile

        try:
            final = cache_file(Path(source.path), Path(native_kernels).stem if native_kernels else "xla")
        except OSError:
            return None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=final.parent))
        except OSError:
            stage = None  # a read-only cache: an existing file is still read, a new one not written
        return cls(final, stage)

    def options(self) -> dict[str, str | None]:
        return {"read": str(self.final), "write": str(self.stage / self.final.name) if self.stage else None}

    def argv(self) -> list[str]:
        """The worker's extra Landlock rules: the cache file read-only (if there is one), the stage writable."""
        return (["--read", str(self.final)] if self.final.is_file() else []) + (
            ["--writable", str(self.stage)] if self.stage else [])

    def finish(self) -> None:
        """Moves a file the worker wrote into place (once), then drops the staging folder."""
        if self.stage is None:
            return
        made = self.stage / self.final.name
        try:
            if made.is_file() and not made.is_symlink():
                os.replace(made, self.final)
                prune(self.final)
        except OSError:
            pass
        self.discard()

    def discard(self) -> None:
        import shutil

        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None


def prune(keep: Path) -> None:
    """Drops the other cache files of keep's model file (an older identity, kernel build or naming, read from
    each file's header) and those whose model file no longer exists (a test's temporary model, a deleted
    download)."""
    own = source_path(keep)
    for path in cache_files(keep.parent):
        src = path.name != keep.name and source_path(path)
        if src and (src == own or not os.path.exists(src)):
            try:
                path.unlink()
            except OSError:
                pass


def cache_files(root: Path | None = None) -> list[Path]:
    """The cache files under root (default: cache_root()), for pruning and `corejax cache`."""
    try:
        return sorted(Path(e.path) for e in os.scandir(root or cache_root())
                      if e.name.endswith(SUFFIX) and not e.name.startswith(".") and e.is_file(follow_symlinks=False))
    except OSError:
        return []


def source_path(path: Path) -> str | None:
    """The model file a cache file was made from, as its header names it; None where the header cannot be read
    (such a file is left alone: only a file known to be stale is dropped)."""
    try:
        with open(path, "rb") as f:
            magic, _, n, _, _, _ = PREFIX.unpack(f.read(PREFIX.size))
            if magic != MAGIC or n > MAX_HEADER:
                return None
            f.seek(PREFIX_BYTES)
            src = json.loads(f.read(n))["key"]["source"]["path"]
            return src if isinstance(src, str) else None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def source_exists(path: Path) -> bool:
    """Whether the model file a cache file was made from still exists (True where its header cannot be read)."""
    src = source_path(path)
    return src is None or os.path.exists(src)
