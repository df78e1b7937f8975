// Bidirectional (encoder) attention straight from the fused query/key/value projection:
// out[b, t, n*H : (n+1)*H] = softmax_s(q_t . k_s * scale) v_s over the real tokens s < lengths[b], where row
// (b, t) of qkv is [q (N*H) | k (N*H) | v (N*H)], as the [D, 3D] projection (kernels/small_matmul.cc) writes
// it. Padding queries (t >= lengths[b]) get zeros.
//
// Why it exists: for a sentence (8-64 tokens, 12 heads of 32) XLA:CPU runs the same attention as ~10 ops per
// layer: three transposes of q, k and v into head-major order, two batched dots, the softmax pieces and the
// transpose back, about ten times the arithmetic's time (docs/MEASUREMENTS.md). This kernel reads q, k and v where
// the projection put them, one (sequence, head) pair per task over the cores (kernels/parallel.h).
//
// Per pair: the head's keys are transposed once into kt[H][S] so that one query's scores against 16 keys
// are H vector FMAs; each query's score row (S floats, never an S x S matrix) is exponentiated with the
// row maximum subtracted (exact softmax, kernels/vecmath.h's exp), then p . V accumulates in H-wide vectors.
// Memory per task: (H + 1) x S floats. corejax/models/bert.py uses it when the library is loaded and falls
// back to kernels/flash_attention.py (the tiled kernel) otherwise.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "vecmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using corejax::load16;
using corejax::store16;
using corejax::v16;

// One (sequence, head) pair: rows [0, T) of q/k/v with row stride `stride` floats; `len` real tokens.
static void attend(const float* q, const float* k, const float* v, float* out, int64_t T, int64_t len,
                   int64_t H, int64_t stride, int64_t out_stride, float scale) {
  const int64_t S = (len + 15) / 16 * 16;  // keys padded to whole vectors
  std::vector<float> kt(H * S, 0.f), p(S);
  for (int64_t s = 0; s < len; ++s)
    for (int64_t h = 0; h < H; ++h) kt[h * S + s] = k[s * stride + h];
  for (int64_t t = 0; t < len; ++t) {
    const float* qt = q + t * stride;
    for (int64_t s0 = 0; s0 < S; s0 += 16) {
      v16 acc = v16{};
      for (int64_t h = 0; h < H; ++h) acc += qt[h] * load16(&kt[h * S + s0]);
      store16(&p[s0], acc * scale);
    }
    float m = p[0];
    for (int64_t s = 1; s < len; ++s) m = std::max(m, p[s]);
    v16 total = v16{};
    for (int64_t s0 = 0; s0 < S; s0 += 16) {
      v16 e = corejax::vexp(load16(&p[s0]) - m);
      if (s0 + 16 > len)
        for (int64_t i = len - s0; i < 16; ++i) e[i] = 0.f;  // padded keys take no weight
      store16(&p[s0], e);
      total += e;
    }
    const float inv = 1.f / corejax::hsum(total);
    float* o = out + t * out_stride;
    int64_t h = 0;
    for (; h + 16 <= H; h += 16) {
      v16 acc = v16{};
      for (int64_t s = 0; s < len; ++s) acc += p[s] * load16(v + s * stride + h);
      store16(o + h, acc * inv);
    }
    for (; h < H; ++h) {
      float acc = 0.f;
      for (int64_t s = 0; s < len; ++s) acc += p[s] * v[s * stride + h];
      o[h] = acc * inv;
    }
  }
  for (int64_t t = len; t < T; ++t) std::memset(out + t * out_stride, 0, H * sizeof(float));
}

static ffi::Error EncoderAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::S32> lengths,
                                       ffi::ResultBuffer<ffi::F32> out, int32_t heads, float scale, int32_t threads) {
  auto d = qkv.dimensions();
  if (d.size() != 3 || heads <= 0 || d[2] % (3 * int64_t(heads)) || lengths.element_count() != d[0] ||
      out->element_count() != d[0] * d[1] * d[2] / 3)
    return ffi::Error::InvalidArgument("corejax_encoder_attention: need qkv [B, T, 3 N H], lengths [B], "
                                       "out [B, T, N H]");
  const int64_t B = d[0], T = d[1], D = d[2] / 3, N = heads, H = D / N;
  const float* x = qkv.typed_data();
  const int32_t* lens = lengths.typed_data();
  float* y = out->typed_data();
  // A sentence's attention (12 heads x 16 tokens: ~0.2 M multiply-adds) is cheaper on this thread than with a
  // pool thread woken for it (docs/MEASUREMENTS.md); longer inputs are split over the pool.
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = std::clamp<int64_t>(lens[b], 0, T);
    work += 2 * N * H * len * len;
  }
  corejax::parallel_for(pool, B * N, work < (1 << 20) ? 1 : threads, [&](int64_t i) {
    const int64_t b = i / N, n = i % N, len = std::clamp<int64_t>(lens[b], 0, T);
    const float* base = x + b * T * 3 * D + n * H;
    attend(base, base + D, base + 2 * D, y + b * T * D + n * H, T, len, H, 3 * D, D, scale);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxEncoderAttention, EncoderAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("heads")
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("threads"));
