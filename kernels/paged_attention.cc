// Paged attention on a CPU, for every query count: a decode step, a speculative verify, a prefill chunk. KV pages
// in float32 or bfloat16, read in place from the whole cache; split over the cores (kernels/parallel.h).
//
// Why it exists: the lax path (kernels/paged_attention.py) gathers each tile of pages into a dense copy, builds
// [B, K, G, T, tile] score tensors and runs ~15 XLA ops per tile on one core; at a 4k-token prompt its prefill
// was 0.57x llama.cpp's and the single-threaded decode kernel it replaces 0.58x (issue 37, docs/MEASUREMENTS.md).
//
// Work: tasks of (row b, kv head, a block of query positions, a range of keys). A prefill chunk splits into
// blocks of about 64 query rows (positions x the G query heads that share a kv head), so a key tile is read
// once for all of them; a decode step (few rows) splits its keys instead (flash-decoding), so one long sequence
// keeps both cores busy. Each task keeps an online softmax (running max m, sum l, unnormalized acc) over tiles
// of kTile keys; the tasks of one (b, kv head, block) are merged at the end. No score matrix beyond one tile,
// no copies of pages.
//
// Scores per tile: with many rows the tile's keys are transposed once into kt[H][kTile], so a row's kTile
// scores are H vector FMAs (no horizontal sums); with few rows (decode) each key is dotted with each row
// straight from its page (the tile transpose would cost more than the dots).
//
// Operands: q [B, T, N, H] f32; k_pages, v_pages [L, K, P, page_size, H] (f32, or bf16 as bf16 or its uint16
// bits); page_table [B, W] int32; lengths [B]; q_positions [B, T]; layer_window [2] int32: the layer and its
// window (0 = none), operands so that one compiled layer serves a whole layer loop. Attributes: scale,
// softcap (0 = none), threads. A key s of row b is visible to a query at position p iff s < lengths[b], s <= p,
// and (window == 0 or p - s < window). No visible key: zeros. Registered as "corejax_paged_attention".

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "vecmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using corejax::load16;
using corejax::splat;
using corejax::store16;
using corejax::v16;
using corejax::v16i;

namespace {

// bfloat16 KV values are the top halves of float32s: widened as they are read.
struct Bf16 {
  uint16_t bits;
};
typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));

inline float ToFloat(float x) { return x; }
inline float ToFloat(Bf16 x) {
  const uint32_t w = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline v16 Load(const float* p) { return load16(p); }
inline v16 Load(const Bf16* p) {
  v16u16 h;
  std::memcpy(&h, p, sizeof h);
  const v16u32 w = __builtin_convertvector(h, v16u32) << 16;
  v16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

constexpr int64_t kTile = 32;          // keys per tile: two vectors of scores per query row
constexpr int64_t kBlockRows = 64;     // query rows per prefill task (positions x G)
constexpr int64_t kTransposeRows = 8;  // from this many rows a tile's keys are transposed for the score dots
constexpr int64_t kMinSplitKeys = 256; // a decode task reads at least this many keys
constexpr int64_t kPrefetchTiles = 4;  // how far ahead decode prefetches, in tiles
const float kNegInf = -INFINITY;

inline float HMax(v16 v) {  // a tree of shuffles (max is exact in any order)
  v16 a = corejax::vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  a = corejax::vmax(a, __builtin_shufflevector(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  a = corejax::vmax(a, __builtin_shufflevector(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  return std::max(a[0], a[1]);
}

template <typename KV>
struct Problem {
  const float* q;
  const KV* k;  // layer `layer` of the cache: [K, P, PS, H]
  const KV* v;
  const int32_t* table;
  const int32_t* len;
  const int32_t* pos;
  int64_t B, T, N, H, K, P, PS, W, G, window;
  int ps_shift = -1;  // log2(PS) where PS is a power of two (the usual 16): no division per key
  float scale, softcap;

  int64_t PageOf(int64_t s) const { return ps_shift >= 0 ? s >> ps_shift : s / PS; }

  // Key s of row b, head kh: its page row, or nullptr where the table entry is out of range (the host never
  // writes such entries; the kernel stays in bounds anyway and treats the key as invisible).
  const KV* Row(const KV* base, int64_t b, int64_t kh, int64_t s) const {
    const int64_t pi = PageOf(s);
    if (pi >= W) return nullptr;
    const int64_t page = table[b * W + pi];
    if (page < 0 || page >= P) return nullptr;
    return base + ((kh * P + page) * PS + (s - pi * PS)) * H;
  }

  // Prefetches the keys and values of [s0, s1) into the cache.
  void Prefetch(int64_t b, int64_t kh, int64_t s0, int64_t s1) const {
    for (int64_t s = s0; s < s1;) {
      const int64_t end = std::min(s1, (PageOf(s) + 1) * PS);  // the rest of s's page
      const KV* kr = Row(k, b, kh, s);
      if (kr) {
        const char* kc = reinterpret_cast<const char*>(kr);
        const char* vc = reinterpret_cast<const char*>(Row(v, b, kh, s));
        const int64_t bytes = (end - s) * H * int64_t(sizeof(KV));
        for (int64_t o = 0; o < bytes; o += 64) {
          __builtin_prefetch(kc + o);
          __builtin_prefetch(vc + o);
        }
      }
      s = end;
    }
  }
};

// One task's running softmax state and scratch, reused by a thread's successive tasks.
struct Scratch {
  std::vector<float> qs, s, kt;
  std::vector<v16> lanes;
  std::vector<int32_t> rowpos;
};

// acc[r][0, H) += sum_j p[r][j] * v_j for rows [r0, r0 + RB) (RB <= 4), keys j < n: each value vector is loaded
// once for the RB rows, whose accumulators stay in registers over the tile (NC vectors of 16 per row).
template <typename KV, int RB, int NC>
inline void PVChunk(float* acc, const float* p, const KV* const* vrow, int64_t n, int64_t H, int64_t h0) {
  v16 a[RB][NC];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NC; ++c) a[r][c] = load16(acc + r * H + h0 + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    if (!vrow[j]) continue;
    v16 x[NC];
    for (int c = 0; c < NC; ++c) x[c] = Load(vrow[j] + h0 + 16 * c);
    for (int r = 0; r < RB; ++r) {
      const float w = p[r * kTile + j];
      for (int c = 0; c < NC; ++c) a[r][c] += w * x[c];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NC; ++c) store16(acc + r * H + h0 + 16 * c, a[r][c]);
}

template <typename KV, int RB>
inline void PVRows(float* acc, const float* p, const KV* const* vrow, int64_t n, int64_t H) {
  int64_t h = 0;
  for (; h + 64 <= H; h += 64) PVChunk<KV, RB, 4>(acc, p, vrow, n, H, h);
  for (; h + 16 <= H; h += 16) PVChunk<KV, RB, 1>(acc, p, vrow, n, H, h);
  for (; h < H; ++h)
    for (int r = 0; r < RB; ++r) {
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j)
        if (vrow[j]) sum += p[r * kTile + j] * ToFloat(vrow[j][h]);
      acc[r * H + h] += sum;
    }
}

// q . k over whole vectors of H (H % 16 == 0), lanes not yet summed; tail values past the last vector are the
// caller's (DotTail).
template <typename KV>
inline v16 DotLanes(const float* a, const KV* b, int64_t H16) {
  v16 acc = v16{};
  for (int64_t h = 0; h < H16; h += 16) acc += load16(a + h) * Load(b + h);
  return acc;
}
template <typename KV>
inline float DotTail(const float* a, const KV* b, int64_t h, int64_t H) {
  float total = 0.f;
  for (; h < H; ++h) total += a[h] * ToFloat(b[h]);
  return total;
}

// out[k] = the sum of a[k]'s 16 lanes, for 16 vectors at once: a tree of shuffles and adds (15 pairs), where
// 16 separate horizontal sums would each be a chain of dependent adds.
inline v16 Reduce16(const v16* a) {
  v16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // b[i]: lanes 0-7 partial sums of key 2i, 8-15 of key 2i+1
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  // c[i]: quarters hold keys 4i, 4i+2, 4i+1, 4i+3
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  // d[i]: lane pairs hold keys 8i + {0, 4, 2, 6, 1, 5, 3, 7}
  const v16 e = __builtin_shufflevector(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                __builtin_shufflevector(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  // e: keys 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15 (bit-reversed); back to order
  return __builtin_shufflevector(e, e, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// Rows [t0, t1) x G of (b, kv head kh) against keys [k0, k1): the unnormalized result acc [R][H], the running
// max m [R] and sum l [R].
template <typename KV>
void AttendRange(const Problem<KV>& pr, int64_t b, int64_t kh, int64_t t0, int64_t t1, int64_t k0, int64_t k1,
                 float* acc, float* m, float* l, Scratch& sc) {
  const int64_t H = pr.H, G = pr.G, R = (t1 - t0) * G;
  sc.qs.resize(R * H);
  sc.s.resize(R * kTile);
  sc.rowpos.resize(R);
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = (t - t0) * G + g;
      const float* src = pr.q + ((b * pr.T + t) * pr.N + kh * G + g) * H;
      for (int64_t h = 0; h < H; ++h) sc.qs[r * H + h] = src[h] * pr.scale;
      sc.rowpos[r] = pr.pos[b * pr.T + t];
    }
  std::fill(acc, acc + R * H, 0.f);
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.f);
  const bool transpose = R >= kTransposeRows;
  if (transpose) sc.kt.resize(H * kTile);
  const int64_t length = pr.len[b];
  const KV* krow[kTile];
  const KV* vrow[kTile];
  float* s = sc.s.data();
  const v16i iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

  // The first tiles, which the prefetch inside the loop never asks for (at a short context, all of them).
  if (!transpose) pr.Prefetch(b, kh, k0, std::min(k1, k0 + kPrefetchTiles * kTile));
  for (int64_t s0 = k0; s0 < k1; s0 += kTile) {
    const int64_t n = std::min(kTile, k1 - s0);
    // Decode streams the context's pages from memory once per step: ask for the tile after next now, so the
    // loads overlap this tile's arithmetic (without it one core read ~3.6 GB/s, a third of what it can).
    if (!transpose) pr.Prefetch(b, kh, s0 + kPrefetchTiles * kTile, std::min(k1, s0 + (kPrefetchTiles + 1) * kTile));
    bool any = false;
    for (int64_t j = 0; j < n; ++j) {
      krow[j] = pr.Row(pr.k, b, kh, s0 + j);
      vrow[j] = krow[j] ? pr.Row(pr.v, b, kh, s0 + j) : nullptr;
      any |= krow[j] != nullptr;
    }
    if (!any) continue;
    for (int64_t j = n; j < kTile; ++j) krow[j] = vrow[j] = nullptr;
    // Scores s[r][0, kTile) (entries past n or of a missing page are masked below).
    if (transpose) {
      float* kt = sc.kt.data();
      for (int64_t j = 0; j < kTile; ++j) {
        if (!krow[j]) {
          for (int64_t h = 0; h < H; ++h) kt[h * kTile + j] = 0.f;
          continue;
        }
        for (int64_t h = 0; h < H; ++h) kt[h * kTile + j] = ToFloat(krow[j][h]);
      }
      int64_t r = 0;
      for (; r + 4 <= R; r += 4) {
        v16 a0 = v16{}, a1 = v16{}, b0 = v16{}, b1 = v16{}, c0 = v16{}, c1 = v16{}, d0 = v16{}, d1 = v16{};
        const float *q0 = &sc.qs[r * H], *q1 = q0 + H, *q2 = q1 + H, *q3 = q2 + H;
        for (int64_t h = 0; h < H; ++h) {
          const v16 x0 = load16(kt + h * kTile), x1 = load16(kt + h * kTile + 16);
          a0 += q0[h] * x0, a1 += q0[h] * x1;
          b0 += q1[h] * x0, b1 += q1[h] * x1;
          c0 += q2[h] * x0, c1 += q2[h] * x1;
          d0 += q3[h] * x0, d1 += q3[h] * x1;
        }
        store16(s + r * kTile, a0), store16(s + r * kTile + 16, a1);
        store16(s + (r + 1) * kTile, b0), store16(s + (r + 1) * kTile + 16, b1);
        store16(s + (r + 2) * kTile, c0), store16(s + (r + 2) * kTile + 16, c1);
        store16(s + (r + 3) * kTile, d0), store16(s + (r + 3) * kTile + 16, d1);
      }
      for (; r < R; ++r) {
        v16 a0 = v16{}, a1 = v16{};
        const float* q0 = &sc.qs[r * H];
        for (int64_t h = 0; h < H; ++h) {
          a0 += q0[h] * load16(kt + h * kTile);
          a1 += q0[h] * load16(kt + h * kTile + 16);
        }
        store16(s + r * kTile, a0), store16(s + r * kTile + 16, a1);
      }
    } else {
      // Each key row read once for the R rows; lane partials summed 16 keys at a time (Reduce16).
      const int64_t H16 = H / 16 * 16;
      sc.lanes.resize(R * 16);
      v16* lanes = reinterpret_cast<v16*>(sc.lanes.data());
      for (int64_t j0 = 0; j0 < kTile; j0 += 16) {
        for (int64_t j = j0; j < j0 + 16; ++j)
          for (int64_t r = 0; r < R; ++r)
            lanes[r * 16 + j - j0] = krow[j] ? DotLanes(&sc.qs[r * H], krow[j], H16) : v16{};
        for (int64_t r = 0; r < R; ++r) {
          v16 sums = Reduce16(&lanes[r * 16]);
          if (H16 < H)
            for (int64_t j = j0; j < j0 + 16; ++j)
              if (krow[j]) sums[j - j0] += DotTail(&sc.qs[r * H], krow[j], H16, H);
          store16(s + r * kTile + j0, sums);
        }
      }
    }
    // Mask, soft-cap, online softmax update per row; s becomes the tile's weights p.
    v16i valid[2];
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 16; ++i) valid[c][i] = krow[16 * c + i] ? -1 : 0;
    for (int64_t r = 0; r < R; ++r) {
      const int32_t p = sc.rowpos[r];
      v16 x[2];
      v16i vis[2];
      for (int c = 0; c < 2; ++c) {
        const v16i key = iota + int32_t(s0 + 16 * c);
        vis[c] = valid[c] & (key < int32_t(length)) & (key <= p);
        if (pr.window) vis[c] &= (p - key) < int32_t(pr.window);
        x[c] = load16(s + r * kTile + 16 * c);
        if (pr.softcap > 0.f) x[c] = corejax::vtanh(x[c] / pr.softcap) * pr.softcap;
        x[c] = vis[c] ? x[c] : splat(kNegInf);
      }
      const float tmax = std::max(HMax(x[0]), HMax(x[1]));
      if (tmax == kNegInf) {
        store16(s + r * kTile, v16{}), store16(s + r * kTile + 16, v16{});
        continue;
      }
      const float m_new = std::max(m[r], tmax);
      const float corr = std::exp(m[r] - m_new);  // 0 before the first visible key
      v16 total = v16{};
      for (int c = 0; c < 2; ++c) {
        const v16 e = vis[c] ? corejax::vexp(x[c] - m_new) : v16{};
        total += e;
        store16(s + r * kTile + 16 * c, e);
      }
      l[r] = l[r] * corr + corejax::hsum(total);
      m[r] = m_new;
      if (corr != 1.f) {
        float* a = acc + r * H;
        for (int64_t h = 0; h < H; ++h) a[h] *= corr;
      }
    }
    // acc += p . V, up to four rows per pass over the values (three for a GQA group of 3, 6 or 7 heads).
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) PVRows<KV, 4>(acc + r * H, s + r * kTile, vrow, n, H);
    if (R - r == 3) PVRows<KV, 3>(acc + r * H, s + r * kTile, vrow, n, H), r += 3;
    if (R - r == 2) PVRows<KV, 2>(acc + r * H, s + r * kTile, vrow, n, H), r += 2;
    if (R - r == 1) PVRows<KV, 1>(acc + r * H, s + r * kTile, vrow, n, H), r += 1;
  }
}

struct Task {
  int64_t b, kh, t0, t1, k0, k1;
  int64_t group;   // the (b, kh, query block) it belongs to
  int64_t offset;  // of its partial state in the scratch: R * (H + 2) floats
};

template <typename KV>
void Run(ffi::ThreadPool& pool, const Problem<KV>& pr, float* out, int64_t threads) {
  const int64_t B = pr.B, T = pr.T, G = pr.G, K = pr.K, H = pr.H;
  const int64_t qb = std::max<int64_t>(1, std::min<int64_t>(T, kBlockRows / G));
  struct Group {
    int64_t b, kh, t0, t1, first, count;
  };
  std::vector<Group> groups;
  std::vector<Task> tasks;
  // The visible keys of each (b, block): [lo, hi).
  int64_t work = 0;
  std::vector<std::array<int64_t, 2>> spans;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t0 = 0; t0 < T; t0 += qb) {
      const int64_t t1 = std::min(T, t0 + qb);
      int64_t hi = 0, lo = INT64_MAX;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = pr.pos[b * T + t];
        hi = std::max<int64_t>(hi, std::min<int64_t>(pr.len[b], p + 1));
        lo = std::min<int64_t>(lo, pr.window ? std::max<int64_t>(0, p - pr.window + 1) : 0);
      }
      hi = std::min<int64_t>(hi, pr.W * pr.PS);
      lo = std::min(lo, hi);
      spans.push_back({lo, hi});
      work += K * (t1 - t0) * G * (hi - lo) * H;
    }
  // A short context's attention costs less than waking a pool thread (as kernels/encoder_attention.cc).
  const int64_t workers = work < (1 << 18) ? 1 : std::max<int64_t>(1, threads);
  const int64_t blocks_total = int64_t(spans.size()) * K;
  int64_t offset = 0;
  for (int64_t i = 0, b = 0; b < B; ++b)
    for (int64_t t0 = 0; t0 < T; t0 += qb, ++i) {
      const int64_t t1 = std::min(T, t0 + qb), lo = spans[i][0], hi = spans[i][1], R = (t1 - t0) * G;
      // Few blocks (decode, a short verify): split each block's keys so every worker has several tasks.
      int64_t splits = 1;
      if (workers > 1 && blocks_total < 8 * workers)
        splits = std::clamp<int64_t>((8 * workers + blocks_total - 1) / blocks_total, 1,
                                     std::max<int64_t>(1, (hi - lo) / kMinSplitKeys));
      const int64_t step = ((hi - lo + splits - 1) / std::max<int64_t>(1, splits) + kTile - 1) / kTile * kTile;
      for (int64_t kh = 0; kh < K; ++kh) {
        Group g{b, kh, t0, t1, int64_t(tasks.size()), 0};
        for (int64_t k0 = lo; k0 < hi || g.count == 0; k0 += std::max<int64_t>(step, 1)) {
          tasks.push_back({b, kh, t0, t1, k0, std::min(hi, k0 + std::max<int64_t>(step, 1)),
                           int64_t(groups.size()), offset});
          offset += R * (H + 2);
          ++g.count;
          if (hi <= lo) break;
        }
        groups.push_back(g);
      }
    }
  std::vector<float> state(offset);
  // Heaviest first, so the last tasks claimed are short ones (a causal chunk's late blocks see the most keys).
  std::vector<int64_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    const Task &a = tasks[x], &c = tasks[y];
    return (a.k1 - a.k0) * (a.t1 - a.t0) > (c.k1 - c.k0) * (c.t1 - c.t0);
  });
  corejax::parallel_for(pool, int64_t(tasks.size()), workers, [&](int64_t i) {
    thread_local Scratch sc;
    const Task& t = tasks[order[i]];
    const int64_t R = (t.t1 - t.t0) * G;
    float* acc = &state[t.offset];
    AttendRange(pr, t.b, t.kh, t.t0, t.t1, t.k0, t.k1, acc, acc + R * H, acc + R * H + R, sc);
  });
  // Merge each group's partial softmaxes and write [B, T, N, H].
  corejax::parallel_for(pool, int64_t(groups.size()), tasks.size() > groups.size() ? 1 : workers, [&](int64_t gi) {
    const Group& g = groups[gi];
    const int64_t R = (g.t1 - g.t0) * G;
    for (int64_t r = 0; r < R; ++r) {
      float mx = kNegInf;
      for (int64_t i = 0; i < g.count; ++i) {
        const Task& t = tasks[g.first + i];
        mx = std::max(mx, state[t.offset + R * H + r]);
      }
      const int64_t tt = g.t0 + r / G, gg = r % G;
      float* dst = out + ((g.b * T + tt) * pr.N + g.kh * G + gg) * H;
      if (mx == kNegInf) {
        std::fill(dst, dst + H, 0.f);
        continue;
      }
      float total = 0.f;
      std::fill(dst, dst + H, 0.f);
      for (int64_t i = 0; i < g.count; ++i) {
        const Task& t = tasks[g.first + i];
        const float* base = &state[t.offset];
        const float mi = base[R * H + r];
        if (mi == kNegInf) continue;
        const float w = std::exp(mi - mx);
        total += w * base[R * H + R + r];
        for (int64_t h = 0; h < H; ++h) dst[h] += w * base[r * H + h];
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t h = 0; h < H; ++h) dst[h] *= inv;
    }
  });
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                              ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> lengths,
                              ffi::Buffer<ffi::S32> q_positions, ffi::Buffer<ffi::S32> layer_window,
                              ffi::ResultBuffer<ffi::F32> out, float scale, float softcap, int32_t threads) {
  if (layer_window.element_count() != 2)
    return ffi::Error::InvalidArgument("corejax_paged_attention: layer_window must be [layer, window]");
  const int64_t layer = layer_window.typed_data()[0], window = layer_window.typed_data()[1];
  auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || td.size() != 2 || kd[4] != qd[3] || qd[2] % kd[1] != 0 ||
      td[0] != qd[0] || layer < 0 || layer >= kd[0] || window < 0 ||
      v_pages.element_type() != k_pages.element_type() || v_pages.size_bytes() != k_pages.size_bytes() ||
      lengths.element_count() != qd[0] || q_positions.element_count() != qd[0] * qd[1])
    return ffi::Error::InvalidArgument("corejax_paged_attention: bad operand shapes");
  const auto type = k_pages.element_type();
  auto run = [&](auto tag) {
    using KV = decltype(tag);
    Problem<KV> pr;
    pr.B = qd[0], pr.T = qd[1], pr.N = qd[2], pr.H = qd[3];
    pr.K = kd[1], pr.P = kd[2], pr.PS = kd[3], pr.W = td[1], pr.G = pr.N / pr.K;
    if (pr.PS > 0 && (pr.PS & (pr.PS - 1)) == 0) pr.ps_shift = __builtin_ctzll(uint64_t(pr.PS));
    const int64_t per_layer = pr.K * pr.P * pr.PS * pr.H;
    pr.q = q.typed_data();
    pr.k = static_cast<const KV*>(k_pages.untyped_data()) + layer * per_layer;
    pr.v = static_cast<const KV*>(v_pages.untyped_data()) + layer * per_layer;
    pr.table = page_table.typed_data();
    pr.len = lengths.typed_data();
    pr.pos = q_positions.typed_data();
    pr.window = window;
    pr.scale = scale;
    pr.softcap = softcap;
    Run(pool, pr, out->typed_data(), threads);
  };
  if (type == ffi::DataType::F32)
    run(float{});
  else if (type == ffi::DataType::BF16 || type == ffi::DataType::U16)
    run(Bf16{});
  else
    return ffi::Error::InvalidArgument(
        "corejax_paged_attention: KV pages must be float32 or bfloat16 (or its bits as uint16)");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CorejaxPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int32_t>("threads"));
