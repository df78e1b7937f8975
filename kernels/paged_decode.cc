// Paged attention for a few query positions per row (decode, speculative verify), float32 KV, read in place.
//
// Why it exists: the lax path (kernels/paged_attention.py) gathers each row's pages into a dense tile
// before its dots; for a batch of decode rows those gathers — and the tile rounded up to 1024 tokens —
// cost more than the attention math (SmolLM2, 8 rows at ~100 tokens: 20 of a 49 ms decode step). Here each
// (row, kv head) walks its page table and reads every key and value once, straight from the cache, for
// all G query heads that share it; online softmax, no score matrix, no copies.
//
// Operands: q [B, T, N, H]; k_pages, v_pages [L, K, P, page_size, H] — the whole cache, `layer` picks the
// slice, so XLA never copies a layer out; page_table [B, W] int32; lengths [B]; q_positions [B, T].
// Attributes: layer, window (0 = none), scale, softcap (0 = none). A key s of row b is visible to a query
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

// q . k over H floats: 16 lanes at a time (GCC does not vectorise a float sum without -ffast-math).
static inline float Dot(const float* a, const float* b, int64_t H) {
  int64_t h = 0;
  float total = 0.f;
  if (H >= 16) {
    v16 acc = v16{};
    for (; h + 16 <= H; h += 16) {
      v16 x, y;
      std::memcpy(&x, a + h, sizeof x);
      std::memcpy(&y, b + h, sizeof y);
      acc += x * y;
    }
    for (int i = 0; i < 16; ++i) total += acc[i];
  }
  for (; h < H; ++h) total += a[h] * b[h];
  return total;
}

static ffi::Error PagedDecodeImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                                  ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> page_table,
                                  ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> q_positions,
                                  ffi::ResultBuffer<ffi::F32> out, int64_t layer, int64_t window, float scale,
                                  float softcap) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || td.size() != 2 || kd[4] != qd[3] || qd[2] % kd[1] != 0 ||
      td[0] != qd[0] || layer < 0 || layer >= kd[0])
    return ffi::Error::InvalidArgument("corejax_paged_decode: bad operand shapes");
  const int64_t B = qd[0], T = qd[1], N = qd[2], H = qd[3];
  const int64_t K = kd[1], P = kd[2], PS = kd[3], W = td[1], G = N / K;
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data() + layer * K * P * PS * H;
  const float* vp = v_pages.typed_data() + layer * K * P * PS * H;
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
        const float* kbase = kp + (kh * P + page) * PS * H;
        const float* vbase = vp + (kh * P + page) * PS * H;
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
            const float* vv = vbase + (key - start) * H;
            for (int64_t h = 0; h < H; ++h) a[h] += e * vv[h];
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
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxPagedDecode, PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
