"""llama.cpp's own programs for benchmarks/serving.py: `llama-server` and `llama-batched-bench`, built from the
llama.cpp that llama-cpp-python's source distribution vendors, cached outside the repository.

    ~/.cache/corejax-bench/llama.cpp-<version>/source   vendor/llama.cpp of llama-cpp-python <version>'s sdist
    ~/.cache/corejax-bench/llama.cpp-<version>/build    cmake's build folder; the programs are in build/bin

<version> is the installed llama-cpp-python's (the peer `corejax bench` measures), else the newest on PyPI.
The build names each x86 instruction set from /proc/cpuinfo with GGML_NATIVE off and AMX off
(corejax/bench/advice.py): GGML_NATIVE=ON compiles with -march=native, which turns AMX on whatever the
GGML_AMX_* options say, and ggml's AMX kernels crash on the virtual machines corejax is measured on.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PROGRAMS = ("llama-server", "llama-batched-bench")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "corejax-bench"


def installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def programs_in(folder: Path) -> dict[str, Path] | None:
    """The two programs under `folder` (a build folder, its bin/, or llama.cpp's source with build/bin)."""
    for where in (folder, folder / "bin", folder / "build" / "bin"):
        found = {name: where / name for name in PROGRAMS}
        if all(p.is_file() and os.access(p, os.X_OK) for p in found.values()):
            return found
    return None


def _run(cmd: list[str], **kw) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def cmake_args() -> list[str]:
    from corejax.bench.advice import llama_cpp_cmake_args
    from corejax.bench.machine import cpu_flags

    return [*llama_cpp_cmake_args(cpu_flags()).split(), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF"]  # no download during the build, no web UI


def unpack(sdist: Path, source: Path) -> None:
    """vendor/llama.cpp of llama-cpp-python's sdist into `source`."""
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    print(f"+ unpack {prefix} of {sdist.name} into {source}", flush=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(source, members=[m for m in members if m.name], filter="data")


def build(version: str | None = None, jobs: int | None = None) -> dict[str, Path]:
    """Finds the cached build of llama.cpp <version> or makes it (printing each command); the programs' paths."""
    version = version or installed_version()
    if version is None:  # not installed: ask pip which version it would fetch
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
                  "-d", tmp])
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    home = CACHE / f"llama.cpp-{version}"
    found = programs_in(home / "build")
    if found:
        return found
    source = home / "source"
    if not (source / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={version}", "-d", tmp])
            unpack(next(Path(tmp).glob("llama_cpp_python-*.tar.gz")), source)
    _run(["cmake", "-S", str(source), "-B", str(home / "build"), *cmake_args()])
    _run(["cmake", "--build", str(home / "build"), f"-j{jobs or os.cpu_count() or 2}", "--target", *PROGRAMS])
    found = programs_in(home / "build")
    if not found:
        raise SystemExit(f"the build in {home / 'build'} made no {' and no '.join(PROGRAMS)}")
    return found


def locate(folder: str | None) -> dict[str, Path]:
    """--llama-cpp DIR's programs, or the cached build (made now if missing)."""
    if folder:
        found = programs_in(Path(folder).expanduser())
        if not found:
            raise SystemExit(f"--llama-cpp {folder}: no {' and '.join(PROGRAMS)} in it, its bin/ or its build/bin/")
        return found
    return build()


def server_command(binary: Path, model: Path, port: int, streams: int, ctx_per_stream: int,
                   threads: int) -> list[str]:
    """llama-server with one slot per stream, each slot `ctx_per_stream` tokens, continuous batching."""
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(streams),
            "-c", str(streams * ctx_per_stream), "--cont-batching", "-t", str(threads), "-tb", str(threads),
            "--no-webui"]


def batched_bench(binary: Path, model: Path, prompt_tokens: int, tokens: int, streams: list[int], threads: int,
                  log: Path, timeout: float) -> dict[int, dict]:
    """llama-batched-bench's table (prompts not shared) for these batch sizes, one row per batch size:
    aggregate_tok_s is generated tokens over the whole time (prefill included, as the servers' aggregate),
    decode_tok_s its S_TG (decode alone), ttft_s its T_PP (all the batch's prompts)."""
    cmd = [str(binary), "-m", str(model), "-c", str(max(streams) * (prompt_tokens + tokens) + 64), "-b", "2048",
           "-ub", "512", "-npp", str(prompt_tokens), "-ntg", str(tokens), "-npl", ",".join(map(str, streams)),
           "-t", str(threads), "-tb", str(threads)]
    print("+ " + shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    log.write_text(done.stdout + done.stderr)
    rows = parse_table(done.stdout + "\n" + done.stderr)
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"llama-batched-bench exited {done.returncode} with {len(rows)} rows; see {log}")
    return rows


_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|" + r"\s*([\d.]+)\s*\|" * 6)


def parse_table(text: str) -> dict[int, dict]:
    """llama-batched-bench's markdown rows: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s |
    S t/s |, keyed by B."""
    rows = {}
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if not m:
            continue
        pp, tg, b, _n_kv = map(int, m.groups()[:4])
        t_pp, s_pp, t_tg, s_tg, t, _s = map(float, m.groups()[4:])
        rows[b] = {"prompt_tokens": pp, "tokens": tg, "aggregate_tok_s": b * tg / t, "decode_tok_s": s_tg,
                   "per_stream_tok_s": tg / t, "ttft_s": t_pp, "prefill_tok_s": s_pp, "total_s": t,
                   "decode_s": t_tg}
    return rows
