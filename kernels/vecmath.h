// Sixteen-float vector math for the native kernels' epilogues (kernels/small_matmul.cc): exp, erf, GELU (exact
// and tanh form), ReLU and a row's layer norm, written with GCC vector extensions so they compile to AVX-512
// here and to narrower SIMD elsewhere.
//
// Why: XLA:CPU runs an exact GELU or a layer norm over a sentence's rows about ten times slower than an add of
// the same size (docs/MEASUREMENTS.md): its erf and its row reductions are not vectorized well. Fused into the
// matmul that produced the values, while they are still in cache, both cost a few microseconds.
//
// Accuracy (checked against the float64 functions over [-10, 10] by tests/test_native_kernels.py):
// exp within ~2e-7 relative (Cody-Waite reduction by ln 2, a degree-6 Taylor polynomial on |r| <= ln 2 / 2);
// erf within 1.5e-7 absolute (Abramowitz & Stegun 7.1.26, Hastings' rational form); GELU so within ~1e-7 |x|.

#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include <cstdint>
#include <cstring>

namespace corejax {

typedef float v16 __attribute__((vector_size(64)));

// IEEE half precision as a storage type: GCC's C++ has _Float16 on x86 and __fp16 on Arm.
#if defined(__aarch64__) || defined(__arm__)
typedef __fp16 half_t;
#else
typedef _Float16 half_t;
#endif
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Sixteen float16 values widened to float32 (one vcvtph2ps with AVX-512, two with F16C): weights stored at
// half the bytes. GCC's generic __builtin_convertvector from half_t lowers to per-lane code; the intrinsics
// do not.
static inline v16 load16(const half_t* p) {
#if defined(__AVX512F__) && !defined(COREJAX_SCALAR)
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && !defined(COREJAX_SCALAR)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  float f[16];
  _mm256_storeu_ps(f, lo);
  _mm256_storeu_ps(f + 8, hi);
#elif defined(__aarch64__) && !defined(COREJAX_SCALAR)
  float f[16];
  for (int i = 0; i < 16; i += 4) vst1q_f32(f + i, vcvt_f32_f16(vld1_f16(p + i)));
#else
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = float(p[i]);
#endif
  v16 v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}

static inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

static inline v16 splat(float f) { return v16{} + f; }

static inline v16 vmin(v16 a, v16 b) { return a < b ? a : b; }
static inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

// e^y, y clamped to [-87, 88] (no overflow to inf, no denormal results).
static inline v16 vexp(v16 y) {
  y = vmax(vmin(y, splat(88.f)), splat(-87.f));
  // n = round(y / ln 2) by the 1.5 * 2^23 trick (round-to-nearest of the float unit), r = y - n ln 2 in two
  // parts (Cody-Waite) so r keeps full precision.
  const v16 big = splat(12582912.f);
  const v16 n = (y * 1.44269504088896341f + big) - big;
  const v16 r = (y - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  v16 p = splat(1.f / 720.f);
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;  // 2^n
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

static inline v16 verf(v16 x) {
  const v16 a = vmax(x, -x);
  const v16 t = 1.f / (1.f + 0.3275911f * a);
  v16 p = splat(1.061405429f);
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const v16 e = 1.f - p * t * vexp(-(a * a));
  return x < 0.f ? -e : e;
}

// tanh(z) = sign(z) (1 - e) / (1 + e) with e = exp(-2 |z|) <= 1: no overflow for any z.
static inline v16 vtanh(v16 z) {
  const v16 e = vexp(-2.f * vmax(z, -z));
  const v16 t = (1.f - e) / (1.f + e);
  return z < 0.f ? -t : t;
}

enum Activation : int32_t { kNone = 0, kGeluErf = 1, kGeluTanh = 2, kRelu = 3 };

static inline v16 activate(v16 x, int32_t act) {
  switch (act) {
    case kGeluErf:
      return 0.5f * x * (1.f + verf(x * 0.70710678118654752f));
    case kGeluTanh:
      return 0.5f * x * (1.f + vtanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case kRelu:
      return vmax(x, splat(0.f));
    default:
      return x;
  }
}

static inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// y[0, n) = (y - mean) / sqrt(var + eps) * scale + shift in place, over one row (n a multiple of 16), as BERT's
// LayerNorm: mean first, then the variance of the centred values (two passes, no E[x^2] - E[x]^2 cancellation).
static inline void layer_norm_row(float* y, const float* scale, const float* shift, int64_t n, float eps) {
  v16 s = v16{};
  for (int64_t i = 0; i < n; i += 16) s += load16(y + i);
  const float mean = hsum(s) / float(n);
  v16 q = v16{};
  for (int64_t i = 0; i < n; i += 16) {
    const v16 d = load16(y + i) - mean;
    q += d * d;
  }
  const float inv = 1.f / __builtin_sqrtf(hsum(q) / float(n) + eps);
  for (int64_t i = 0; i < n; i += 16)
    store16(y + i, (load16(y + i) - mean) * inv * load16(scale + i) + load16(shift + i));
}

}  // namespace corejax
