"""The import graph stays one-way: kernels <- models <- engine <- scheduler <- runtime <- worker <- session <- api/cli,
no cycles anywhere, no private names imported across modules, and the kernel layer never reaching the hub.

Read from the source with ast (nothing is imported), so the check is fast and sees lazy imports inside
functions too: a lazy import still makes a dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The layers, lowest first: a module may import from its own layer and the ones before it, never a later one.
CHAIN = [
    ("corejax.kernels",),
    ("corejax.models",),
    ("corejax.engine",),
    ("corejax.scheduler", "corejax.speculative"),
    ("corejax.runtime",),
    ("corejax.sandbox.worker",),
    ("corejax.session",),
    ("corejax.api", "corejax.cli", "corejax.server", "corejax.daemon", "corejax.bench"),
]
KERNEL_MAY_USE = {"corejax.native", "corejax.hostmem", "corejax.paths", "corejax.errors"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in ((ROOT / "corejax", "corejax"), (ROOT / "kernels", "corejax.kernels")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            mods[".".join([package, *parts]).removesuffix(".__init__")] = path
    return mods


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> the corejax modules it imports; and (module, from, name) of every private name imported."""
    mods = _modules()
    edges, private = {}, []
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "corejax":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in mods else node.module)
                    if (full not in mods and alias.name.startswith("_") and not alias.name.startswith("__")
                            and node.module != name):
                        private.append((name, node.module, alias.name))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "corejax")
        edges[name] = {d for d in deps if d in mods and d != name}
    return edges, private


def _layer(module: str) -> int | None:
    for i, group in enumerate(CHAIN):
        if any(module == p or module.startswith(p + ".") for p in group):
            return i
    return None


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_imports_run_down_the_layers():
    edges, _ = _graph()
    upward = [(m, d) for m, deps in edges.items() for d in deps
              if _layer(m) is not None and _layer(d) is not None and _layer(d) > _layer(m)]
    assert upward == []


def test_kernels_use_only_the_base_modules():
    edges, _ = _graph()
    seen, todo = set(), [m for m in edges if m.startswith("corejax.kernels")]
    while todo:  # everything the kernel layer reaches, transitively
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges[m])
    assert sorted(m for m in seen if not m.startswith("corejax.kernels") and m not in KERNEL_MAY_USE) == []


def test_no_private_names_across_modules():
    _, private = _graph()
    assert private == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks can fail: a planted cycle and a planted upward edge are found."""
    edges, _ = _graph()
    planted = {k: set(v) for k, v in edges.items()}
    planted["corejax.errors"].add("corejax.session")
    assert any("corejax.errors" in c for c in _cycles(planted))
    assert _layer("corejax.models.llama") < _layer("corejax.engine")


def test_the_source_tree_imports_from_its_root():
    """In the repository's root (first on sys.path under `python -c` and `python -m`), corejax and its kernels
    import from the tree, and the top-level kernels/ folder never hides the PyPI package `kernels` (a
    dependency of transformers): it is a namespace package, which any regular package on the path outranks."""
    code = ("import sys, corejax, corejax.kernels.ffi, kernels; "
            "assert corejax.__file__.startswith(sys.argv[1]), corejax.__file__; "
            "assert not (getattr(kernels, '__file__', None) or '').startswith(sys.argv[1]), kernels.__file__")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr


def test_child_processes_import_their_parents_corejax(tmp_path):
    """What corejax starts (the kept server, benchmark children) never imports a corejax/ of the folder it is
    started from: here a decoy that fails on import."""
    from corejax.paths import python_command

    (tmp_path / "corejax").mkdir()
    (tmp_path / "corejax" / "__init__.py").write_text("raise SystemExit('the decoy corejax was imported')\n")
    out = subprocess.run(python_command("corejax.cli", "ps", "--json"), cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plain = subprocess.run([sys.executable, "-m", "corejax.cli", "ps"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert "decoy" in plain.stderr  # the check can fail: a plain `-m` takes the folder's corejax
