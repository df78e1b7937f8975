// Weight-streaming matmul: y[M, N] = x[M, K] @ w in float32, any M (8-row register tiles, then 4, 2, 1), with w
// stored in column blocks: wb[N / 32, K, 32] (wb[b, k, c] = w[k, 32 b + c]), float32 or float16 (widened as it
// is read: an encoder's weights="f16" halves the bytes each call streams).
//
// Why it exists: XLA:CPU runs a one-row dot as a GEMV that streams the weights once, but sends 2-16 rows
// (a batch of decode steps, a speculative verify) to a GEMM that repacks the weight matrix on every call,
// so a decode step of 8 rows cost far more than a step of one, capping what batching gains
// (docs/MEASUREMENTS.md). Here every row shares one pass over the weights: the M x 32 accumulators of a
// column block stay in vector registers while the block — K x 128 contiguous bytes — streams through once.
// The blocked layout is what makes that stream sequential: over a row-major [K, N] matrix the same walk jumps
// N floats per row, into a new page each time, where the hardware prefetcher does not follow (less than half
// the bandwidth).
//
// Column blocks are split over the cores by kernels/parallel.h (the caller and helper threads kept awake
// between a step's calls, asleep between steps). The weights are prefetched 128 rows
// ahead (16 KiB of float32), faster for float32 and float16 weights alike (docs/MEASUREMENTS.md): the hardware
// prefetcher alone restarts at every block.
//
// Three entry points share the loop: the plain product, act(y + bias), and LayerNorm(y + bias + residual)
// (BERT's dense + GELU and dense + add + norm), the epilogues running on each finished column block while it
// is in cache (kernels/vecmath.h): a BERT layer is then four of these calls and one attention call
// (kernels/encoder_attention.cc) instead of ~35 XLA ops.
//
// Built on first use by corejax/native.py (g++ -O3 -march=native) against the XLA FFI headers jaxlib
// ships; registered with jax.ffi as the CPU targets "corejax_small_matmul", "corejax_matmul_bias_act" and
// "corejax_matmul_add_norm" (kernels/ffi.py), called from kernels/small_matmul.py.

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "amx.h"
#include "parallel.h"
#include "vecmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using corejax::load16;
using corejax::store16;
using corejax::v16;

constexpr int64_t kBlock = 32;  // columns per block: two 16-float vectors
constexpr int64_t kPrefetch = 128 * kBlock;  // weights 128 rows ahead

// Rows [0, M) x columns [c0, c0 + 16 NV) of column block `wb` ([K, 32]); y points at the block's column 0.
// M x NV accumulators: 16 of the 32 vector registers at M = 8 (16 rows would spill; block_rows runs them as two tiles).
template <int M, int NV, typename W>
static void strip(const float* x, const W* wb, float* y, int64_t K, int64_t N, int c0) {
  v16 acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = v16{};
  const W* wp = wb + c0;
  for (int64_t k = 0; k < K; ++k, wp += kBlock) {
    __builtin_prefetch(wp + kPrefetch, 0, 3);
    __builtin_prefetch(wp + kPrefetch + 16, 0, 3);
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

// A strip's register tile: with 32 vector registers of 16 floats (AVX-512), up to 12 rows x 32 columns (24
// accumulators, two weight vectors and a broadcast); with 16 registers of 8 floats (AVX2), where a v16 is two
// of them, up to 6 rows x 16 columns (12 registers of accumulators), each column block run as two halves.
#if defined(__AVX512F__) && !defined(COREJAX_SCALAR)
constexpr int kStripRows = 12, kStripVecs = 2;
#else
constexpr int kStripRows = 6, kStripVecs = 1;
#endif

// One strip of m rows (1 <= m <= kStripRows; a runtime count, dispatched to its register-tile instance) over
// the 16 kStripVecs columns from c0.
template <typename W, int... Ms>
static void strip_rows(int64_t m, const float* x, const W* wb, float* y, int64_t K, int64_t N, int c0,
                       std::integer_sequence<int, Ms...>) {
  ((m == Ms + 1 ? strip<Ms + 1, kStripVecs>(x, wb, y, K, N, c0) : void()), ...);
}

// bfloat16 weights (weights="bf16"), multiplied by vdpbf16ps: each 32-bit lane takes a pair of products,
// x[k] w[k, c] + x[k + 1] w[k + 1, c], so one instruction does the work of two float32 FMAs, and the weights
// need no widening. The block is stored as pairs: wb[k / 2, c, k % 2] (K even), 128 bytes per pair of rows.
// The rows of x are rounded to bfloat16 once per call (round to nearest even, kernels' xb[m, k / 2] = the
// pair's 32 bits) and broadcast from memory. Sums stay float32. Where the CPU lacks AVX512_BF16 the type is
// refused and the loader keeps float16 (corejax_bf16_dot() says which).
constexpr int64_t kBf16Rows = 14;  // rows per strip: 28 accumulators and two weight vectors of 32 registers

// The strips of M rows, balanced: strip i is rows [M i / n, M (i + 1) / n) of n = ceil(M / max_rows).
static inline int64_t strip_count(int64_t M, int64_t max_rows) { return (M + max_rows - 1) / max_rows; }

#if defined(__AVX512BF16__)
// x here is one strip's rows, pair-major: x[p * M + m] = row m's bfloat16 pair p (so every broadcast is at a
// fixed offset from one pointer: no address register per row).
template <int M>
static void strip_bf16(const uint32_t* x, const uint16_t* wb, float* y, int64_t K2, int64_t N) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K2; ++p, wb += 2 * kBlock, x += M) {
    __builtin_prefetch(wb + kPrefetch, 0, 3);  // 8 KiB ahead, as for float16
    __builtin_prefetch(wb + kPrefetch + 32, 0, 3);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb), w1 = (__m512bh)_mm512_loadu_si512(wb + 32);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(int32_t(x[m]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xv);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xv);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(y + m * N, acc[m][0]);
    _mm512_storeu_ps(y + m * N + 16, acc[m][1]);
  }
}

template <int... Ms>
static void strip_bf16_rows(int64_t m, const uint32_t* x, const uint16_t* w, float* y, int64_t K2, int64_t N,
                            std::integer_sequence<int, Ms...>) {
  ((m == Ms + 1 ? strip_bf16<Ms + 1>(x, w, y, K2, N) : void()), ...);
}

// Rows [0, M) of column block b; xs holds the strips one after another, each pair-major (to_bf16_strips).
static void block_rows_bf16(const uint32_t* xs, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N,
                            int64_t b) {
  const uint16_t* wb = w + b * K * kBlock;
  const int64_t K2 = K / 2, n = strip_count(M, kBf16Rows);
  for (int64_t i = 0, m0 = 0; i < n; ++i) {
    const int64_t m1 = M * (i + 1) / n;
    strip_bf16_rows(m1 - m0, xs + m0 * K2, wb, y + b * kBlock + m0 * N, K2, N,
                    std::make_integer_sequence<int, kBf16Rows>{});
    m0 = m1;
  }
}

// The R rows of x (row rows[m], or m where rows is null) rounded to bfloat16 (nearest even) and laid out as
// block_rows_bf16 reads them.
static void to_bf16_strips(const float* x, const int64_t* rows, int64_t R, int64_t K, uint32_t* out) {
  std::vector<uint16_t> row(K);
  const int64_t K2 = K / 2, n = strip_count(R, kBf16Rows);
  for (int64_t i = 0, m0 = 0; i < n; ++i) {
    const int64_t m1 = R * (i + 1) / n, ms = m1 - m0;
    for (int64_t m = m0; m < m1; ++m) {
      const float* xm = x + (rows ? rows[m] : m) * K;
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(&row[k]), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xm + k)));
      for (; k < K; ++k) row[k] = uint16_t(_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set_ss(xm[k]))));
      uint32_t* dst = out + m0 * K2 + (m - m0);
      for (int64_t p = 0; p < K2; ++p) dst[p * ms] = uint32_t(row[2 * p]) | uint32_t(row[2 * p + 1]) << 16;
    }
    m0 = m1;
  }
}
constexpr bool kBf16Dot = true;
#else
static void block_rows_bf16(const uint32_t*, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t) {}
static void to_bf16_strips(const float*, const int64_t*, int64_t, int64_t, uint32_t*) {}
constexpr bool kBf16Dot = false;
#endif

#if defined(__AVX512BF16__) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
// AMX (Sapphire Rapids and later): one tdpbf16ps adds 16 rows x 16 columns x 32 k bfloat16 products into a
// float32 tile, sixteen vdpbf16ps' work. The bfloat16 block layout above is already AMX's B layout: 16 pairs of
// rows x 16 columns, one tile load with a stride of a pair row (128 bytes), columns 16-31 at an offset of 64
// bytes. The rows are rounded to bfloat16 exactly as for vdpbf16ps and the sums are float32; only their order
// differs. Faster at every row count measured, a sentence's 8 included (the vector path is bound by vdpbf16ps,
// not by the weights' stream: 16 rows took twice 8 rows' time there, on AMX the same; docs/MEASUREMENTS.md).

// Tiles 0-1: A, 16 rows x 32 k; 2-3: B, 16 pairs x 16 columns; 4-7: C, 16 x 16 float32 (a 32 x 32 output).
// Loaded by every block: pool threads run other kernels (quant_matmul.cc's own tile shapes) between our calls.
static void amx_bf16_config() {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette
  uint16_t* colsb = reinterpret_cast<uint16_t*>(cfg + 16);
  uint8_t* rows = cfg + 48;
  for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  asm volatile("" : : "r"(cfg) : "memory");  // GCC 12 drops the stores above otherwise (quant_matmul.cc)
  _tile_loadconfig(cfg);
}

// The R rows of x (as to_bf16_strips) rounded to bfloat16, row-major [Rp, K] with zero rows up to Rp (a multiple
// of 16): the A tiles read them in place.
static void to_bf16_rows(const float* x, const int64_t* rows, int64_t R, int64_t Rp, int64_t K, uint16_t* out) {
  for (int64_t m = 0; m < R; ++m) {
    const float* xm = x + (rows ? rows[m] : m) * K;
    for (int64_t k = 0; k < K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * K + k),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xm + k)));
  }
  std::memset(out + R * K, 0, (Rp - R) * K * sizeof(uint16_t));
}

// Rows [0, R) of column block b from xa (to_bf16_rows; K a multiple of 32): 32 rows at a time on four C tiles,
// a last group of 16 rows or fewer (a sentence) on two.
static void block_rows_amx(const uint16_t* xa, const uint16_t* w, float* y, int64_t R, int64_t K, int64_t N,
                           int64_t b) {
  const uint16_t* wb = w + b * K * kBlock;
  float* yb = y + b * kBlock;
  alignas(64) float c[32 * 32];
  amx_bf16_config();
  for (int64_t m0 = 0; m0 < R; m0 += 32) {
    const bool two = R - m0 > 16;  // a second A tile of real rows
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    const uint16_t* a = xa + m0 * K;
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const uint16_t* bp = wb + k0 * kBlock;  // pair row k0 / 2, 2 * kBlock values each
      _tile_loadd(0, a + k0, K * 2);
      _tile_loadd(2, bp, 4 * kBlock);
      _tile_loadd(3, bp + 32, 4 * kBlock);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      if (two) {
        _tile_loadd(1, a + 16 * K + k0, K * 2);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
      }
    }
    if (m0 + 32 <= R) {
      _tile_stored(4, yb + m0 * N, N * 4);
      _tile_stored(5, yb + m0 * N + 16, N * 4);
      _tile_stored(6, yb + (m0 + 16) * N, N * 4);
      _tile_stored(7, yb + (m0 + 16) * N + 16, N * 4);
    } else {  // the last rows: through a buffer, so nothing is written past row R
      _tile_stored(4, c, 128);
      _tile_stored(5, c + 16, 128);
      _tile_stored(6, c + 16 * 32, 128);
      _tile_stored(7, c + 16 * 32 + 16, 128);
      for (int64_t m = m0; m < R; ++m) std::memcpy(yb + m * N, c + (m - m0) * 32, 32 * sizeof(float));
    }
  }
}

static bool amx_bf16(int64_t R, int64_t K) { return R > 0 && K % 32 == 0 && corejax::amx_granted(); }
#else
static void to_bf16_rows(const float*, const int64_t*, int64_t, int64_t, int64_t, uint16_t*) {}
static void block_rows_amx(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t) {}
static bool amx_bf16(int64_t, int64_t) { return false; }
#endif

extern "C" int corejax_bf16_dot() { return kBf16Dot; }  // weights="bf16" runs here (kernels/small_matmul.py)

// Rows [0, M) of column block b, in as few strips as the register budget allows (kStripRows), of balanced
// sizes: 15 rows run as 8 + 7, not 8 + 4 + 2 + 1. Every strip re-reads the block's weights ([K, 32], e.g.
// 24 KiB of float16 at K = 384; from memory for the first strip, from L2 after) and widens them again, so
// fewer strips are cheaper: with power-of-two strips a sentence of 15 tokens cost more than one of 16
// (docs/MEASUREMENTS.md).
template <typename W>
static void block_rows(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t b) {
  const W* wb = w + b * K * kBlock;
  float* yb = y + b * kBlock;
  const int64_t strips = strip_count(M, kStripRows);
  for (int64_t i = 0, m0 = 0; i < strips; ++i) {
    const int64_t m1 = M * (i + 1) / strips;
    for (int c0 = 0; c0 < kBlock; c0 += 16 * kStripVecs)
      strip_rows(m1 - m0, x + m0 * K, wb, yb + m0 * N, K, N, c0, std::make_integer_sequence<int, kStripRows>{});
    m0 = m1;
  }
}

// y[M, N] = epilogue(x[M, K] @ w) over the rows `valid` [M] marks (int32, nonzero = real row); the others are
// zero: a batch padded to a length bucket (an encoder's) costs only its real tokens. Real rows are gathered
// into a dense [R, K] block first when there are padding rows. The epilogue runs on each column block of the
// R x N result right after the block is computed, by the same thread, while it is in cache
// (epi.block(y, R, N, c0, rows): columns [c0, c0 + 32)), then once per finished row (epi.row(y_r, m)).
template <typename Pool, typename W, typename Epilogue>
static void matmul_rows(Pool& pool, const float* x, const W* w, const int32_t* valid, float* y,
                        int64_t M, int64_t K, int64_t N, int32_t threads, const Epilogue& epi) {
  std::vector<int64_t> rows;
  for (int64_t m = 0; m < M; ++m)
    if (valid[m]) rows.push_back(m);
  const int64_t R = int64_t(rows.size());
  // Scratch is left uninitialized (new T[n], not a vector's zero fill): every element is written before it is read.
  std::unique_ptr<float[]> xbuf, ybuf;
  const float* xr = x;
  float* yr = y;
  // A single sentence padded to its length bucket: the real rows come first and need no gathering.
  const bool prefix = R == 0 || rows[R - 1] == R - 1;
  const bool bf16 = std::is_same_v<W, uint16_t>;
  if (R < M && !prefix) {
    ybuf.reset(new float[R * N]);
    yr = ybuf.get();
    if (!bf16) {  // bfloat16 rows are gathered as they are rounded
      xbuf.reset(new float[R * K]);
      for (int64_t r = 0; r < R; ++r) std::memcpy(&xbuf[r * K], x + rows[r] * K, K * sizeof(float));
      xr = xbuf.get();
    }
  }
  const int64_t* gather = R < M && !prefix ? rows.data() : nullptr;
  std::unique_ptr<uint32_t[]> xh;  // bfloat16 weights: the rows rounded to bfloat16 once, shared by every block
  std::unique_ptr<uint16_t[]> xa;  // the same, row-major for AMX's tiles
  bool amx = false;
  if constexpr (bf16) {
    amx = amx_bf16(R, K);
    if (amx) {
      const int64_t Rp = (R + 15) / 16 * 16;  // whole A tiles
      xa.reset(new uint16_t[Rp * K]);
      to_bf16_rows(x, gather, R, Rp, K, xa.get());
    } else {
      xh.reset(new uint32_t[R * K / 2]);
      to_bf16_strips(x, gather, R, K, xh.get());
    }
  }
  // On AMX a sentence's product (8 x 384 x 1536) costs less on this thread than split (docs/MEASUREMENTS.md).
  const int32_t workers = amx && R * K * N < (int64_t(1) << 24) ? 1 : threads;
  corejax::parallel_for(pool, N / kBlock, workers, [&](int64_t b) {
    if constexpr (std::is_same_v<W, uint16_t>) {  // bfloat16 pairs
      if (amx)
        block_rows_amx(xa.get(), w, yr, R, K, N, b);
      else
        block_rows_bf16(xh.get(), w, yr, R, K, N, b);
    } else {
      block_rows(xr, w, yr, R, K, N, b);
    }
    epi.block(yr, R, N, b * kBlock, rows.data());
  });
  // Row pass (layer norm, ~3 N flops a row): a sentence's 16 rows of 384 cost less on this thread than
  // waking a pool thread for them; a batch's hundreds of rows are split.
  if (Epilogue::kRowPass)
    corejax::parallel_for(pool, (R + 63) / 64, R * N >= (1 << 16) ? threads : 1, [&](int64_t c) {
      for (int64_t r = 64 * c; r < R && r < 64 * c + 64; ++r) epi.row(yr + r * N, N);
    });
  if (R < M && prefix) {
    std::memset(y + R * N, 0, (M - R) * N * sizeof(float));
  } else if (R < M) {  // each row written once: a real row from ybuf, a padding row zero
    for (int64_t m = 0, r = 0; m < M; ++m) {
      if (r < R && rows[r] == m)
        std::memcpy(y + m * N, &ybuf[r++ * N], N * sizeof(float));
      else
        std::memset(y + m * N, 0, N * sizeof(float));
    }
  }
}

struct NoEpilogue {
  static constexpr bool kRowPass = false;
  bool fits(int64_t, int64_t) const { return true; }
  void block(float*, int64_t, int64_t, int64_t, const int64_t*) const {}
  void row(float*, int64_t) const {}
};

// y = act(y + bias): a projection's bias and the activation after it (BERT's intermediate dense + GELU).
struct BiasActivation {
  static constexpr bool kRowPass = false;
  const float* bias;
  int64_t n;  // bias length
  int32_t act;
  bool fits(int64_t, int64_t N) const { return n == N; }
  void block(float* y, int64_t R, int64_t N, int64_t c0, const int64_t*) const {
    const v16 b0 = load16(bias + c0), b1 = load16(bias + c0 + 16);
    for (int64_t r = 0; r < R; ++r) {
      float* p = y + r * N + c0;
      store16(p, corejax::activate(load16(p) + b0, act));
      store16(p + 16, corejax::activate(load16(p + 16) + b1, act));
    }
  }
  void row(float*, int64_t) const {}
};

// y = LayerNorm(y + bias + residual) * scale + shift: BERT's "output" blocks (dense, dropout, add, norm).
struct BiasResidualNorm {
  static constexpr bool kRowPass = true;
  const float *bias, *residual, *scale, *shift;
  int64_t n, residual_n;  // bias/scale/shift length (-1 when they differ), residual size
  float eps;
  bool fits(int64_t M, int64_t N) const { return n == N && residual_n == M * N; }
  void block(float* y, int64_t R, int64_t N, int64_t c0, const int64_t* rows) const {
    const v16 b0 = load16(bias + c0), b1 = load16(bias + c0 + 16);
    for (int64_t r = 0; r < R; ++r) {
      float* p = y + r * N + c0;
      const float* q = residual + rows[r] * N + c0;
      store16(p, load16(p) + b0 + load16(q));
      store16(p + 16, load16(p + 16) + b1 + load16(q + 16));
    }
  }
  void row(float* y, int64_t N) const { corejax::layer_norm_row(y, scale, shift, N, eps); }
};

// Checks the shapes and runs the kernel over w's element type: float32, or float16 widened as it is read.
// w may carry a leading layer axis [L, N / 32, K, 32] (a model's layers stacked): layer `li` is read in place.
template <typename Epilogue>
static ffi::Error run(ffi::ThreadPool& pool, const char* name, ffi::Buffer<ffi::F32>& x, ffi::AnyBuffer& w,
                      int64_t li, ffi::Buffer<ffi::S32>& valid, ffi::Result<ffi::Buffer<ffi::F32>>& y,
                      int32_t threads, const Epilogue& epi) {
  auto xd = x.dimensions(), wdims = w.dimensions();
  const size_t stacked = wdims.size() == 4 ? 1 : 0;
  const int64_t L = stacked ? wdims[0] : 1;
  if (wdims.size() != 3 + stacked || li < 0 || li >= L)
    return ffi::Error::InvalidArgument(std::string(name) + ": need w [(L,) N / 32, K, 32] and a layer in range");
  const int64_t wd[3] = {wdims[stacked], wdims[stacked + 1], wdims[stacked + 2]};
  const char* wbase = static_cast<const char*>(w.untyped_data()) + li * int64_t(w.size_bytes() / L);
  if (xd.size() != 2 || wd[2] != kBlock || xd[1] != wd[1] || valid.element_count() != xd[0] ||
      y->element_count() != xd[0] * wd[0] * kBlock || !epi.fits(xd[0], wd[0] * kBlock))
    return ffi::Error::InvalidArgument(std::string(name) + ": need x [M, K], w [N / 32, K, 32], valid [M] " +
                                       "and bias, residual, scale and shift matching N");
  const int64_t M = xd[0], K = xd[1], N = wd[0] * kBlock;
  const float* xp = x.typed_data();
  const int32_t* vp = valid.typed_data();
  if (w.element_type() == ffi::DataType::F32)
    matmul_rows(pool, xp, reinterpret_cast<const float*>(wbase), vp, y->typed_data(), M, K, N, threads, epi);
  else if (w.element_type() == ffi::DataType::F16)
    matmul_rows(pool, xp, reinterpret_cast<const corejax::half_t*>(wbase), vp, y->typed_data(), M, K, N, threads,
                epi);
  else if (w.element_type() == ffi::DataType::BF16 && kBf16Dot && K % 2 == 0)
    matmul_rows(pool, xp, reinterpret_cast<const uint16_t*>(wbase), vp, y->typed_data(), M, K, N, threads,
                epi);
  else
    return ffi::Error::InvalidArgument(std::string(name) + ": weights must be float32, float16 or (with " +
                                       "AVX512_BF16, K even) bfloat16 pairs");
  return ffi::Error::Success();
}

// The plain product without XLA (one thread), for tests that compare each ISA's build with the scalar one:
// dtype 0 float32, 1 float16, 2 bfloat16 pairs (only where corejax_bf16_dot()). Returns 0, or 1 when refused.
extern "C" int corejax_small_matmul_plain(const float* x, int64_t M, int64_t K, const void* w, int32_t dtype,
                                          int64_t N, float* y) {
  if (N % kBlock) return 1;
  std::vector<int32_t> valid(M, 1);
  corejax::SerialPool pool;
  if (dtype == 0)
    matmul_rows(pool, x, static_cast<const float*>(w), valid.data(), y, M, K, N, 1, NoEpilogue{});
  else if (dtype == 1)
    matmul_rows(pool, x, static_cast<const corejax::half_t*>(w), valid.data(), y, M, K, N, 1, NoEpilogue{});
  else if (dtype == 2 && kBf16Dot && K % 2 == 0)
    matmul_rows(pool, x, static_cast<const uint16_t*>(w), valid.data(), y, M, K, N, 1, NoEpilogue{});
  else
    return 1;
  return 0;
}

static ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                                  ffi::Buffer<ffi::S32> valid, ffi::Buffer<ffi::S32> layer,
                                  ffi::ResultBuffer<ffi::F32> y, int32_t threads) {
  if (layer.element_count() != 1) return ffi::Error::InvalidArgument("corejax_small_matmul: layer must be a scalar");
  return run(pool, "corejax_small_matmul", x, w, layer.typed_data()[0], valid, y, threads, NoEpilogue{});
}

static ffi::Error BiasActImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                              ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> valid,
                              ffi::ResultBuffer<ffi::F32> y, int32_t threads, int32_t act) {
  if (act < corejax::kNone || act > corejax::kRelu)
    return ffi::Error::InvalidArgument("corejax_matmul_bias_act: act must be 0..3 (kernels/vecmath.h)");
  return run(pool, "corejax_matmul_bias_act", x, w, 0, valid, y, threads,
             BiasActivation{bias.typed_data(), bias.element_count(), act});
}

static ffi::Error AddNormImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                              ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual,
                              ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                              ffi::Buffer<ffi::S32> valid, ffi::ResultBuffer<ffi::F32> y, int32_t threads,
                              float eps) {
  const bool vectors = bias.element_count() == scale.element_count() && bias.element_count() == shift.element_count();
  return run(pool, "corejax_matmul_add_norm", x, w, 0, valid, y, threads,
             BiasResidualNorm{bias.typed_data(), residual.typed_data(), scale.typed_data(), shift.typed_data(),
                              vectors ? bias.element_count() : -1, residual.element_count(), eps});
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxMatmulBiasAct, BiasActImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxMatmulAddNorm, AddNormImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threads")
                                  .Attr<float>("eps"));
