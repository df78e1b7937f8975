"""Compiled programs of sandboxed workers: one folder per (native-kernel build, model file), written only by
the parent. A worker gets a private copy (copy_programs); what it added by the time it reports ready, before
any request reached it, is merged back (merge_programs), never over an existing program. So no worker writes
what another model's worker runs, and one that a request compromised adds nothing later workers run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

_PROGRAM_FILE_CAP = 256 << 20  # one compiled program; JAX's entries here are 0.1-5 MB
_PROGRAM_DIR_CAP = 2 << 30  # a model's whole folder


def source_identity(source: Any) -> str:
    """A model's path and file identity (device, inode, size, modification time of each file): a file replaced
    or rewritten gets a new identity."""
    import hashlib

    h = hashlib.sha256()
    if source is not None:
        path = Path(source.path).resolve()
        h.update(str(path).encode())
        for f in [path] if path.is_file() else sorted(path.iterdir()) if path.is_dir() else []:
            try:
                st = f.stat()
                h.update(f"{f.name}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                pass
    return h.hexdigest()


def program_cache_dir(source: Any, native_kernels: str | None) -> Path:
    """The persistent XLA cache of sandboxed workers for one model file (source_identity) and one native-kernel
    build."""
    from corejax.paths import cache_dir

    key = f"{source.name if source is not None else 'no-model'}-{source_identity(source)[:16]}"
    key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    root = cache_dir() / "xla-sandbox" / (Path(native_kernels).stem if native_kernels else "xla")
    folder = root / key
    if not folder.is_dir():
        _prune_programs(root)
        folder.mkdir(parents=True, exist_ok=True)
        if source is not None:
            (folder / ".source").write_text(str(Path(source.path).resolve()))
    return folder


def _prune_programs(root: Path) -> None:
    """Drops the program folders of model files that no longer exist (a test's temporary model, a deleted
    download), so the cache does not grow with every file ever opened."""
    try:
        folders = list(os.scandir(root))
    except OSError:
        return
    for e in folders:
        try:
            path = Path(e.path, ".source").read_text()
        except OSError:
            continue
        if not os.path.exists(path):
            shutil.rmtree(e.path, ignore_errors=True)


def _program_files(folder: Path) -> list[tuple[Path, int]]:
    """Regular files directly in folder (no links, no subfolders), with their sizes."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for e in entries:
        try:
            if e.is_file(follow_symlinks=False) and not e.name.startswith("."):
                out.append((Path(e.path), e.stat(follow_symlinks=False).st_size))
        except OSError:
            pass
    return out


def folder_bytes(folder: Path, max_entries: int = 20_000) -> int:
    """Bytes allocated to the files under folder (st_blocks; links not followed), over at most max_entries."""
    total, seen, stack = 0, 0, [str(folder)]
    while stack and seen < max_entries:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            seen += 1
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    total += e.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                pass
    return total


def copy_programs(src: Path, dst: Path) -> None:
    """The worker's private copy of the model's compiled programs (a copy, not links: the worker may write it)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f, _ in _program_files(src):
        try:
            shutil.copyfile(f, dst / f.name, follow_symlinks=False)
        except OSError:
            pass


def merge_programs(src: Path, dst: Path) -> int:
    """Programs a worker compiled during its start-up, into the model's folder: new names only, regular files
    only, size-capped, each written to a temporary name and renamed. Returns how many were added."""
    files = _program_files(src)
    if not files:
        return 0
    dst.mkdir(parents=True, exist_ok=True)
    have = {f.name: size for f, size in _program_files(dst)}
    total, added = sum(have.values()), 0
    for f, size in files:
        if f.name in have:
            continue  # a program (or its access time) already here is never replaced
        if size > _PROGRAM_FILE_CAP or total + size > _PROGRAM_DIR_CAP:
            continue
        tmp = dst / f".{f.name}.{os.getpid()}.tmp"
        try:
            fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            os.replace(tmp, dst / f.name)
            total += size
            added += 1
        except OSError:
            tmp.unlink(missing_ok=True)
    return added
