"""Kernel paths per ISA (kernels/isa.h): every path this CPU can run against the scalar reference, and
COREJAX_ISA's choice, refusal and defaults."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from corejax.kernels.policy import Kernels

from corejax import native
from corejax.errors import InvalidParameterError
from corejax.loading.loader import default_weights
from test_quant import _gguf_matrix


def _runnable_isas() -> list[str]:
    flags = set(native._cpu_flags().split(":", 1)[-1].split())
    table = native.ARM_ISAS if "asimd" in flags else native.X86_ISAS
    return [isa for isa, (_, needs, _) in table.items() if all(f in flags for f in needs)] + ["native"]


def _library(isa: str) -> ctypes.CDLL:
    path = native.build(isa)
    if path is None:
        pytest.skip("native kernels not built here (no C++ compiler)")
    lib = ctypes.CDLL(str(path))
    lib.corejax_isa.restype = ctypes.c_char_p
    q = lib.corejax_quant_matmul_plain
    q.restype = ctypes.c_int
    q.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                  ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
    f = lib.corejax_small_matmul_plain
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
                  ctypes.c_int64, ctypes.c_void_p]
    return lib


def _run(lib, x: np.ndarray, qa) -> np.ndarray:
    codes, scales = np.ascontiguousarray(qa.codes), np.ascontiguousarray(qa.scales)
    mins = None if qa.mins is None else np.ascontiguousarray(qa.mins)
    n = codes.shape[0] * 16
    y = np.full((x.shape[0], n), np.nan, np.float32)
    rc = lib.corejax_quant_matmul_plain(x.ctypes.data, x.shape[0], x.shape[1], codes.ctypes.data, scales.ctypes.data,
            None if mins is None else mins.ctypes.data, n, qa.bits, qa.block, qa.offset,
            int(scales.dtype == np.float16), qa.code_max, y.ctypes.data)
    assert rc == 0
    return y[:, :qa.shape[1]]


@pytest.fixture(scope="module")
def paths():
    """{isa name: its library} for the scalar reference and every path this CPU executes."""
    libs = [_library(isa) for isa in _runnable_isas()]
    return {lib.corejax_isa().decode(): lib for lib in libs}


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "Q2_K"])
def test_every_isa_path_matches_the_scalar_reference(paths, fmt):
    """Each path computes the same integer sums (kernels/isa.h: 8-bit codes as signed bytes where the dot is
    signed or saturates, Q8_0's full 0..255 range included); only float summation order may differ. Rows 1-64
    cover every register tile and remainder (8/4/2/1, and AVX2's 4/2/1); odd sizes: 40 and 48 columns pad
    to a group of 16, K = 288 is 9 blocks of 32."""
    assert "scalar" in paths and len(paths) >= 2, paths
    block_k = 256 if fmt.endswith("_K") else 32
    shapes = [(96, 512), (40, 256)] + ([(48, 288)] if block_k == 32 else [])
    for d_out, d_in in shapes:
        qa, ref = _gguf_matrix(fmt, d_out, d_in, seed=3)
        for rows in (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 31, 64):
            x = np.random.default_rng(rows).standard_normal((rows, d_in)).astype(np.float32)
            x[0, :32] *= 1e-3  # a block of tiny values next to large ones
            exact = x @ ref.T
            reference = _run(paths["scalar"], x, qa)
            assert np.linalg.norm(reference - exact) / np.linalg.norm(exact) < 1e-4
            for name, lib in paths.items():
                got = _run(lib, x, qa)
                np.testing.assert_allclose(got, reference, rtol=0, atol=2e-5 * np.abs(exact).max(),
                                           err_msg=f"{name} {fmt} {d_out}x{d_in} rows={rows}")


def _batch_outputs(lib) -> dict[str, np.ndarray]:
    """Every 32-block format at the row counts that cross the register tiles and AMX's 8-row passes."""
    out = {}
    for fmt in ("Q4_0", "Q4_1", "Q5_0", "Q8_0"):
        qa, _ = _gguf_matrix(fmt, 96, 288, seed=5)
        for rows in (7, 8, 9, 16, 21, 64):
            x = np.random.default_rng(rows).standard_normal((rows, 288)).astype(np.float32)
            out[f"{fmt} rows={rows}"] = _run(lib, x, qa)
    return out


def test_a_row_computes_the_same_bits_alone_and_in_any_batch(paths):
    """Batched decode streams equal their text alone (issue 38) only if a row's output does not depend on the
    rows beside it: every path's register tiles, and AMX's 8-row tile passes (kernels/quant_matmul.cc), give
    each row the same integer sums and the same float epilogue as the one-row path, bit for bit."""
    for name, lib in paths.items():
        for fmt in ("Q4_0", "Q4_1", "Q8_0", "Q6_K"):
            qa, _ = _gguf_matrix(fmt, 96, 512, seed=4)
            x = np.random.default_rng(9).standard_normal((21, 512)).astype(np.float32)
            batch = _run(lib, x, qa)
            for i in (0, 7, 8, 15, 16, 20):
                np.testing.assert_array_equal(batch[i:i + 1], _run(lib, x[i:i + 1], qa), err_msg=f"{name} {fmt} {i}")


def test_amx_tiles_compute_the_vnni_paths_bits(tmp_path):
    """Where the CPU has AMX and Linux grants it, batches of 8+ rows run on tiles; COREJAX_AMX=0 turns that off.
    Both give identical outputs: the tile sums are vpdpbusd's exact integers, and the epilogue is the same."""
    import subprocess
    import sys

    lib = _library("native")
    lib.corejax_amx.restype = ctypes.c_int
    if not lib.corejax_amx():
        pytest.skip("no AMX here (CPU, build or the OS's grant)")
    on = _batch_outputs(lib)
    script = ("import sys, numpy as np, ctypes; sys.path.insert(0, sys.argv[1]); import test_isa as t; "
              "lib = t._library('native'); assert lib.corejax_amx() == 0; "
              "np.savez(sys.argv[2], **t._batch_outputs(lib))")
    out = tmp_path / "off.npz"
    env = dict(os.environ, COREJAX_AMX="0")
    proc = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(out)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    off = np.load(out)
    assert sorted(off.files) == sorted(on)
    for key, value in on.items():
        np.testing.assert_array_equal(value, off[key], err_msg=key)


@pytest.mark.parametrize("code", [15, 31, 63, 127, 255])
def test_every_isa_path_is_exact_at_the_int16_bounds(paths, code):
    """The worst case for AVX2's int16 pair sums (kernels/isa.h): every code at its class's maximum and every
    activation rounded to +-127 (a constant row), so each chunk of steps sums to exactly its bound. A
    saturated or wrapped sum would be off by thousands of units, not float noise."""
    from corejax.weights import quant

    d_out, d_in = 32, 256
    codes = np.full((d_out, d_in), code, np.int16)
    codes[1::2, ::3] = 0  # some columns not constant, so a wrong lane would show
    scales = np.full((d_out, d_in // 32), 0.01, np.float32)
    qa = quant.from_blocks(codes, scales, None, fmt=f"test{code}")
    assert qa.code_max == code and qa.bits == (4 if code < 16 else 8)
    ref = codes.astype(np.float64) * 0.01
    for sign in (1.0, -1.0):
        x = np.full((5, d_in), sign, np.float32)
        x[1] *= np.linspace(0.5, 1.0, d_in, dtype=np.float32)  # residuals not zero
        exact = x.astype(np.float64) @ ref.T
        for name, lib in paths.items():
            np.testing.assert_allclose(_run(lib, x, qa), exact, rtol=2e-6, atol=1e-4, err_msg=f"{name} {code}")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_every_isa_path_of_the_float_matmul_matches_the_scalar_reference(paths, dtype):
    """kernels/small_matmul.cc over column-blocked float32, float16 (F16C / NEON widening) and, where the
    build multiplies them natively (AVX512_BF16), bfloat16 pairs: every register tile (AVX-512's 12 x 32,
    AVX2's 6 x 16) and remainder for rows 1-64, an odd K."""
    import ml_dtypes

    from corejax.kernels.small_matmul import to_blocked

    rng = np.random.default_rng(7)
    for k, n in ((77, 64), (384, 96)):
        if dtype == "bf16" and k % 2:
            continue
        w = rng.standard_normal((k, n)).astype({"f32": np.float32, "f16": np.float16,
                                                 "bf16": ml_dtypes.bfloat16}[dtype])
        blocked = np.ascontiguousarray(np.asarray(to_blocked(w).data))
        code = {"f32": 0, "f16": 1, "bf16": 2}[dtype]
        for rows in (1, 2, 5, 6, 7, 12, 13, 25, 64):
            x = rng.standard_normal((rows, k)).astype(np.float32)
            ran = {}
            for name, lib in paths.items():
                y = np.full((rows, n), np.nan, np.float32)
                if lib.corejax_small_matmul_plain(x.ctypes.data, rows, k, blocked.ctypes.data, code, n,
                                                  y.ctypes.data) == 0:
                    ran[name] = y
            if dtype == "bf16":
                want = x.astype(ml_dtypes.bfloat16).astype(np.float64) @ w.astype(np.float64)
                assert "scalar" not in ran  # bfloat16 pairs need AVX512_BF16
            else:
                want = x.astype(np.float64) @ w.astype(np.float64)
                assert set(ran) == set(paths)
            for name, got in ran.items():
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"{name} {k}x{n} rows={rows}")


def test_a_path_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : fpu sse sse2")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    with pytest.raises(InvalidParameterError, match="lacks .*avx2"):
        native.isa_target("avx2")
    with pytest.raises(InvalidParameterError, match="not a kernel path"):
        native.isa_target("neon_dotprod")
    flags, xla = native.isa_target("scalar")
    assert "-DCOREJAX_SCALAR" in flags and xla == "SSE4_2"


def test_a_narrower_isa_caps_xla_too(monkeypatch):
    monkeypatch.setenv("COREJAX_ISA", "avx2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : avx avx2 fma f16c bmi2")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    native.cap_xla_isa()
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_cpu_max_isa=AVX2"
    native.cap_xla_isa()  # once only
    assert os.environ["XLA_FLAGS"].count("max_isa") == 1


def test_weights_default_to_float32_without_a_fast_quantized_path(tmp_path):
    """The scalar path is slower than XLA's float dot: a GGUF loads as f32 there, quantized where SIMD runs."""
    from corejax.hub import ModelSource
    from tiny_model import write_tiny_llama

    path = write_tiny_llama(tmp_path / "m.gguf", quantize="Q8_0")
    source = ModelSource(name="tiny", format="gguf", path=path)
    assert default_weights(source, Kernels(native=True, isa="avx2")) == "native"
    assert default_weights(source, Kernels(native=True, isa="scalar")) == "f32"


def _aarch64_tools():
    import shutil

    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None or native._include_dir() is None:
        pytest.skip("no aarch64 cross compiler or qemu-user: apt-get install g++-aarch64-linux-gnu qemu-user "
                    "(.ci/run does)")
    return cxx, qemu


def test_the_kernel_library_cross_compiles_for_aarch64(tmp_path):
    """Every source builds for Arm (NEON + dotprod), with the same flags native.py uses, and exports every
    FFI handler kernels/ffi.py registers."""
    import subprocess

    from corejax.kernels import ffi

    cxx, _ = _aarch64_tools()
    out = tmp_path / "libcorejax_arm.so"
    flags, _, _ = native.ARM_ISAS["neon_dotprod"]
    cmd = [cxx, "-O1", *flags, "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w",
           f"-I{native._include_dir()}", *(str(native._kernels_dir() / s) for s in native.SOURCES), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", str(out)], capture_output=True, text=True).stdout
    for symbol in [*ffi.TARGETS.values(), "corejax_isa", "corejax_bf16_dot", "corejax_quant_matmul_plain"]:
        assert f" T {symbol}\n" in symbols, symbol


def test_neon_paths_match_the_scalar_reference_under_qemu(tmp_path):
    """tests/native/quant_selftest.cc (eight formats, rows 1-64, Q8_0's full byte range) built for NEON with
    dotprod (sdot), plain NEON (smull + pairwise adds) and the scalar reference, run under qemu-user: the
    outputs agree to float summation order."""
    import subprocess
    from pathlib import Path

    cxx, qemu = _aarch64_tools()
    source = Path(__file__).parent / "native" / "quant_selftest.cc"
    outputs = {}
    for name, (flags, _, _) in native.ARM_ISAS.items():
        exe = tmp_path / f"selftest_{name}"
        build = subprocess.run([cxx, "-O2", *flags, "-std=c++17", "-static", "-w", f"-I{native._kernels_dir()}",
                                f"-I{native._include_dir()}", str(source), "-o", str(exe)],
                               capture_output=True, text=True, timeout=600)
        assert build.returncode == 0, build.stderr[-3000:]
        run = subprocess.run([qemu, str(exe)], capture_output=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stderr.decode().strip() == name  # the build reports the path it was compiled for
        outputs[name] = np.frombuffer(run.stdout, np.float32)
    reference = outputs.pop("scalar")
    assert reference.size > 40000 and np.isfinite(reference).all()
    for name, got in outputs.items():
        np.testing.assert_allclose(got, reference, rtol=0, atol=2e-6 * np.abs(reference).max(), err_msg=name)
