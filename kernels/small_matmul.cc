// Weight-streaming matmul for a few rows: y[M, N] = x[M, K] @ w, float32, M in {1, 2, 4, 8}, with w
// stored in column blocks: wb[N / 32, K, 32] (wb[b, k, c] = w[k, 32 b + c]).
//
// Why it exists: XLA:CPU runs a one-row dot as a GEMV that streams the weights once, but sends 2-16 rows
// (a batch of decode steps, a speculative verify) to a GEMM that repacks the weight matrix on every call,
// so a decode step of 8 rows cost ~1.9x a step of one (kernels/small_matmul.py has the figures). Here
// every row shares one pass over the weights: the M x 32 accumulators of a column block stay in vector
// registers while the block — K x 128 contiguous bytes — streams through once. The blocked layout is what
// makes that stream sequential: over a row-major [K, N] matrix the same walk jumps N floats per row, into
// a new page each time, where the hardware prefetcher does not follow (10 vs 24-27 GB/s on one core here).
//
// Single-threaded on purpose: one core streams about as fast as XLA's two-thread GEMV here, and the
// kernel never competes with XLA's intra-op pool or spins on a loaded machine.
//
// Built on first use by corejax/native.py (g++ -O3 -march=native) against the XLA FFI headers jaxlib
// ships; registered with jax.ffi as the CPU target "corejax_small_matmul" by kernels/small_matmul.py.

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

constexpr int64_t kBlock = 32;  // columns per block: two 16-float vectors

typedef float v16 __attribute__((vector_size(64)));  // AVX-512 here; GCC splits it on narrower ISAs

static inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// Rows [0, M) x columns [c0, c0 + 16 NV) of column block `wb` ([K, 32]); y points at the block's column 0.
// M x NV accumulators: 16 of the 32 vector registers at M = 8 (16 rows would spill; they run as two calls).
template <int M, int NV>
static void strip(const float* x, const float* wb, float* y, int64_t K, int64_t N, int c0) {
  v16 acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = v16{};
  const float* wp = wb + c0;
  for (int64_t k = 0; k < K; ++k, wp += kBlock) {
    v16 wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load16(wp + 16 * j);
    for (int m = 0; m < M; ++m) {
      const float xm = x[m * K + k];
      for (int j = 0; j < NV; ++j) acc[m][j] += xm * wv[j];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) store16(y + m * N + c0 + 16 * j, acc[m][j]);
}

template <int M>
static void run(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  for (int64_t b = 0; b < N / kBlock; ++b) strip<M, 2>(x, w + b * K * kBlock, y + b * kBlock, K, N, 0);
}

static ffi::Error SmallMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                  ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kBlock || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("corejax_small_matmul: need x [M, K] and w [N / 32, K, 32]");
  const int64_t M = xd[0], K = xd[1], N = wd[0] * kBlock;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  switch (M) {
    case 1: run<1>(xp, wp, yp, K, N); break;
    case 2: run<2>(xp, wp, yp, K, N); break;
    case 4: run<4>(xp, wp, yp, K, N); break;
    case 8: run<8>(xp, wp, yp, K, N); break;
    default: return ffi::Error::InvalidArgument("corejax_small_matmul: M must be 1, 2, 4 or 8");
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
