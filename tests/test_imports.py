"""The import graph stays one-way, and every module has a place in it: the layers below, lowest first; a module
imports from its own layer and the ones before it, never a later one; no cycles; no private names imported
across modules; the kernels reach only the base modules; the parent's side (client/) never reaches what
imports JAX, but for the one in-process worker (sandbox=False).

Read from the source with ast (nothing is imported), so the check is fast and sees lazy imports inside
functions too: a lazy import still makes a dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The layers, lowest first. A module that matches none fails test_every_module_has_a_layer.
CHAIN = [
    # plain data and the leaves everything may use: no JAX
    ("corejax.errors", "corejax.version", "corejax.paths", "corejax.hostmem", "corejax.native", "corejax.types",
     "corejax.tools"),  # tools: tool-call formats and the reply parser (the parent's and the worker's)
    # what crosses the process boundary; where models come from; the sandbox's layer report
    ("corejax.wire", "corejax.hub", "corejax.sandbox.layer"),
    ("corejax.kernels",),
    ("corejax.weights", "corejax.tokenizer"),
    ("corejax.models", "corejax.loading"),
    ("corejax.engine",),  # the jit sites, sampler, KV cache, sharding
    ("corejax.serving",),  # scheduler, runner, requests, speculative decoding (in the worker)
    ("corejax.worker", "corejax.sandbox"),  # the worker process and the policy it applies to itself
    ("corejax.client",),  # the parent process
    ("corejax", "corejax.api", "corejax.cli", "corejax.daemon", "corejax.quantize", "corejax.server",
     "corejax.bench"),  # what users call
]
KERNEL_MAY_USE = {"corejax.native", "corejax.hostmem", "corejax.paths", "corejax.errors"}
# The parent's side may reach only these (and itself): nothing that imports JAX.
CLIENT_MAY_USE = ("corejax.errors", "corejax.version", "corejax.paths", "corejax.native", "corejax.types",
                  "corejax.tools", "corejax.wire", "corejax.hub", "corejax.sandbox.layer", "corejax.client")
# Session(sandbox=False) runs the worker loop on a thread of the caller's process, by design.
IN_PROCESS_WORKER = ("corejax.client.workers", "corejax.worker.main")


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
    """The layer of the longest name in CHAIN that is the module or a package above it."""
    best = None
    for i, group in enumerate(CHAIN):
        for p in group:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


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


def test_every_module_has_a_layer():
    edges, _ = _graph()
    assert sorted(m for m in edges if _layer(m) is None) == []


def test_the_parent_never_reaches_jax():
    """client/'s modules, and everything they import transitively, are the no-JAX ones (CLIENT_MAY_USE)."""
    edges, _ = _graph()
    seen, todo = set(), [m for m in edges if m.startswith("corejax.client")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(d for d in edges[m] if (m, d) != IN_PROCESS_WORKER)
    assert sorted(m for m in seen if not any(m == p or m.startswith(p + ".") for p in CLIENT_MAY_USE)) == []
    code = ("import sys, corejax, corejax.client.session, corejax.client.keepalive, corejax.cli, corejax.daemon; "
            "corejax.cli.build_parser(); assert 'jax' not in sys.modules and 'jaxlib' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith('jax'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


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
    planted["corejax.errors"].add("corejax.client.session")
    assert any("corejax.errors" in c for c in _cycles(planted))
    assert _layer("corejax.models.decoder") < _layer("corejax.engine.programs")


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


def test_every_package_is_installed():
    """pyproject.toml lists the packages a regular (not editable) install copies: a folder left out installs
    nothing, and `pip install .` then fails on its first import while an editable checkout works."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(("corejax", *p.parent.relative_to(ROOT / "corejax").parts)).rstrip(".")
               for p in (ROOT / "corejax").rglob("__init__.py")}
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
