"""Kernel paths per ISA (kernels/isa.h): every path this CPU can run against the scalar reference, and
COREJAX_ISA's choice, refusal and defaults."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from corejax import native
from corejax.errors import InvalidParameterError
from corejax.loading.loader import default_weights
from test_quant import _gguf_matrix


def _runnable_isas() -> list[str]:
    flags = set(native._cpu_flags().split(":", 1)[-1].split())
    table = native.ARM_ISAS if "asimd" in flags else native.X86_ISAS
    return [isa for isa, (_, needs, _) in table.items() if all(f in flags for f in needs)] + ["native"]


def _plain(isa: str):
    path = native.build(isa)
    if path is None:
        pytest.skip("native kernels not built here (no C++ compiler)")
    lib = ctypes.CDLL(str(path))
    lib.corejax_isa.restype = ctypes.c_char_p
    fn = lib.corejax_quant_matmul_plain
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                   ctypes.c_int32, ctypes.c_void_p]
    return lib.corejax_isa().decode(), fn


def _run(fn, x: np.ndarray, qa) -> np.ndarray:
    codes, scales = np.ascontiguousarray(qa.codes), np.ascontiguousarray(qa.scales)
    mins = None if qa.mins is None else np.ascontiguousarray(qa.mins)
    n = codes.shape[0] * 16
    y = np.full((x.shape[0], n), np.nan, np.float32)
    rc = fn(x.ctypes.data, x.shape[0], x.shape[1], codes.ctypes.data, scales.ctypes.data,
            None if mins is None else mins.ctypes.data, n, qa.bits, qa.block, qa.offset,
            int(scales.dtype == np.float16), y.ctypes.data)
    assert rc == 0
    return y[:, :qa.shape[1]]


@pytest.fixture(scope="module")
def paths():
    """{isa name: plain quantized matmul} for the scalar reference and every path this CPU executes."""
    return dict(_plain(isa) for isa in _runnable_isas())


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
            for name, fn in paths.items():
                got = _run(fn, x, qa)
                np.testing.assert_allclose(got, reference, rtol=0, atol=2e-5 * np.abs(exact).max(),
                                           err_msg=f"{name} {fmt} {d_out}x{d_in} rows={rows}")


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
    assert default_weights(source, quant_kernel=True) == "native"
    assert default_weights(source, quant_kernel=False, float_kernel=True) == "f32"
