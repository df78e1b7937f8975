// Zero-filled buffers that take no memory until written: the paged KV pool (corejax/cache.py).
//
// Why it exists: the pool is sized for the model's whole context (up to EngineConfig.kv_cache_max_bytes), and
// XLA fills a jnp.zeros array by writing every byte, so the process became resident for the whole pool before
// the first token (hundreds of MB of zeros for SmolLM2, and time to write them). Here the output's whole pages are
// handed back to the kernel with madvise(MADV_DONTNEED), which for private anonymous memory means "reads as
// zero, allocated on first write"; the partial pages at either end are cleared with memset. Resident memory
// then grows with the KV actually written, as llama.cpp's does. If madvise fails, the buffer is memset.
//
// No operands; one result of any shape and type. Registered with jax.ffi as the CPU target
// "corejax_lazy_zeros" (kernels/ffi.py).

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error LazyZerosImpl(ffi::Result<ffi::AnyBuffer> out) {
  char* p = static_cast<char*>(out->untyped_data());
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), end = begin + out->size_bytes();
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (begin + page - 1) / page * page, hi = end / page * page;
  if (hi > lo && madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED) == 0) {
    std::memset(p, 0, lo - begin);
    std::memset(reinterpret_cast<void*>(hi), 0, end - hi);
  } else {
    std::memset(p, 0, end - begin);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxLazyZeros, LazyZerosImpl, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
