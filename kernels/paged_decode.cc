// Paged attention for a few query positions per row (decode, speculative verify), float32 or bfloat16 KV, read
// in place.
//
// Why it exists: the lax path (kernels/paged_attention.py) gathers each row's pages into a dense tile
// before its dots; for a batch of decode rows those gathers — and the tile rounded up to 1024 tokens —
// cost more than the attention math (for SmolLM2, a large share of a batched decode step;
// docs/MEASUREMENTS.md). Here each (row, kv head) walks its page table and reads every key and value once,
// straight from the cache, for all G query heads that share it; online softmax, no score matrix, no copies.
//
// Operands: q [B, T, N, H]; k_pages, v_pages [L, K, P, page_size, H] — the whole cache, `layer` picks the
// slice, so XLA never copies a layer out; page_table [B, W] int32; lengths [B]; q_positions [B, T].
// layer_window [2] int32: the layer and its window (0 = none), operands so that one compiled layer serves every
// layer of a loop. Attributes: scale, softcap (0 = none). A key s of row b is visible to a query
// at position p iff s < lengths[b], s <= p and (window == 0 or p - s < window). No visible key: zeros.
// Registered with jax.ffi as the CPU target "corejax_paged_decode" (kernels/native.py).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));

typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));

// KV elements as float: float32 pages as they are; bfloat16 pages (kv_dtype="bf16") widened as they are read,
// a bfloat16 being the top half of a float32 (XLA:CPU's own bfloat16 path rewrote the whole cache on every
// write and ran decode many times slower than float32 pages: docs/MEASUREMENTS.md).
struct Bf16 {
  uint16_t bits;
};
static inline float ToFloat(float x) { return x; }
static inline float ToFloat(Bf16 x) {
  const uint32_t w = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
static inline v16 Load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline v16 Load16(const Bf16* p) {
  v16u16 h;
  std::memcpy(&h, p, sizeof h);
  const v16u32 w = __builtin_convertvector(h, v16u32) << 16;
  v16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// q . k over H values: 16 lanes at a time (GCC does not vectorise a float sum without -ffast-math).
template <typename KV>
static inline float Dot(const float* a, const KV* b, int64_t H) {
  int64_t h = 0;
  float total = 0.f;
  if (H >= 16) {
    v16 acc = v16{};
    for (; h + 16 <= H; h += 16) acc += Load16(a + h) * Load16(b + h);
    for (int i = 0; i < 16; ++i) total += acc[i];
  }
  for (; h < H; ++h) total += a[h] * ToFloat(b[h]);
  return total;
}

// a[0, H) += e * v[0, H)
template <typename KV>
static inline void Axpy(float* a, float e, const KV* v, int64_t H) {
  int64_t h = 0;
  for (; h + 16 <= H; h += 16) {
    const v16 r = Load16(a + h) + e * Load16(v + h);
    std::memcpy(a + h, &r, sizeof r);
  }
  for (; h < H; ++h) a[h] += e * ToFloat(v[h]);
}

template <typename KV>
static void PagedDecode(ffi::Buffer<ffi::F32>& q, const KV* k_all, const KV* v_all, ffi::Span<const int64_t> kd,
                        ffi::Buffer<ffi::S32>& page_table, ffi::Buffer<ffi::S32>& lengths,
                        ffi::Buffer<ffi::S32>& q_positions, ffi::ResultBuffer<ffi::F32>& out, int64_t layer,
                        int64_t window, float scale, float softcap) {
  auto qd = q.dimensions(), td = page_table.dimensions();
  const int64_t B = qd[0], T = qd[1], N = qd[2], H = qd[3];
  const int64_t K = kd[1], P = kd[2], PS = kd[3], W = td[1], G = N / K;
  const float* qp = q.typed_data();
  const KV* kp = k_all + layer * K * P * PS * H;
  const KV* vp = v_all + layer * K * P * PS * H;
  const int32_t* table = page_table.typed_data();
  const int32_t* len = lengths.typed_data();
  const int32_t* pos = q_positions.typed_data();
  float* op = out->typed_data();

  const int64_t R = T * G;  // query rows sharing one kv head
  std::vector<float> qs(R * H), acc(R * H), m(R), l(R), s(R * PS);
  for (int64_t b = 0; b < B; ++b) {
    int64_t hi = 0, lo = INT64_MAX;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = pos[b * T + t];
      hi = std::max<int64_t>(hi, std::min<int64_t>(len[b], p + 1));
      lo = std::min<int64_t>(lo, window ? std::max<int64_t>(0, p - window + 1) : 0);
    }
    hi = std::min<int64_t>(hi, W * PS);
    for (int64_t kh = 0; kh < K; ++kh) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const float* src = qp + ((b * T + t) * N + kh * G + g) * H;
          float* dst = &qs[(t * G + g) * H];
          for (int64_t h = 0; h < H; ++h) dst[h] = src[h] * scale;
        }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      // One page (up to PS keys) at a time: scores for every query row, then one online-softmax update
      // per row and page, so the running max and the rescale of acc happen per page, not per key.
      for (int64_t start = lo - lo % PS; start < hi; start += PS) {
        const int64_t page = table[b * W + start / PS];
        if (page < 0 || page >= P) continue;  // the host never writes such entries; stay in bounds anyway
        const KV* kbase = kp + (kh * P + page) * PS * H;
        const KV* vbase = vp + (kh * P + page) * PS * H;
        const int64_t k0 = std::max(start, lo), k1 = std::min(start + PS, hi);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t p = pos[b * T + r / G];
          const float* qr = &qs[r * H];
          float block_max = -INFINITY;
          for (int64_t key = k0; key < k1; ++key) {
            float& out = s[r * PS + key - start];
            if (key > p || key >= len[b] || (window && p - key >= window)) {
              out = -INFINITY;
              continue;
            }
            const float dot = Dot(qr, kbase + (key - start) * H, H);
            out = softcap > 0.f ? std::tanh(dot / softcap) * softcap : dot;
            block_max = std::max(block_max, out);
          }
          if (block_max == -INFINITY) continue;
          const float m_new = std::max(m[r], block_max);
          const float corr = std::exp(m[r] - m_new);  // exp(-inf) = 0 before the first visible key
          float* a = &acc[r * H];
          for (int64_t h = 0; h < H; ++h) a[h] *= corr;
          float sum = 0.f;
          for (int64_t key = k0; key < k1; ++key) {
            const float sc = s[r * PS + key - start];
            if (sc == -INFINITY) continue;
            const float e = std::exp(sc - m_new);
            sum += e;
            Axpy(a, e, vbase + (key - start) * H, H);
          }
          l[r] = l[r] * corr + sum;
          m[r] = m_new;
        }
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = t * G + g;
          float* dst = op + ((b * T + t) * N + kh * G + g) * H;
          const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
          for (int64_t h = 0; h < H; ++h) dst[h] = acc[r * H + h] * inv;
        }
    }
  }
}

static ffi::Error PagedDecodeImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                                  ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> lengths,
                                  ffi::Buffer<ffi::S32> q_positions, ffi::Buffer<ffi::S32> layer_window,
                                  ffi::ResultBuffer<ffi::F32> out, float scale, float softcap) {
  if (layer_window.element_count() != 2)
    return ffi::Error::InvalidArgument("corejax_paged_decode: layer_window must be [layer, window]");
  const int64_t layer = layer_window.typed_data()[0], window = layer_window.typed_data()[1];
  auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || td.size() != 2 || kd[4] != qd[3] || qd[2] % kd[1] != 0 ||
      td[0] != qd[0] || layer < 0 || layer >= kd[0] || window < 0 || v_pages.element_type() != k_pages.element_type() ||
      v_pages.size_bytes() != k_pages.size_bytes())
    return ffi::Error::InvalidArgument("corejax_paged_decode: bad operand shapes");
  if (k_pages.element_type() == ffi::DataType::F32)
    PagedDecode(q, static_cast<const float*>(k_pages.untyped_data()), static_cast<const float*>(v_pages.untyped_data()),
                kd, page_table, lengths, q_positions, out, layer, window, scale, softcap);
  else if (k_pages.element_type() == ffi::DataType::BF16 || k_pages.element_type() == ffi::DataType::U16)
    PagedDecode(q, static_cast<const Bf16*>(k_pages.untyped_data()), static_cast<const Bf16*>(v_pages.untyped_data()),
                kd, page_table, lengths, q_positions, out, layer, window, scale, softcap);
  else
    return ffi::Error::InvalidArgument("corejax_paged_decode: KV pages must be float32 or bfloat16 (or its bits as uint16)");
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxPagedDecode, PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
