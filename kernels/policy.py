"""Which kernels a compiled program calls, as data: a frozen `Kernels` chosen once when a runner is built (from what
this process loaded: kernels/ffi.py) and passed to every jit site as a static argument, so it is part of each
program's key. While a site traces, the policy is active (`Kernels.active()`), and the code that picks an
implementation (the quantized and float matmuls, decode attention, the encoder's fused kernels, a GPU's input
rounding) reads `current()`: the static argument of the program being traced, never a global flag. Tests and
benchmarks choose a policy the same way (`Kernels.xla()`, `Kernels(pallas=True, interpret=True)`)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

_ACTIVE: contextvars.ContextVar[Kernels | None] = contextvars.ContextVar("corejax_kernels", default=None)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """native: corejax's C++ CPU kernels (kernels/*.cc through XLA's FFI) serve matmuls and decode attention;
    isa: their SIMD path (kernels/isa.h), "xla" without them; bf16_dot: the native float matmul multiplies
    bfloat16 (AVX512_BF16); platform: the backend the programs compile for; pallas: attention as Pallas
    kernels (a GPU), interpret: Pallas in interpret mode (CPU tests)."""

    native: bool = False
    isa: str = "xla"
    bf16_dot: bool = False
    platform: str = "cpu"
    pallas: bool = False
    interpret: bool = False

    @classmethod
    def detect(cls, devices: int = 1) -> Kernels:
        """This process's kernels: the native library where it is loaded (a CPU backend, one device: the
        kernels are single-device custom calls), Pallas attention on a GPU."""
        import jax

        from corejax.kernels import ffi

        platform = jax.default_backend()
        native = ffi.ensure() and ffi.available() and devices == 1
        return cls(native=native, isa=ffi.isa() if native else "xla", bf16_dot=native and ffi.bf16_dot(),
                   platform=platform, pallas=platform == "gpu")

    @classmethod
    def xla(cls, platform: str = "cpu") -> Kernels:
        """XLA's own ops everywhere: the reference every kernel is checked against."""
        return cls(platform=platform)

    @property
    def fast_quant(self) -> bool:
        """The quantized matmul has a SIMD integer-dot path (not the scalar reference): only then do quantized
        weights beat float32 on XLA (loading/loader.py default_weights)."""
        return self.native and self.isa != "scalar"

    @property
    def attention_impl(self) -> str:
        return "pallas" if self.pallas else "lax"

    @contextlib.contextmanager
    def active(self) -> Iterator[Kernels]:
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def current() -> Kernels:
    """The policy of the program being traced (a jit site of corejax/engine/programs.py sets it)."""
    kernels = _ACTIVE.get()
    if kernels is None:
        raise RuntimeError("model code ran outside a jit site: wrap the call in `with Kernels(...).active():` "
                           "(corejax/engine/programs.py does for every program)")
    return kernels
