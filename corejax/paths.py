"""Where corejax's files are: the cache root, the code this process imported (the package and its kernels), and
the command line that starts a child Python on that same code. No imports from the rest of corejax, so that the
native-kernel build (native.py), the hub, the runtime and every process starter share it."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

CACHE_ENV = "COREJAX_CACHE"
PACKAGE_DIR = Path(os.path.abspath(__file__)).parent  # corejax/
PACKAGE_ROOT = PACKAGE_DIR.parent  # the folder corejax is imported from: site-packages, or a source tree


def cache_dir() -> Path:
    """The cache root: $COREJAX_CACHE, else $XDG_CACHE_HOME/corejax, else ~/.cache/corejax (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return (Path(base).expanduser() / "corejax").absolute()


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """`corejax.kernels` from the top-level kernels/ folder of a source tree, as pyproject.toml maps it in a
    wheel: Python run in the repository's root imports corejax/ from the tree, where kernels/ is not inside. A
    namespace package (kernels/README.md says why it has no __init__.py)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "corejax.kernels":
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(self.folder)]
        return spec


def map_source_tree_kernels() -> None:
    """Makes `import corejax.kernels` work when corejax is imported from a source tree (called by corejax's
    __init__ before anything imports the kernels). An installed package holds corejax/kernels itself."""
    folder = PACKAGE_ROOT / "kernels"
    if (PACKAGE_DIR / "kernels").is_dir() or not (folder / "ffi.py").is_file():
        return
    if not any(isinstance(f, _SourceTreeKernels) for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeKernels(folder))  # after the editable install's finder, if there is one


def python_command(module: str, *args: str) -> list[str]:
    """`python -m module args...` for a child process that imports the corejax this process imported, never
    what the folder it is started from holds: `-m` and `-c` put the current folder first on sys.path, and in
    the repository's root that is the source tree, not the installed package."""
    code = (f"import runpy, sys; sys.path[:] = [{str(PACKAGE_ROOT)!r}] + [p for p in sys.path if p not in "
            f"('', {str(PACKAGE_ROOT)!r})]; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code, *args]
