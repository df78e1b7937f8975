// Quantized matmul: y[M, N] = x[M, K] @ W, with W kept in its quantized blocks (corejax/quant.py QuantArray):
// value[k, n] = scale[k / B, n] * (u[k, n] - offset) - min[k / B, n], u an unsigned 4- or 8-bit code.
//
// What llama.cpp does, and XLA:CPU cannot: the activations are quantized to int8 per 32 values (scale
// max|x| / 127, as ggml's Q8_0), and each block's dot product is an integer one — AVX-512 VNNI's vpdpbusd
// multiplies 64 unsigned weight codes by 64 signed activation bytes and adds them into 16 int32 lanes in
// one instruction. Per block and column the integer sum is scaled once:
//     y[m, n] += scale * dx * sum_k u q  +  (-(scale * offset) - min) * dx * sum_k q
// (dx the activation block's scale), so a decode step reads each weight byte once: SmolLM2's Q4_1 layers are
// 0.6 bytes per value instead of float32's 4.
//
// Unlike llama.cpp, each activation is rounded twice — x, then what that rounding left, in steps 256 times
// finer — and both int8 codes meet the same weight vector (two vpdpbusd chains per row, combined as
// 256 q + r in int32 at each block's end, so the float work per block stays one scale per row). One rounding (llama.cpp's) left SmolLM2's last-token logits 1.6-19%
// (relative RMS) from the exact dequantized model and flipped on float noise, so batched and paged runs
// parted from single ones and the 135M model stopped answering "Paris"; two leave 0.01-0.04%, greedy text
// identical to the exact model on 8/8 prompts, for 128 instead of 142 tok/s decode (SmolLM2 Q4_1, in-process).
//
// Layout (built once at load by quant.py): columns in groups of 16, so one 64-byte vector holds 4
// consecutive k of 16 columns, which is vpdpbusd's operand shape and keeps all 16 outputs in the lanes of
// one accumulator (no horizontal sums):
//   8-bit codes [N / 16, K / 4, 16, 4]        byte (c * 4 + j) of step s = u[4 s + j, 16 g + c]
//   4-bit codes [N / 16, K / 8, 64]           byte (c * 4 + j) of step s: low nibble u[8 s + j, 16 g + c],
//                                                                         high nibble u[8 s + 4 + j, ...]
//   scales, mins [N / 16, K / B, 16]          float16 or float32; B (values per scale) 16 or 32
//
// Rows: up to 8 share one pass over a column group (8 int32 + 8 float accumulators stay in registers);
// more rows loop over the group while it is in L1/L2 (prefill). Chunks of column groups are split over the
// caller and XLA's own intra-op pool (kernels/parallel.h), at most `threads` (from Python) workers. Threads
// started per call (~30 us each) and helper threads of our own spinning between calls (fighting XLA's pool
// for the two cores) were both slower than one thread; the pool's threads are awake while a program runs.
//
// Without AVX-512 VNNI the same loops run in plain C++ (correct everywhere, slower).
// Built by corejax/native.py with the other kernels; registered as "corejax_quant_matmul".

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define COREJAX_VNNI 1
#else
#define COREJAX_VNNI 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kG = 16;      // columns per group
constexpr int64_t kQBlock = 32;  // activation values per int8 scale
constexpr int64_t kPrefetch = 8192;  // bytes ahead: one core's DRAM stream 15 -> 20-25 GB/s here (4-32 KiB tried)

struct Weights {
  const uint8_t* codes;
  const void* scales;
  const void* mins;  // nullptr: no min
  bool f16;
  int bits;
  int offset;
  int64_t K, N;
  int64_t group_bytes() const { return K * kG * bits / 8; }
};

struct Acts {
  const int8_t* q;   // [M, K]: round(x / d)
  const int8_t* r;   // [M, K]: round((x - d q) / (d / 256)), the residual in steps 256 times finer
  const float* d;    // [M, K / 32]: d / 256, the unit of the combined code 256 q + r
  const float* ds;   // [M, K / B]: that unit times the combined codes' sum over the weight block
  int64_t K;
};

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if COREJAX_VNNI
// quantize_rows, 16 lanes at a time (the scalar loop cost ~2.7 ns per value: ~5% of a decode step).
bool quantize_rows_avx512(const float* x, int64_t M, int64_t K, int64_t B, int8_t* q, int8_t* r, float* d,
                          float* ds) {
  if (B != kQBlock && B != 16) return false;
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K / kQBlock; ++b) {
      const int64_t k = m * K + b * kQBlock;
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      d[m * (K / kQBlock) + b] = scale / 256.f;
      const __m512 vinv = _mm512_set1_ps(inv), vscale = _mm512_set1_ps(scale), vfine = _mm512_set1_ps(inv * 256.f);
      int32_t sums[2];
      for (int h = 0; h < 2; ++h) {
        const __m512 xv = h ? x1 : x0;
        const __m512 qv = _mm512_roundscale_ps(_mm512_mul_ps(xv, vinv), kNearest);
        const __m512 res = _mm512_sub_ps(xv, _mm512_mul_ps(qv, vscale));
        const __m512 rv = _mm512_max_ps(_mm512_min_ps(_mm512_roundscale_ps(_mm512_mul_ps(res, vfine), kNearest), hi), lo);
        const __m512i qi = _mm512_cvtps_epi32(qv), ri = _mm512_cvtps_epi32(rv);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k + 16 * h), _mm512_cvtepi32_epi8(qi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(r + k + 16 * h), _mm512_cvtepi32_epi8(ri));
        sums[h] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(qi, 8), ri));
      }
      const float unit = scale / 256.f;
      if (B == kQBlock) {
        ds[m * (K / B) + b] = unit * float(sums[0] + sums[1]);
      } else {
        ds[m * (K / B) + 2 * b] = unit * float(sums[0]);
        ds[m * (K / B) + 2 * b + 1] = unit * float(sums[1]);
      }
    }
  }
  return true;
}
#endif

// x [M, K] float -> per 32 values d = max|x| / 127, q = round(x / d) (|q| <= 127: ggml's Q8_0), and the
// residual r = round((x - d q) / (d / 256)) (|r| <= 128, clamped to 127: the rare half-step case loses
// d / 256). x ~ (d / 256) (256 q + r): ~15 bits where ggml's activations carry 7.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t B, int8_t* q, int8_t* r, float* d, float* ds) {
#if COREJAX_VNNI
  if (quantize_rows_avx512(x, M, K, B, q, r, d, ds)) return;
#endif
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t b = 0; b < K / kQBlock; ++b) {
      float amax = 0.f;
      for (int64_t i = 0; i < kQBlock; ++i) amax = std::max(amax, std::fabs(xr[b * kQBlock + i]));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      d[m * (K / kQBlock) + b] = scale / 256.f;
      for (int64_t i = 0; i < kQBlock; ++i) {
        const int64_t k = b * kQBlock + i;
        const float qv = std::nearbyint(xr[k] * inv);
        const float rv = std::nearbyint((xr[k] - qv * scale) * inv * 256.f);
        q[m * K + k] = int8_t(qv);
        r[m * K + k] = int8_t(std::max(-127.f, std::min(127.f, rv)));
      }
    }
    for (int64_t b = 0; b < K / B; ++b) {
      int32_t s = 0;
      for (int64_t i = 0; i < B; ++i) s += 256 * q[m * K + b * B + i] + r[m * K + b * B + i];
      ds[m * (K / B) + b] = d[m * (K / kQBlock) + b * B / kQBlock] * float(s);
    }
  }
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if COREJAX_VNNI

inline __m512 load_params(const void* base, int64_t index, bool f16) {
  if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                   static_cast<const uint16_t*>(base) + index)));
  return _mm512_loadu_ps(static_cast<const float*>(base) + index);
}

// Rows [m0, m0 + M) x the 16 columns of group g.
template <int M, int BITS, int B>
void group(const Weights& w, const Acts& a, int64_t g, int64_t m0, float* y) {
  const int64_t K = w.K, nb = K / B;
  const uint8_t* cp = w.codes + g * w.group_bytes();
  const __m512 offset = _mm512_set1_ps(float(w.offset));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 accf[M];
  for (int m = 0; m < M; ++m) accf[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * B;
    __m512i acc[M], acc2[M];  // per row: the q chain and the r chain (also hides vpdpbusd's latency)
    for (int m = 0; m < M; ++m) acc[m] = acc2[m] = _mm512_setzero_si512();
    if constexpr (BITS == 8) {
      for (int s = 0; s < B / 4; ++s, cp += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(cp) + kPrefetch, _MM_HINT_T0);
        const __m512i wv = _mm512_loadu_si512(cp);
        for (int m = 0; m < M; ++m) {
          const int64_t at = (m0 + m) * K + k0 + 4 * s;
          acc[m] = _mm512_dpbusd_epi32(acc[m], wv, _mm512_set1_epi32(load4(a.q + at)));
          acc2[m] = _mm512_dpbusd_epi32(acc2[m], wv, _mm512_set1_epi32(load4(a.r + at)));
        }
      }
    } else {
      for (int s = 0; s < B / 8; ++s, cp += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(cp) + kPrefetch, _MM_HINT_T0);
        const __m512i raw = _mm512_loadu_si512(cp);
        const __m512i lo = _mm512_and_si512(raw, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        for (int m = 0; m < M; ++m) {
          const int64_t at = (m0 + m) * K + k0 + 8 * s;
          acc[m] = _mm512_dpbusd_epi32(acc[m], lo, _mm512_set1_epi32(load4(a.q + at)));
          acc2[m] = _mm512_dpbusd_epi32(acc2[m], lo, _mm512_set1_epi32(load4(a.r + at)));
          acc[m] = _mm512_dpbusd_epi32(acc[m], hi, _mm512_set1_epi32(load4(a.q + at + 4)));
          acc2[m] = _mm512_dpbusd_epi32(acc2[m], hi, _mm512_set1_epi32(load4(a.r + at + 4)));
        }
      }
    }
    // 256 sum(u q) + sum(u r): |sum(u q)| <= 255 * 127 * 32 per block, so the int32 holds it.
    for (int m = 0; m < M; ++m) acc[m] = _mm512_add_epi32(_mm512_slli_epi32(acc[m], 8), acc2[m]);
    const int64_t p = (g * nb + b) * kG;
    const __m512 sc = load_params(w.scales, p, w.f16);
    const __m512 mins = w.mins ? load_params(w.mins, p, w.f16) : _mm512_setzero_ps();
    const __m512 mn = _mm512_fnmsub_ps(sc, offset, mins);  // -(scale * offset) - min
    for (int m = 0; m < M; ++m) {
      const __m512 dx = _mm512_set1_ps(a.d[(m0 + m) * (K / kQBlock) + k0 / kQBlock]);
      const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m]), dx);
      accf[m] = _mm512_fmadd_ps(t, sc, accf[m]);
      accf[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.ds[(m0 + m) * nb + b]), accf[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + (m0 + m) * w.N + g * kG, accf[m]);
}

#else

inline float load_param(const void* base, int64_t index, bool f16) {
  return f16 ? half_to_float(static_cast<const uint16_t*>(base)[index]) : static_cast<const float*>(base)[index];
}

template <int M, int BITS, int B>
void group(const Weights& w, const Acts& a, int64_t g, int64_t m0, float* y) {
  const int64_t K = w.K, nb = K / B;
  const uint8_t* cp = w.codes + g * w.group_bytes();
  float accf[M][kG] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * B;
    int32_t acc[M][kG] = {};
    const int steps = BITS == 8 ? B / 4 : B / 8;
    for (int s = 0; s < steps; ++s, cp += 64) {
      for (int c = 0; c < kG; ++c)
        for (int j = 0; j < 4; ++j) {
          const uint8_t byte = cp[c * 4 + j];
          for (int m = 0; m < M; ++m) {
            const int8_t* qp = a.q + (m0 + m) * K + k0;
            const int8_t* rp = a.r + (m0 + m) * K + k0;
            auto code = [&](int64_t k) { return 256 * int32_t(qp[k]) + rp[k]; };
            if (BITS == 8) {
              acc[m][c] += int32_t(byte) * code(4 * s + j);
            } else {
              acc[m][c] += int32_t(byte & 0x0F) * code(8 * s + j) + int32_t(byte >> 4) * code(8 * s + 4 + j);
            }
          }
        }
    }
    const int64_t p = (g * nb + b) * kG;
    for (int c = 0; c < kG; ++c) {
      const float sc = load_param(w.scales, p + c, w.f16);
      const float mn = -(sc * float(w.offset)) - (w.mins ? load_param(w.mins, p + c, w.f16) : 0.f);
      for (int m = 0; m < M; ++m) {
        const float dx = a.d[(m0 + m) * (K / kQBlock) + k0 / kQBlock];
        accf[m][c] += float(acc[m][c]) * dx * sc + mn * a.ds[(m0 + m) * nb + b];
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kG; ++c) y[(m0 + m) * w.N + g * kG + c] = accf[m][c];
}

#endif

template <int BITS, int B>
void groups(const Weights& w, const Acts& a, int64_t M, int64_t g0, int64_t g1, float* y) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) group<8, BITS, B>(w, a, g, m, y);
    if (M - m >= 4) { group<4, BITS, B>(w, a, g, m, y); m += 4; }
    if (M - m >= 2) { group<2, BITS, B>(w, a, g, m, y); m += 2; }
    if (M - m >= 1) { group<1, BITS, B>(w, a, g, m, y); m += 1; }
  }
}

// Column groups in chunks of kChunk (4 KiB-64 KiB of codes each), claimed by the caller and XLA's pool threads.
constexpr int64_t kChunk = 4;

void run(ffi::ThreadPool& pool, const Weights& w, const Acts& a, int64_t M, int64_t B, int threads, float* y) {
  auto fn = w.bits == 8 ? (B == 16 ? groups<8, 16> : groups<8, 32>) : (B == 16 ? groups<4, 16> : groups<4, 32>);
  const int64_t G = w.N / kG;
  corejax::parallel_for(pool, (G + kChunk - 1) / kChunk, threads, [&](int64_t c) {
    fn(w, a, M, c * kChunk, std::min(G, (c + 1) * kChunk), y);
  });
}

}  // namespace

static ffi::Error QuantMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                                  ffi::AnyBuffer scales, ffi::AnyBuffer mins, ffi::ResultBuffer<ffi::F32> y,
                                  int32_t bits, int32_t block, int32_t offset, int32_t has_mins, int32_t threads) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 3 || sd.size() != 3 || cd[2] != 64 || sd[2] != kG)
    return ffi::Error::InvalidArgument("corejax_quant_matmul: need x [M, K], codes [N/16, S, 64], scales [N/16, K/B, 16]");
  const int64_t M = xd[0], K = xd[1], N = cd[0] * kG;
  if ((bits != 4 && bits != 8) || (block != 16 && block != 32) || K % kQBlock || K % block ||
      cd[1] * 64 * 8 != K * kG * bits || sd[0] != cd[0] || sd[1] != K / block)
    return ffi::Error::InvalidArgument("corejax_quant_matmul: the codes/scales shapes do not match x and the format");
  const bool f16 = scales.element_type() == ffi::DataType::F16;
  if (!f16 && scales.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("corejax_quant_matmul: scales must be float16 or float32");
  if (has_mins && (mins.element_type() != scales.element_type() || mins.size_bytes() != scales.size_bytes()))
    return ffi::Error::InvalidArgument("corejax_quant_matmul: mins must match the scales");
  std::vector<int8_t> q(M * K), r(M * K);
  std::vector<float> d(M * (K / kQBlock)), ds(M * (K / block));
  quantize_rows(x.typed_data(), M, K, block, q.data(), r.data(), d.data(), ds.data());
  const Weights w{codes.typed_data(), scales.untyped_data(), has_mins ? mins.untyped_data() : nullptr, f16,
                  bits, offset, K, N};
  const Acts a{q.data(), r.data(), d.data(), ds.data(), K};
  run(pool, w, a, M, block, threads, y->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxQuantMatmul, QuantMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("offset")
                                  .Attr<int32_t>("has_mins")
                                  .Attr<int32_t>("threads"));
