// The ISA-specific part of the native kernels: which instruction set a build targets, and the few inner
// primitives the quantized matmul (kernels/quant_matmul.cc) is written over. One kernel structure, one set of
// primitives per ISA family (the habit of llama.cpp's ggml-cpu/arch/{x86,arm} beside its generic code):
//
//   avx512_vnni   16 int32 lanes per vector; vpdpbusd adds 4 unsigned-code x signed-byte products per lane
//   avx512        AVX-512 without VNNI: the AVX2 primitives below (256-bit), AVX-512 for the float kernels
//   avx_vnni      8 lanes; the 256-bit vpdpbusd (Alder Lake and later, Zen 5)
//   avx2          8 lanes; vpmaddubsw (pairs of u8 x s8 into int16, saturating) then vpmaddwd with ones
//   neon_dotprod  4 lanes; sdot (ARMv8.2 dotprod), signed x signed
//   neon          4 lanes; smull + two pairwise adds
//   scalar        16 lanes of plain C++: the last resort and the reference the others are tested against
//
// The selection is made by the compiler flags (corejax/native.py: -march=native by default, or the narrower
// target COREJAX_ISA names), never at run time, so a library holds exactly one path and says which
// (corejax_isa()).
//
// vpmaddubsw saturates its int16 pair sums. 4-bit codes (<= 15) times int8 activations (|q| <= 127) stay far
// inside (2 * 15 * 127 = 3810, and two such sums added: 7620); 8-bit codes (<= 255) would not (64770). Where a
// dot is signed x signed or saturates, 8-bit codes are therefore multiplied as signed bytes v = u - 128 (a
// flip of the top bit; the kernel folds the 128 into its per-block offset term, exact in float since
// 128 * scale is), and AVX2 takes |v| <= 128 as the unsigned operand with v's sign moved onto the activation
// (vpsignb): pair sums <= 2 * 128 * 127 = 32512, inside int16. So every path computes the same integers.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(COREJAX_SCALAR)  // COREJAX_ISA=scalar: the reference path on any machine
#define COREJAX_ISA_SCALAR 1
#define COREJAX_ISA_NAME "scalar"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define COREJAX_ISA_AVX512VNNI 1
#define COREJAX_ISA_NAME "avx512_vnni"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define COREJAX_ISA_AVX2 1
#if defined(__AVXVNNI__) && !defined(__AVX512F__)
#define COREJAX_ISA_AVXVNNI 1
#define COREJAX_ISA_NAME "avx_vnni"
#elif defined(__AVX512F__)
#define COREJAX_ISA_NAME "avx512"
#else
#define COREJAX_ISA_NAME "avx2"
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define COREJAX_ISA_NEON 1
#if defined(__ARM_FEATURE_DOTPROD)
#define COREJAX_ISA_NAME "neon_dotprod"
#else
#define COREJAX_ISA_NAME "neon"
#endif
#else
#define COREJAX_ISA_SCALAR 1
#define COREJAX_ISA_NAME "scalar"
#endif

namespace corejax::isa {

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

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

// Per ISA: kLanes int32 columns per vector (a group of 16 columns is 16 / kLanes passes, each reading its
// 4 * kLanes bytes of every 64-byte step), kRows rows sharing one pass (their int32 and float accumulators
// must stay in registers), kSigned8 (8-bit codes multiply as signed bytes u - 128), and:
//   I                       int32 accumulator, kLanes lanes
//   F                       float32 accumulator, kLanes lanes
//   W8 prep8(p)             8-bit codes, 4 * kLanes bytes at p, made ready for dot8 (shared by all rows)
//   W4 prep4(p)             4-bit codes: the low and high nibbles of 4 * kLanes bytes
//   I bcast(p)              4 activation bytes at p, in every lane
//   I dot8(acc, w, x)       acc + per lane sum_j code[lane, j] * x[j]
//   I dot4(acc, w, xl, xh)  acc + the same over the low nibbles with xl and the high ones with xh
//   I zero(); I combine(q, r) = 256 q + r; F fzero(); F to_float(I); F fset(f);
//   F params(base, i, f16)  kLanes scales or mins from index i, float16 or float32
//   F fma(a, b, c) = a * b + c; F mul(a, b); void store(float*, F)
// and the partial sums of a chunk of steps (AVX2 keeps vpmaddubsw's int16 pair sums over several steps and
// widens them once; elsewhere P is I and a chunk is the whole block):
//   P pzero(); P pdot4(acc, w, xl, xh); P pdot8s(acc, w, x) (W8s prep8s(p): 8-bit codes <= 127)
//   I widen2(P q, P r) = 256 sum(q) + sum(r), per int32 lane; I add(I, I)
//   kSigned8Small (prep8s's codes are u - 128), chunk_steps(pair_max): steps whose int16 pair sums, each at
//   most pair_max, add without overflow

#if defined(COREJAX_ISA_AVX512VNNI)

constexpr int kLanes = 16, kRows = 8;
constexpr bool kSigned8 = false;
using I = __m512i;
using F = __m512;
using W8 = __m512i;
struct W4 { __m512i lo, hi; };
inline W8 prep8(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline W4 prep4(const uint8_t* p) {
  const __m512i raw = _mm512_loadu_si512(p), low4 = _mm512_set1_epi8(0x0F);
  return {_mm512_and_si512(raw, low4), _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4)};
}
inline I bcast(const int8_t* p) { return _mm512_set1_epi32(load4(p)); }
inline I dot8(I acc, const W8& w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
inline I dot4(I acc, const W4& w, I xl, I xh) {
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, w.lo, xl), w.hi, xh);
}
inline I zero() { return _mm512_setzero_si512(); }
inline I combine(I q, I r) { return _mm512_add_epi32(_mm512_slli_epi32(q, 8), r); }
inline F fzero() { return _mm512_setzero_ps(); }
inline F to_float(I v) { return _mm512_cvtepi32_ps(v); }
inline F fset(float f) { return _mm512_set1_ps(f); }
inline F params(const void* base, int64_t i, bool f16) {
  if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                   static_cast<const uint16_t*>(base) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(base) + i);
}
inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
inline I add(I a, I b) { return _mm512_add_epi32(a, b); }

#elif defined(COREJAX_ISA_AVX2)

// 16 vector registers: 4 rows x (q chain + r chain + float sum) = 12, plus codes and a broadcast.
constexpr int kLanes = 8, kRows = 4;
using I = __m256i;
using F = __m256;
struct W4 { __m256i lo, hi; };
inline W4 prep4(const uint8_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), low4 = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(raw, low4), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)};
}
inline I bcast(const int8_t* p) { return _mm256_set1_epi32(load4(p)); }
#if defined(COREJAX_ISA_AVXVNNI)
constexpr bool kSigned8 = false;
using W8 = __m256i;
inline W8 prep8(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline I dot8(I acc, const W8& w, I x) { return _mm256_dpbusd_avx_epi32(acc, w, x); }
inline I dot4(I acc, const W4& w, I xl, I xh) {
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, w.lo, xl), w.hi, xh);
}
#define COREJAX_ISA_P_IS_I 1
#else
constexpr bool kSigned8 = true;
struct W8 { __m256i mag, sgn; };  // |v| as unsigned bytes, and v (its sign moves onto the activation)
inline W8 prep8(const uint8_t* p) {
  const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                     _mm256_set1_epi8(char(0x80)));
  return {_mm256_abs_epi8(v), v};
}
inline I dot8(I acc, const W8& w, I x) {
  const __m256i pairs = _mm256_maddubs_epi16(w.mag, _mm256_sign_epi8(x, w.sgn));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
inline I dot4(I acc, const W4& w, I xl, I xh) {  // nibble pair sums <= 7620: both halves added in int16
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w.lo, xl), _mm256_maddubs_epi16(w.hi, xh));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
// Pair sums stay in int16 over a chunk of steps (4-bit: 7620 a step, 4 steps; 8-bit codes <= 31: 7874, 4;
// <= 63: 16002, 2; <= 127: 32258, 1), widened by one vpmaddwd a chunk: per step and row 2 instructions a
// chain instead of 4 (8-bit: no vpsignb, no widening), 4 instead of 5 (4-bit).
constexpr bool kSigned8Small = false;
using P = __m256i;
using W8s = __m256i;
inline W8s prep8s(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline P pzero() { return _mm256_setzero_si256(); }
inline P pdot8s(P acc, W8s w, I x) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x)); }
inline P pdot4(P acc, const W4& w, I xl, I xh) {
  return _mm256_add_epi16(acc, _mm256_add_epi16(_mm256_maddubs_epi16(w.lo, xl), _mm256_maddubs_epi16(w.hi, xh)));
}
inline I widen2(P q, P r) {
  return _mm256_add_epi32(_mm256_madd_epi16(q, _mm256_set1_epi16(256)), _mm256_madd_epi16(r, _mm256_set1_epi16(1)));
}
constexpr int chunk_steps(int pair_max) { return 32767 / pair_max; }
// Pins v in a register here: stops the compiler from hoisting every step's products ahead of their sums
// (which spills 16 registers' worth on AVX2).
inline void order(P& v) { asm volatile("" : "+x"(v)); }
#define COREJAX_ISA_HAS_ORDER 1
#endif
inline I zero() { return _mm256_setzero_si256(); }
inline I combine(I q, I r) { return _mm256_add_epi32(_mm256_slli_epi32(q, 8), r); }
inline F fzero() { return _mm256_setzero_ps(); }
inline F to_float(I v) { return _mm256_cvtepi32_ps(v); }
inline F fset(float f) { return _mm256_set1_ps(f); }
inline F params(const void* base, int64_t i, bool f16) {
  if (f16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                   static_cast<const uint16_t*>(base) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(base) + i);
}
inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
inline I add(I a, I b) { return _mm256_add_epi32(a, b); }

#elif defined(COREJAX_ISA_NEON)

constexpr int kLanes = 4, kRows = 8;  // 32 vector registers
constexpr bool kSigned8 = true;       // sdot multiplies signed by signed
using I = int32x4_t;
using F = float32x4_t;
using W8 = int8x16_t;
struct W4 { int8x16_t lo, hi; };
inline W8 prep8(const uint8_t* p) { return vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), vdupq_n_u8(0x80))); }
inline W4 prep4(const uint8_t* p) {
  const uint8x16_t raw = vld1q_u8(p);
  return {vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8(raw, 4))};
}
inline I bcast(const int8_t* p) { return vdupq_n_s32(load4(p)); }
#if defined(__ARM_FEATURE_DOTPROD)
inline I dot8(I acc, const W8& w, I x) { return vdotq_s32(acc, w, vreinterpretq_s8_s32(x)); }
#else
inline I dot8(I acc, const W8& w, I x) {  // products fit int16 (|v x| <= 128 * 127); lanes are 4 bytes each
  const int8x16_t xb = vreinterpretq_s8_s32(x);
  const int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(xb)));
  const int32x4_t hi = vpaddlq_s16(vmull_high_s8(w, xb));
  return vaddq_s32(acc, vpaddq_s32(lo, hi));
}
#endif
inline I dot4(I acc, const W4& w, I xl, I xh) { return dot8(dot8(acc, w.lo, xl), w.hi, xh); }
inline I zero() { return vdupq_n_s32(0); }
inline I combine(I q, I r) { return vaddq_s32(vshlq_n_s32(q, 8), r); }
inline F fzero() { return vdupq_n_f32(0.f); }
inline F to_float(I v) { return vcvtq_f32_s32(v); }
inline F fset(float f) { return vdupq_n_f32(f); }
inline F params(const void* base, int64_t i, bool f16) {
  if (f16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(static_cast<const uint16_t*>(base) + i)));
  return vld1q_f32(static_cast<const float*>(base) + i);
}
inline F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
inline F mul(F a, F b) { return vmulq_f32(a, b); }
inline void store(float* p, F v) { vst1q_f32(p, v); }
inline I add(I a, I b) { return vaddq_s32(a, b); }

#else  // scalar: plain loops over 16 lanes (compilers may vectorize them; correctness is the point)

constexpr int kLanes = 16, kRows = 8;
constexpr bool kSigned8 = false;
struct I { int32_t v[16]; };
struct F { float v[16]; };
struct W8 { uint8_t b[64]; };
struct W4 { uint8_t lo[64], hi[64]; };
inline W8 prep8(const uint8_t* p) {
  W8 w;
  std::memcpy(w.b, p, 64);
  return w;
}
inline W4 prep4(const uint8_t* p) {
  W4 w;
  for (int i = 0; i < 64; ++i) w.lo[i] = p[i] & 0x0F, w.hi[i] = p[i] >> 4;
  return w;
}
inline I bcast(const int8_t* p) {
  I x;
  for (int i = 0; i < 16; ++i) x.v[i] = load4(p);
  return x;
}
inline I dot_bytes(I acc, const uint8_t* w, const I& x) {
  int8_t xb[4];
  std::memcpy(xb, &x.v[0], 4);
  for (int c = 0; c < 16; ++c)
    for (int j = 0; j < 4; ++j) acc.v[c] += int32_t(w[c * 4 + j]) * int32_t(xb[j]);
  return acc;
}
inline I dot8(I acc, const W8& w, const I& x) { return dot_bytes(acc, w.b, x); }
inline I dot4(I acc, const W4& w, const I& xl, const I& xh) { return dot_bytes(dot_bytes(acc, w.lo, xl), w.hi, xh); }
inline I zero() { return I{}; }
inline I combine(I q, const I& r) {
  for (int i = 0; i < 16; ++i) q.v[i] = q.v[i] * 256 + r.v[i];
  return q;
}
inline F fzero() { return F{}; }
inline F to_float(const I& a) {
  F f;
  for (int i = 0; i < 16; ++i) f.v[i] = float(a.v[i]);
  return f;
}
inline F fset(float x) {
  F f;
  for (int i = 0; i < 16; ++i) f.v[i] = x;
  return f;
}
inline F params(const void* base, int64_t i, bool f16) {
  F f;
  for (int l = 0; l < 16; ++l)
    f.v[l] = f16 ? half_to_float(static_cast<const uint16_t*>(base)[i + l]) : static_cast<const float*>(base)[i + l];
  return f;
}
inline F fma(F a, const F& b, const F& c) {
  for (int i = 0; i < 16; ++i) a.v[i] = a.v[i] * b.v[i] + c.v[i];
  return a;
}
inline F mul(F a, const F& b) {
  for (int i = 0; i < 16; ++i) a.v[i] *= b.v[i];
  return a;
}
inline void store(float* p, const F& v) { std::memcpy(p, v.v, sizeof v.v); }
inline I add(I a, const I& b) {
  for (int i = 0; i < 16; ++i) a.v[i] += b.v[i];
  return a;
}

#endif

#if defined(COREJAX_ISA_AVX512VNNI) || defined(COREJAX_ISA_NEON) || defined(COREJAX_ISA_SCALAR) || \
    defined(COREJAX_ISA_P_IS_I)
// Dots that cannot saturate accumulate straight into int32: a chunk is the whole block.
constexpr bool kSigned8Small = kSigned8;
using P = I;
using W8s = W8;
inline W8s prep8s(const uint8_t* p) { return prep8(p); }
inline P pzero() { return zero(); }
inline P pdot8s(P acc, const W8s& w, const I& x) { return dot8(acc, w, x); }
inline P pdot4(P acc, const W4& w, const I& xl, const I& xh) { return dot4(acc, w, xl, xh); }
inline I widen2(const P& q, const P& r) { return combine(q, r); }
constexpr int chunk_steps(int) { return 1 << 20; }
inline void order(P&) {}
#endif

}  // namespace corejax::isa
