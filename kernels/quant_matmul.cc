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
// 256 q + r in int32 at each block's end, so the float work per block stays one scale per row). One rounding
// (llama.cpp's) left SmolLM2's logits far enough from the exact dequantized model to flip on float noise, so
// batched and paged runs parted from single ones and the 135M model stopped answering "Paris"; two keep the
// exact model's greedy text, for about a tenth of decode speed (docs/MEASUREMENTS.md).
//
// Layout (built once at load by quant.py): columns in groups of 16, so one 64-byte vector holds 4
// consecutive k of 16 columns, which is vpdpbusd's operand shape and keeps all 16 outputs in the lanes of
// one accumulator (no horizontal sums):
//   8-bit codes [N / 16, K / 4, 16, 4]        byte (c * 4 + j) of step s = u[4 s + j, 16 g + c]
//   4-bit codes [N / 16, K / 8, 64]           byte (c * 4 + j) of step s: low nibble u[8 s + j, 16 g + c],
//                                                                         high nibble u[8 s + 4 + j, ...]
//   scales, mins [N / 16, K / B, 16]          float16 or float32; B (values per scale) 16 or 32
//
// The ISA-specific part is confined to kernels/isa.h's primitives (load and split codes, broadcast 4
// activation bytes, the 4-byte dot into int32 lanes, float lanes): vpdpbusd on AVX-512 VNNI (a group in one
// pass of 16 lanes) and AVX-VNNI, vpmaddubsw + vpmaddwd on AVX2 (two passes of 8 columns; the int16 pair
// sums of 4-bit codes and of 8-bit codes <= 127 — Q5_0, Q6_K — add over chunks of steps before one vpmaddwd
// widens them, bounded so they cannot saturate; full-range bytes such as Q8_0's are multiplied as signed
// bytes, one step at a time), sdot on NEON (four passes of 4), plain C++ as the reference. Every path computes
// the same integer sums; only float summation order differs. On AVX2 both the chunks and keeping each step's
// sums in order (isa::order: GCC hoisted all products of a chunk ahead of their sums and spilled) sped up
// prefill and decode (docs/MEASUREMENTS.md).
//
// Rows: up to kRows (8; 4 on AVX2's 16 registers) share one pass over a column group (their int32 and float
// accumulators stay in registers); more rows loop over the group while it is in L1/L2 (prefill). Chunks of column groups are split over the
// caller and the kernels' helper threads (kernels/parallel.h: awake between a decode step's calls, asleep
// between steps), at most `threads` (from Python) workers.
//
// Built by corejax/native.py with the other kernels; registered as "corejax_quant_matmul".

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "amx.h"
#include "parallel.h"

#include "isa.h"

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kG = 16;      // columns per group
constexpr int64_t kQBlock = 32;  // activation values per int8 scale
constexpr int64_t kPrefetch = 8192;  // bytes ahead, of 4-32 KiB tried (docs/MEASUREMENTS.md)

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
  const int8_t* qr = nullptr;  // AMX only: q and r in the A tiles' layout (interleave_rows), or none
};

// ds for activation block b (32 values) of one row: the unit times the combined codes' sum over each weight
// block (B = 32: one; B = 16: the halves' sums, sums[0] and sums[1]).
inline void store_block_sums(float* ds_row, int64_t b, int64_t B, float unit, const int32_t* sums) {
  if (B == kQBlock) {
    ds_row[b] = unit * float(sums[0] + sums[1]);
  } else {
    ds_row[2 * b] = unit * float(sums[0]);
    ds_row[2 * b + 1] = unit * float(sums[1]);
  }
}

#if defined(__AVX512F__) && !defined(COREJAX_SCALAR)
// quantize_rows, 16 lanes at a time (the scalar loop cost a visible share of a decode step; docs/MEASUREMENTS.md).
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
      store_block_sums(ds + m * (K / B), b, B, scale / 256.f, sums);
    }
  }
  return true;
}
#elif defined(__AVX2__) && !defined(COREJAX_SCALAR)
// quantize_rows, 8 lanes at a time: the same arithmetic as the AVX-512 version.
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// 32 int32 (four vectors) -> 32 int8 in order (the packs interleave 128-bit lanes; the permute undoes it).
inline void store_bytes(int8_t* p, __m256i a, __m256i b, __m256i c, __m256i e) {
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, e));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

bool quantize_rows_avx2(const float* x, int64_t M, int64_t K, int64_t B, int8_t* q, int8_t* r, float* d,
                        float* ds) {
  if (B != kQBlock && B != 16) return false;
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f), sign = _mm256_set1_ps(-0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K / kQBlock; ++b) {
      const int64_t k = m * K + b * kQBlock;
      __m256 xv[4];
      for (int i = 0; i < 4; ++i) xv[i] = _mm256_loadu_ps(x + k + 8 * i);
      const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, xv[0]), _mm256_andnot_ps(sign, xv[1])),
                                     _mm256_max_ps(_mm256_andnot_ps(sign, xv[2]), _mm256_andnot_ps(sign, xv[3])));
      const float amax = hmax8(a);
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      d[m * (K / kQBlock) + b] = scale / 256.f;
      const __m256 vinv = _mm256_set1_ps(inv), vscale = _mm256_set1_ps(scale), vfine = _mm256_set1_ps(inv * 256.f);
      __m256i qi[4], ri[4];
      int32_t sums[2] = {0, 0};
      for (int i = 0; i < 4; ++i) {
        const __m256 qv = _mm256_round_ps(_mm256_mul_ps(xv[i], vinv), kNearest);
        const __m256 res = _mm256_sub_ps(xv[i], _mm256_mul_ps(qv, vscale));
        const __m256 rv = _mm256_max_ps(_mm256_min_ps(_mm256_round_ps(_mm256_mul_ps(res, vfine), kNearest), hi), lo);
        qi[i] = _mm256_cvtps_epi32(qv);
        ri[i] = _mm256_cvtps_epi32(rv);
        sums[i / 2] += hsum8(_mm256_add_epi32(_mm256_slli_epi32(qi[i], 8), ri[i]));
      }
      store_bytes(q + k, qi[0], qi[1], qi[2], qi[3]);
      store_bytes(r + k, ri[0], ri[1], ri[2], ri[3]);
      store_block_sums(ds + m * (K / B), b, B, scale / 256.f, sums);
    }
  }
  return true;
}
#endif

// x [M, K] float -> per 32 values d = max|x| / 127, q = round(x / d) (|q| <= 127: ggml's Q8_0), and the
// residual r = round((x - d q) / (d / 256)) (|r| <= 128, clamped to 127: the rare half-step case loses
// d / 256). x ~ (d / 256) (256 q + r): ~15 bits where ggml's activations carry 7.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t B, int8_t* q, int8_t* r, float* d, float* ds) {
#if defined(__AVX512F__) && !defined(COREJAX_SCALAR)
  if (quantize_rows_avx512(x, M, K, B, q, r, d, ds)) return;
#elif defined(__AVX2__) && !defined(COREJAX_SCALAR)
  if (quantize_rows_avx2(x, M, K, B, q, r, d, ds)) return;
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

// Rows [m0, m0 + M) x the 16 columns of group g, in 16 / kLanes passes of kLanes columns (kernels/isa.h).
// CMAX bounds the 8-bit codes (31, 63, 127 or 255: Q5_0, Q6_K, ... need no sign trick on AVX2 and their
// pair sums add in int16 over chunks of steps); 4-bit codes are <= 15 whatever CMAX says.
template <int M, int BITS, int B, int CMAX>
void group(const Weights& w, const Acts& a, int64_t g, int64_t m0, float* y) {
  using namespace corejax::isa;
  const int64_t K = w.K, nb = K / B;
  constexpr bool kFull8 = BITS == 8 && CMAX > 127;  // full-range bytes: the int32 dot8 chains
  // 8-bit codes multiplied as signed bytes are u - 128: the 128 joins the offset.
  const float offset = float(w.offset - (BITS == 8 && (kFull8 ? kSigned8 : kSigned8Small) ? 128 : 0));
  constexpr int kSteps = BITS == 8 ? B / 4 : B / 8;  // 64-byte steps per block
  constexpr int kPairMax = BITS == 4 ? 4 * 15 * 127 : 2 * std::min(CMAX, 127) * 127;
  constexpr int kChunkSteps = std::max(1, std::min(kSteps, chunk_steps(kPairMax)));
  static_assert(kSteps % kChunkSteps == 0);
  for (int pass = 0; pass < kG / kLanes; ++pass) {
    const uint8_t* cp = w.codes + g * w.group_bytes() + pass * 4 * kLanes;
    F accf[M];
    for (int m = 0; m < M; ++m) accf[m] = fzero();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * B;
      I acc[M];  // per row: 256 sum(u q) + sum(u r): |sum(u q)| <= 255 * 127 * 32 per block, inside int32
      if constexpr (kFull8) {
        I acc2[M];  // per row: the q chain and the r chain (also hides the dot's latency)
        for (int m = 0; m < M; ++m) acc[m] = acc2[m] = zero();
        for (int s = 0; s < kSteps; ++s, cp += 64) {
          __builtin_prefetch(cp + kPrefetch, 0, 3);
          const W8 wv = prep8(cp);
          for (int m = 0; m < M; ++m) {
            const int64_t at = (m0 + m) * K + k0 + 4 * s;
            acc[m] = dot8(acc[m], wv, bcast(a.q + at));
            acc2[m] = dot8(acc2[m], wv, bcast(a.r + at));
            order(acc[m]);
            order(acc2[m]);
          }
        }
        for (int m = 0; m < M; ++m) acc[m] = combine(acc[m], acc2[m]);
      } else {
        for (int c = 0; c < kSteps; c += kChunkSteps) {
          P pq[M], pr[M];
          for (int m = 0; m < M; ++m) pq[m] = pr[m] = pzero();
          for (int s = c; s < c + kChunkSteps; ++s, cp += 64) {
            __builtin_prefetch(cp + kPrefetch, 0, 3);
            if constexpr (BITS == 8) {
              const W8s wv = prep8s(cp);
              for (int m = 0; m < M; ++m) {
                const int64_t at = (m0 + m) * K + k0 + 4 * s;
                pq[m] = pdot8s(pq[m], wv, bcast(a.q + at));
                pr[m] = pdot8s(pr[m], wv, bcast(a.r + at));
                order(pq[m]);
                order(pr[m]);
              }
            } else {
              const W4 wv = prep4(cp);
              for (int m = 0; m < M; ++m) {
                const int64_t at = (m0 + m) * K + k0 + 8 * s;
                pq[m] = pdot4(pq[m], wv, bcast(a.q + at), bcast(a.q + at + 4));
                pr[m] = pdot4(pr[m], wv, bcast(a.r + at), bcast(a.r + at + 4));
                order(pq[m]);
                order(pr[m]);
              }
            }
          }
          for (int m = 0; m < M; ++m) acc[m] = c == 0 ? widen2(pq[m], pr[m]) : add(acc[m], widen2(pq[m], pr[m]));
        }
      }
      const int64_t p = (g * nb + b) * kG + pass * kLanes;
      const F sc = params(w.scales, p, w.f16);
      const F mins = w.mins ? params(w.mins, p, w.f16) : fzero();
      const F mn = fma(sc, fset(-offset), mul(mins, fset(-1.f)));  // -(scale * offset) - min
      for (int m = 0; m < M; ++m) {
        const F t = mul(to_float(acc[m]), fset(a.d[(m0 + m) * (K / kQBlock) + k0 / kQBlock]));
        accf[m] = fma(t, sc, accf[m]);
        accf[m] = fma(mn, fset(a.ds[(m0 + m) * nb + b]), accf[m]);
      }
    }
    for (int m = 0; m < M; ++m) store(y + (m0 + m) * w.N + g * kG + pass * kLanes, accf[m]);
  }
}


#if defined(COREJAX_ISA_AVX512VNNI) && defined(__AMX_INT8__) && defined(__AMX_TILE__) && !defined(COREJAX_SCALAR)
#define COREJAX_AMX 1
// AMX (Sapphire Rapids and later): a tile multiply adds 16 rows x 16 columns x 32 k int8 products in one
// instruction, so a batch of rows (decode with many streams, prefill) costs little more than one row's pass over
// the weights. Per column group and 32-k block: the q and r codes of 16 rows are two A tiles (rows of 32 bytes,
// read in place with the row stride K), the block's codes one B tile (8 rows of 64 bytes: our 8-bit layout is
// AMX's, [k / 4, column, k % 4]; 4-bit codes are split into that layout first), and tdpbsud (signed activations x
// unsigned codes) gives each row's sum(u q) and sum(u r) exactly as vpdpbusd does. The float epilogue is
// group()'s, op for op, so a row's output is bit-identical whichever path or batch computes it (batched streams
// equal their text alone). Linux grants AMX per process (arch_prctl ARCH_REQ_XCOMP_PERM); without the grant, or
// with COREJAX_AMX=0, the VNNI path runs.
using corejax::amx_granted;

constexpr int64_t kAmxRows = 8;      // rows per tile pass: their q codes, then their r codes, fill a tile's 16
constexpr int64_t kAmxMinRows = 8;   // fewer rows take the VNNI path (4 rows were faster there)

// Two sets of tiles, for two 32-k blocks in flight (a tile is not renamed: a set reused at once would wait for
// its last store): A 16 rows x 32 bytes (tiles 0, 3), B 8 rows x 64 bytes (1, 4), C 16 rows x 16 int32 (2, 5).
// Loaded at the start of every groups() call: pool threads run other kernels between our calls.
void amx_config() {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette
  uint16_t* colsb = reinterpret_cast<uint16_t*>(cfg + 16);
  uint8_t* rows = cfg + 48;
  for (int t : {0, 3}) colsb[t] = kQBlock, rows[t] = 2 * kAmxRows;
  for (int t : {1, 4}) colsb[t] = 64, rows[t] = kQBlock / 4;
  for (int t : {2, 5}) colsb[t] = 64, rows[t] = 2 * kAmxRows;
  // GCC 12 does not see ldtilecfg read its operand and drops the stores above without this barrier.
  asm volatile("" : : "r"(cfg) : "memory");
  _tile_loadconfig(cfg);
}

// A group's codes in AMX's B layout, 8 rows of 64 bytes per 32-k block: 8-bit codes are already, read in place;
// 4-bit step s holds k 8s..8s+3 in its low nibbles and 8s+4..8s+7 in its high ones, so its halves are two rows,
// written to `unpacked` for the whole group before its first tile load (a tile load right after the vector
// stores of its bytes waits for them to reach the cache).
template <int BITS>
inline const uint8_t* b_tiles(const uint8_t* cp, int64_t K, std::vector<uint8_t>& unpacked) {
  if constexpr (BITS == 8) {
    return cp;
  } else {
    if (unpacked.size() < size_t(K * kG)) unpacked.resize(K * kG);
    uint8_t* out = unpacked.data();
    for (int64_t s = 0; s < K / 8; ++s) {
      __builtin_prefetch(cp + 64 * s + kPrefetch, 0, 3);
      const corejax::isa::W4 wv = corejax::isa::prep4(cp + 64 * s);
      _mm512_storeu_si512(out + 128 * s, wv.lo);
      _mm512_storeu_si512(out + 128 * s + 64, wv.hi);
    }
    return out;
  }
}

// group()'s float epilogue for one block, op for op, from the tile's sums: row m's sum(u q) in C row m, its
// sum(u r) in row 8 + m.
template <int R>
inline void amx_epilogue(const Weights& w, const Acts& a, const int32_t* c, int64_t g, int64_t b, int64_t m0,
                         corejax::isa::F* accf) {
  using namespace corejax::isa;
  const int64_t nb = w.K / kQBlock, p = (g * nb + b) * kG;
  const F sc = params(w.scales, p, w.f16);
  const F mins = w.mins ? params(w.mins, p, w.f16) : fzero();
  const F mn = fma(sc, fset(-float(w.offset)), mul(mins, fset(-1.f)));  // -(scale * offset) - min
  for (int m = 0; m < R; ++m) {
    const I acc = combine(_mm512_load_si512(c + m * kG), _mm512_load_si512(c + (kAmxRows + m) * kG));
    const F t = mul(to_float(acc), fset(a.d[(m0 + m) * nb + b]));
    accf[m] = fma(t, sc, accf[m]);
    accf[m] = fma(mn, fset(a.ds[(m0 + m) * nb + b]), accf[m]);
  }
}

// Rows [m0, m0 + 8) (m0 a multiple of 8) x the 16 columns of group g, `codes` the group's B tiles
// (b_tiles). Two blocks per pass on the two tile sets; a pass's sums are read back (the epilogue) only after the
// next pass is issued, so the tile unit and the vector units overlap rather than wait on each other. (Storing
// all of a group's sums first and reading them afterwards was twice as slow: the stores left L1.)
void group_amx(const Weights& w, const Acts& a, const uint8_t* codes, int64_t g, int64_t m0, float* y) {
  using namespace corejax::isa;
  constexpr int R = kAmxRows;
  const int64_t K = w.K, nb = K / kQBlock;
  constexpr int64_t kTile = kQBlock / 4 * 64;     // bytes of a block's B tile
  constexpr int64_t kA = 2 * kAmxRows * kQBlock;  // bytes of a block's A tile
  alignas(64) int32_t c[2][2][2 * kAmxRows * kG];  // [pass parity][block of the pass]
  F accf[R];
  for (int m = 0; m < R; ++m) accf[m] = fzero();
  const int8_t* ap = a.qr + (m0 / kAmxRows) * nb * kA;
  int64_t pending = -1, pending_n = 0;  // the pass whose sums are stored but not yet read: first block, count
  for (int64_t b = 0; b < nb; b += 2) {
    const int64_t n = std::min<int64_t>(2, nb - b);
    if (w.bits == 8)  // read in place: the stream from memory, as group()'s
      for (int64_t l = 0; l < n * kTile; l += 64) __builtin_prefetch(codes + b * kTile + kPrefetch + l, 0, 3);
    int32_t(*out)[2 * kAmxRows * kG] = c[(b / 2) & 1];
    _tile_zero(2);
    _tile_loadd(0, ap + b * kA, kQBlock);
    _tile_loadd(1, codes + b * kTile, 64);
    _tile_dpbsud(2, 0, 1);
    if (n == 2) {
      _tile_zero(5);
      _tile_loadd(3, ap + (b + 1) * kA, kQBlock);
      _tile_loadd(4, codes + (b + 1) * kTile, 64);
      _tile_dpbsud(5, 3, 4);
    }
    _tile_stored(2, out[0], 64);
    if (n == 2) _tile_stored(5, out[1], 64);
    for (int64_t j = 0; j < pending_n; ++j) amx_epilogue<R>(w, a, c[(pending / 2) & 1][j], g, pending + j, m0, accf);
    pending = b, pending_n = n;
  }
  for (int64_t j = 0; j < pending_n; ++j) amx_epilogue<R>(w, a, c[(pending / 2) & 1][j], g, pending + j, m0, accf);
  for (int m = 0; m < R; ++m) store(y + (m0 + m) * w.N + g * kG, accf[m]);
}

// The A tiles' layout: rows in blocks of 8; per block of rows and 32-k block, one tile's 16 rows of 32 bytes
// (the rows' q codes, then their r codes; rows past M are zeros), contiguous, so a tile load reads 8 cache lines.
void interleave_rows(const int8_t* q, const int8_t* r, int64_t M, int64_t K, int8_t* qr) {
  const int64_t nb = K / kQBlock;
  for (int64_t m = 0; m < M; ++m) {
    int8_t* rows = qr + (m / kAmxRows) * nb * 2 * kAmxRows * kQBlock;
    for (int64_t b = 0; b < nb; ++b) {
      std::memcpy(rows + (b * 2 * kAmxRows + m % kAmxRows) * kQBlock, q + m * K + b * kQBlock, kQBlock);
      std::memcpy(rows + (b * 2 * kAmxRows + kAmxRows + m % kAmxRows) * kQBlock, r + m * K + b * kQBlock, kQBlock);
    }
  }
}
#endif

template <int BITS, int B, int CMAX>
void groups(const Weights& w, const Acts& a, int64_t M, int64_t g0, int64_t g1, float* y) {
#if defined(COREJAX_AMX)
  // Only for blocks of 32 (the activations' own), and for the codes whose products vpdpbusd takes unsigned.
  const bool amx = B == kQBlock && M >= kAmxMinRows && a.qr != nullptr && amx_granted();
  if (amx) amx_config();
  thread_local std::vector<uint8_t> unpacked;  // a group's 4-bit codes in the B tiles' layout
#endif
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = 0;
#if defined(COREJAX_AMX)
    if (amx) {
      const uint8_t* codes = b_tiles<BITS>(w.codes + g * w.group_bytes(), w.K, unpacked);
      for (; M - m >= kAmxRows; m += kAmxRows) group_amx(w, a, codes, g, m, y);
    }
#endif
    constexpr int R = corejax::isa::kRows;
    for (; m + R <= M; m += R) group<R, BITS, B, CMAX>(w, a, g, m, y);
    if (R > 4 && M - m >= 4) { group<4, BITS, B, CMAX>(w, a, g, m, y); m += 4; }
    if (M - m >= 2) { group<2, BITS, B, CMAX>(w, a, g, m, y); m += 2; }
    if (M - m >= 1) { group<1, BITS, B, CMAX>(w, a, g, m, y); m += 1; }
  }
}

using GroupsFn = void (*)(const Weights&, const Acts&, int64_t, int64_t, int64_t, float*);

template <int B>
GroupsFn pick_codes(int bits, int code_max) {
  if (bits == 4) return groups<4, B, 15>;
  if (code_max <= 31) return groups<8, B, 31>;
  if (code_max <= 63) return groups<8, B, 63>;
  if (code_max <= 127) return groups<8, B, 127>;
  return groups<8, B, 255>;
}

// The kernel for a format: bits and block, and the largest code (quant.py's QuantArray.code_max).
GroupsFn pick(int bits, int block, int code_max) {
  return block == 16 ? pick_codes<16>(bits, code_max) : pick_codes<32>(bits, code_max);
}

// Column groups in chunks of kChunk (4 KiB-64 KiB of codes each), claimed by the caller and the helpers (kernels/parallel.h).
constexpr int64_t kChunk = 4;

void run(ffi::ThreadPool& pool, const Weights& w, const Acts& a, int64_t M, int64_t B, int code_max, int threads,
         float* y) {
  const GroupsFn fn = pick(w.bits, int(B), code_max);
  const int64_t G = w.N / kG;
  corejax::parallel_for(pool, (G + kChunk - 1) / kChunk, threads, [&](int64_t c) {
    fn(w, a, M, c * kChunk, std::min(G, (c + 1) * kChunk), y);
  });
}

}  // namespace

// x [M, K] quantized once (quantize_rows), held for the handler's call. Rows come in segments (an expert's rows;
// one segment for a dense matmul) given by their starts; with AMX each segment of kAmxMinRows rows or more also
// gets its A-tile copy (interleave_rows).
struct QuantizedRows {
  std::vector<int8_t> q, r, qr;
  std::vector<float> d, ds;
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (segment start, its offset in qr) for segments that have one
  QuantizedRows(const float* x, int64_t M, int64_t K, int64_t B, const std::vector<int64_t>& starts)
      : q(M * K), r(M * K), d(M * (K / kQBlock)), ds(M * (K / B)) {
    quantize_rows(x, M, K, B, q.data(), r.data(), d.data(), ds.data());
#if defined(COREJAX_AMX)
    if (B != kQBlock || !amx_granted()) return;
    // Segments by index (an expert without rows shares its start with the next one, so never look them up by
    // start here): the qr offset of each segment of kAmxMinRows rows or more.
    std::vector<std::pair<size_t, int64_t>> chosen;  // (segment index, rows)
    int64_t size = 0;
    for (size_t i = 0; i < starts.size(); ++i) {
      const int64_t n = (i + 1 < starts.size() ? starts[i + 1] : M) - starts[i];
      if (n >= kAmxMinRows) {
        tiles.emplace_back(starts[i], size);
        chosen.emplace_back(i, n);
        size += (n + kAmxRows - 1) / kAmxRows * 2 * kAmxRows * K;
      }
    }
    qr.assign(size, 0);
    for (size_t t = 0; t < chosen.size(); ++t) {
      const int64_t s0 = starts[chosen[t].first];
      interleave_rows(q.data() + s0 * K, r.data() + s0 * K, chosen[t].second, K, qr.data() + tiles[t].second);
    }
#else
    (void)starts;
#endif
  }
  // The activations of rows [m0, ...), m0 a segment's start.
  Acts at(int64_t m0, int64_t K, int64_t B) const {
    Acts a{q.data() + m0 * K, r.data() + m0 * K, d.data() + m0 * (K / kQBlock), ds.data() + m0 * (K / B), K};
    for (const auto& [start, offset] : tiles)
      if (start == m0) a.qr = qr.data() + offset;
    return a;
  }
};

// The same product without XLA (one thread): lets a test load each ISA's build with ctypes and compare it with
// the scalar reference build. Returns 0, or 1 on a shape or format the kernel does not take.
extern "C" int corejax_quant_matmul_plain(const float* x, int64_t M, int64_t K, const uint8_t* codes,
                                          const void* scales, const void* mins, int64_t N, int32_t bits,
                                          int32_t block, int32_t offset, int32_t f16, int32_t code_max,
                                          float* y) {
  if ((bits != 4 && bits != 8) || (block != 16 && block != 32) || K % kQBlock || K % block || N % kG) return 1;
  const QuantizedRows rows(x, M, K, block, {0});
  const Weights w{codes, scales, mins, f16 != 0, bits, offset, K, N};
  pick(bits, block, code_max)(w, rows.at(0, K, block), M, 0, N / kG, y);
  return 0;
}

// The instruction set this library was built for (kernels/isa.h), e.g. "avx2"; corejax reports it.
extern "C" const char* corejax_isa() { return COREJAX_ISA_NAME; }

// 1 when the quantized matmul multiplies batches of 8 rows or more on AMX tiles (built for a CPU that has them,
// granted by the OS, not turned off with COREJAX_AMX=0), else 0.
extern "C" int corejax_amx() {
#if defined(COREJAX_AMX)
  return amx_granted() ? 1 : 0;
#else
  return 0;
#endif
}

// What both handlers check of one matrix's format: cd = codes [N/16, S, 64], sd = scales [N/16, K/B, 16] of one
// layer (or expert). nullptr when x's K, the format and the buffers agree, else what is wrong.
static const char* format_error(int32_t bits, int32_t block, int64_t K, const int64_t* cd, const int64_t* sd,
                                const ffi::AnyBuffer& scales, const ffi::AnyBuffer& mins, int32_t has_mins) {
  if (cd[2] != 64 || sd[2] != kG) return "bad codes/scales layout";
  if ((bits != 4 && bits != 8) || (block != 16 && block != 32) || K % kQBlock || K % block ||
      cd[1] * 64 * 8 != K * kG * bits || sd[0] != cd[0] || sd[1] != K / block)
    return "the codes/scales shapes do not match x and the format";
  if (scales.element_type() != ffi::DataType::F16 && scales.element_type() != ffi::DataType::F32)
    return "scales must be float16 or float32";
  if (has_mins && (mins.element_type() != scales.element_type() || mins.size_bytes() != scales.size_bytes()))
    return "mins must match the scales";
  return nullptr;
}


// codes, scales and mins may carry a leading layer axis [L, ...] (a model's layers stacked): `layer` [] int32
// picks one, read in place, so a layer loop never copies its weights out of the stack.
static ffi::Error QuantMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                                  ffi::AnyBuffer scales, ffi::AnyBuffer mins, ffi::Buffer<ffi::S32> layer,
                                  ffi::ResultBuffer<ffi::F32> y, int32_t bits, int32_t block, int32_t offset,
                                  int32_t has_mins, int32_t code_max, int32_t threads) {
  auto xd = x.dimensions(), cdims = codes.dimensions(), sdims = scales.dimensions();
  const size_t stacked = cdims.size() == 4 ? 1 : 0;
  if (xd.size() != 2 || cdims.size() != 3 + stacked || sdims.size() != 3 + stacked || layer.element_count() != 1)
    return ffi::Error::InvalidArgument("corejax_quant_matmul: need x [M, K], codes [(L,) N/16, S, 64], scales [(L,) N/16, K/B, 16], layer []");
  const int64_t L = stacked ? cdims[0] : 1, li = layer.typed_data()[0];
  const int64_t cd[3] = {cdims[stacked], cdims[stacked + 1], cdims[stacked + 2]};
  const int64_t sd[3] = {sdims[stacked], sdims[stacked + 1], sdims[stacked + 2]};
  if (li < 0 || li >= L || (stacked && sdims[0] != L))
    return ffi::Error::InvalidArgument("corejax_quant_matmul: bad layer index or layer axis");
  const int64_t M = xd[0], K = xd[1], N = cd[0] * kG;
  if (const char* err = format_error(bits, block, K, cd, sd, scales, mins, has_mins))
    return ffi::Error::InvalidArgument(std::string("corejax_quant_matmul: ") + err);
  const bool f16 = scales.element_type() == ffi::DataType::F16;
  const int64_t code_bytes = codes.size_bytes() / L, scale_bytes = scales.size_bytes() / L;
  const QuantizedRows rows(x.typed_data(), M, K, block, {0});
  const char* sp = static_cast<const char*>(scales.untyped_data()) + li * scale_bytes;
  const char* mp = has_mins ? static_cast<const char*>(mins.untyped_data()) + li * scale_bytes : nullptr;
  const Weights w{codes.typed_data() + li * code_bytes, sp, mp, f16, bits, offset, K, N};
  const Acts a = rows.at(0, K, block);
  run(pool, w, a, M, block, code_max, threads, y->typed_data());
  return ffi::Error::Success();
}

// A mixture of experts' matmul in one call: x [R, K] holds rows grouped by expert (counts[e] rows of expert e,
// in expert order), codes/scales/mins [(L,) E, N/16, ...] the experts of each layer; row block e is multiplied by
// expert e of layer `layer`, read in place. The activations are quantized once for all rows; then every (expert
// with rows, chunk of column groups) pair is one task on the pool, so a decode step's few experts split their
// columns over the cores and a prefill's many experts fill them. Rows of an expert share each pass over its
// weights (kernels/quant_matmul.cc's kRows), as in the dense kernel.
static ffi::Error QuantMatmulExpertsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                                         ffi::AnyBuffer scales, ffi::AnyBuffer mins, ffi::Buffer<ffi::S32> layer,
                                         ffi::Buffer<ffi::S32> counts, ffi::ResultBuffer<ffi::F32> y, int32_t bits,
                                         int32_t block, int32_t offset, int32_t has_mins, int32_t code_max,
                                         int32_t threads) {
  auto xd = x.dimensions(), cdims = codes.dimensions(), sdims = scales.dimensions();
  const size_t stacked = cdims.size() == 5 ? 1 : 0;
  if (xd.size() != 2 || cdims.size() != 4 + stacked || sdims.size() != 4 + stacked || layer.element_count() != 1 ||
      counts.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("corejax_quant_matmul_experts: need x [R, K], codes [(L,) E, N/16, S, 64], "
                                       "scales [(L,) E, N/16, K/B, 16], layer [], counts [E]");
  const int64_t L = stacked ? cdims[0] : 1, E = cdims[stacked], li = layer.typed_data()[0];
  const int64_t cd[3] = {cdims[stacked + 1], cdims[stacked + 2], cdims[stacked + 3]};
  const int64_t sd[3] = {sdims[stacked + 1], sdims[stacked + 2], sdims[stacked + 3]};
  const int64_t M = xd[0], K = xd[1], N = cd[0] * kG;
  if (li < 0 || li >= L || sdims[stacked] != E || counts.dimensions()[0] != E || (stacked && sdims[0] != L))
    return ffi::Error::InvalidArgument("corejax_quant_matmul_experts: bad layer index, expert or layer axis");
  if (const char* err = format_error(bits, block, K, cd, sd, scales, mins, has_mins))
    return ffi::Error::InvalidArgument(std::string("corejax_quant_matmul_experts: ") + err);
  const bool f16 = scales.element_type() == ffi::DataType::F16;
  const int32_t* cnt = counts.typed_data();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    if (cnt[e] < 0) return ffi::Error::InvalidArgument("corejax_quant_matmul_experts: a negative row count");
    start[e + 1] = start[e] + cnt[e];
  }
  if (start[E] > M) return ffi::Error::InvalidArgument("corejax_quant_matmul_experts: counts exceed the rows");
  const int64_t code_bytes = codes.size_bytes() / (L * E), scale_bytes = scales.size_bytes() / (L * E);
  const QuantizedRows rows(x.typed_data(), start[E], K, block, std::vector<int64_t>(start.begin(), start.end() - 1));
  float* out = y->typed_data();
  std::fill(out + start[E] * N, out + M * N, 0.f);  // rows past the counted ones (padding)
  const GroupsFn fn = pick(bits, block, code_max);
  const int64_t G = N / kG, chunks = (G + kChunk - 1) / kChunk;
  std::vector<int64_t> tasks;  // expert * chunks + chunk, for experts with rows
  for (int64_t e = 0; e < E; ++e)
    if (cnt[e] > 0)
      for (int64_t c = 0; c < chunks; ++c) tasks.push_back(e * chunks + c);
  const char* sp = static_cast<const char*>(scales.untyped_data());
  const char* mp = has_mins ? static_cast<const char*>(mins.untyped_data()) : nullptr;
  corejax::parallel_for(pool, int64_t(tasks.size()), threads, [&](int64_t t) {
    const int64_t e = tasks[t] / chunks, c = tasks[t] % chunks, at = li * E + e, m0 = start[e];
    const Weights w{codes.typed_data() + at * code_bytes, sp + at * scale_bytes,
                    mp ? mp + at * scale_bytes : nullptr, f16, bits, offset, K, N};
    fn(w, rows.at(m0, K, block), cnt[e], c * kChunk, std::min(G, (c + 1) * kChunk), out + m0 * N);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxQuantMatmulExperts, QuantMatmulExpertsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("offset")
                                  .Attr<int32_t>("has_mins")
                                  .Attr<int32_t>("code_max")
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxQuantMatmul, QuantMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("offset")
                                  .Attr<int32_t>("has_mins")
                                  .Attr<int32_t>("code_max")
                                  .Attr<int32_t>("threads"));
