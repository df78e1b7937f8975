// Weight-streaming float32 matmul: y[M, N] = x[M, K] @ w, any M (8-row register tiles, then 4, 2, 1), with w
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
// Column blocks are split over the cores through XLA's own intra-op thread pool (kernels/parallel.h): no
// threads of our own to start per call or to keep spinning next to XLA's.
//
// Built on first use by corejax/native.py (g++ -O3 -march=native) against the XLA FFI headers jaxlib
// ships; registered with jax.ffi as the CPU target "corejax_small_matmul" by kernels/small_matmul.py.

#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
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
// M x NV accumulators: 16 of the 32 vector registers at M = 8 (16 rows would spill; block_rows runs them as two tiles).
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

// Rows [0, M) of column block b: chunks of 8 rows (the register budget), then 4, 2, 1. The block's weights
// ([K, 32], e.g. 48 KiB at K = 384) come from memory for the first chunk and from L2 for the rest.
static void block_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t b) {
  const float* wb = w + b * K * kBlock;
  float* yb = y + b * kBlock;
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) strip<8, 2>(x + m * K, wb, yb + m * N, K, N, 0);
  if (M - m >= 4) { strip<4, 2>(x + m * K, wb, yb + m * N, K, N, 0); m += 4; }
  if (M - m >= 2) { strip<2, 2>(x + m * K, wb, yb + m * N, K, N, 0); m += 2; }
  if (M - m >= 1) strip<1, 2>(x + m * K, wb, yb + m * N, K, N, 0);
}

// `valid` [M] (int32, nonzero = real row): padding rows (an encoder's padded tokens) are skipped and get zeros,
// so a batch padded to a length bucket costs only its real tokens here.
static ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                  ffi::Buffer<ffi::S32> valid, ffi::ResultBuffer<ffi::F32> y, int32_t threads) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kBlock || xd[1] != wd[1] || valid.element_count() != xd[0])
    return ffi::Error::InvalidArgument("corejax_small_matmul: need x [M, K], w [N / 32, K, 32] and valid [M]");
  const int64_t M = xd[0], K = xd[1], N = wd[0] * kBlock;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const int32_t* vp = valid.typed_data();
  float* yp = y->typed_data();
  std::vector<int64_t> rows;
  for (int64_t m = 0; m < M; ++m)
    if (vp[m]) rows.push_back(m);
  const int64_t R = int64_t(rows.size());
  if (R == M) {
    corejax::parallel_for(pool, N / kBlock, threads, [&](int64_t b) { block_rows(xp, wp, yp, M, K, N, b); });
    return ffi::Error::Success();
  }
  std::vector<float> xr(R * K), yr(R * N);
  for (int64_t r = 0; r < R; ++r) std::memcpy(&xr[r * K], xp + rows[r] * K, K * sizeof(float));
  corejax::parallel_for(pool, N / kBlock, threads,
                        [&](int64_t b) { block_rows(xr.data(), wp, yr.data(), R, K, N, b); });
  std::memset(yp, 0, M * N * sizeof(float));
  for (int64_t r = 0; r < R; ++r) std::memcpy(yp + rows[r] * N, &yr[r * N], N * sizeof(float));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threads"));
