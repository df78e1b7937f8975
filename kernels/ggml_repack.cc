// GGUF blocks (Q4_0, Q4_1, Q8_0) straight into the quantized matmul's column-group layout, at load time.
//
// Why it exists: the NumPy path (corejax/loading/ggml_quants.py unpacks every code to a byte, then
// corejax/weights/quant.py regroups them with transposes) made loading a 1.1B Q4_0 file take ~5 s and held
// a byte per 4-bit code while doing it; one pass here reads each block once and writes each output byte once.
// The result is byte-identical to quant.from_blocks on the unpacked codes (tests/test_quant.py checks).
//
// Layout written (corejax/weights/quant.py's docstring): for rows grouped by 16 (g = row / 16, c = row % 16),
//   4-bit codes [G, d_in / 8, 16, 4]: byte (g, s, c, j) = u[8s + j] | u[8s + 4 + j] << 4
//   8-bit codes [G, d_in / 4, 16, 4]: byte (g, s, c, j) = u[4s + j]
//   scales, mins [G, d_in / 32, 16] float16 bits (mins = -m of Q4_1's additive m: the sign bit flipped)
// where u = code + offset, code being ggml's signed value (Q4_0: nibble - 8; Q8_0: the int8; Q4_1: the
// nibble). Rows past the last real one (d_out padded to 16) are zeros. Plain C entry points, called through
// ctypes (corejax/loading/repack.py), no XLA.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

enum Format : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };  // ggml's type ids

int64_t BlockBytes(int32_t fmt) { return fmt == kQ4_0 ? 18 : fmt == kQ4_1 ? 20 : fmt == kQ8_0 ? 34 : 0; }
int64_t CodeOffset(int32_t fmt) { return fmt == kQ4_0 ? 2 : fmt == kQ4_1 ? 4 : 2; }

// Element e (0..31) of a block's codes, as ggml's signed value.
inline int32_t Code(int32_t fmt, const uint8_t* qs, int e) {
  if (fmt == kQ8_0) return int8_t(qs[e]);
  const int32_t nib = e < 16 ? qs[e] & 15 : qs[e - 16] >> 4;
  return fmt == kQ4_0 ? nib - 8 : nib;
}

// f(begin, end) over [0, n) split into one contiguous range per core (at least `grain` items each).
template <typename F>
void ForRanges(int64_t n, int64_t grain, const F& f) {
  const int64_t threads = std::clamp<int64_t>(n / std::max<int64_t>(grain, 1), 1,
                                              std::max(1u, std::thread::hardware_concurrency()));
  if (threads <= 1) {
    f(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) pool.emplace_back([&, t] { f(t * n / threads, (t + 1) * n / threads); });
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

// lo_hi[0], lo_hi[1] = the smallest and largest code of a [rows, d_in] tensor's blocks. Returns 0, or -1 for a
// format this file does not handle.
int corejax_ggml_code_range(int32_t fmt, const uint8_t* raw, int64_t rows, int64_t d_in, int32_t* lo_hi) {
  const int64_t bb = BlockBytes(fmt), off = CodeOffset(fmt);
  if (!bb || d_in % 32) return -1;
  const int64_t blocks = rows * (d_in / 32);
  // Byte-wise minima and maxima (nibbles, or int8 shifted to unsigned), 16 bytes per vector op, one range of
  // blocks per thread.
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  std::vector<uint8_t> mn(cores, 255), mx(cores, 0);
  std::atomic<int64_t> slot{0};
  ForRanges(blocks, 4096, [&](int64_t begin, int64_t end) {
    typedef uint8_t v16u8 __attribute__((vector_size(16)));
    v16u8 vlo, vhi;
    for (int i = 0; i < 16; ++i) vlo[i] = 255, vhi[i] = 0;
    auto update = [&](v16u8 x) {
      vlo = x < vlo ? x : vlo;
      vhi = x > vhi ? x : vhi;
    };
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* qs = raw + i * bb + off;
      v16u8 x;
      std::memcpy(&x, qs, 16);
      if (fmt == kQ8_0) {
        v16u8 y;
        std::memcpy(&y, qs + 16, 16);
        update(x ^ 0x80);
        update(y ^ 0x80);
      } else {
        update(x & 15);
        update(x >> 4);
      }
    }
    uint8_t lo = 255, hi = 0;
    for (int i = 0; i < 16; ++i) lo = std::min(lo, vlo[i]), hi = std::max(hi, vhi[i]);
    const int64_t p = slot.fetch_add(1);
    mn[p] = lo, mx[p] = hi;
  });
  const int64_t parts = slot.load();
  int32_t lo = 255, hi = 0;
  for (int64_t p = 0; p < parts; ++p) lo = std::min<int32_t>(lo, mn[p]), hi = std::max<int32_t>(hi, mx[p]);
  const int32_t shift = fmt == kQ8_0 ? 128 : fmt == kQ4_0 ? 8 : 0;  // back to ggml's signed codes
  lo_hi[0] = lo - shift, lo_hi[1] = hi - shift;
  return 0;
}

// Writes codes (bits 4 or 8), scales and, for Q4_1, mins in the layout above. raw: [rows, d_in / 32 blocks];
// groups = ceil(rows / 16). Returns 0, or -1 for a format/bits pair this file does not handle.
int corejax_ggml_repack(int32_t fmt, const uint8_t* raw, int64_t rows, int64_t d_in, int32_t offset, int32_t bits,
                        uint8_t* codes, uint16_t* scales, uint16_t* mins) {
  const int64_t bb = BlockBytes(fmt), off = CodeOffset(fmt), nb = d_in / 32, groups = (rows + 15) / 16;
  if (!bb || d_in % 32 || (bits != 4 && bits != 8) || (fmt == kQ4_1) != (mins != nullptr)) return -1;
  const int64_t group_bytes = 16 * d_in * bits / 8;
  // The usual cases: u is the stored nibble (Q4_0 with offset 8, Q4_1 with 0) or the int8 plus 128 (Q8_0).
  const bool fast4 = bits == 4 && offset == (fmt == kQ4_0 ? 8 : 0);
  const bool fast8 = bits == 8 && fmt == kQ8_0 && offset == 128;
  auto group = [&](int64_t g) {
    uint8_t* cg = codes + g * group_bytes;
    uint16_t* sg = scales + g * nb * 16;
    uint16_t* mg = mins ? mins + g * nb * 16 : nullptr;
    std::memset(cg, 0, group_bytes);
    std::memset(sg, 0, nb * 16 * 2);
    if (mg) std::memset(mg, 0, nb * 16 * 2);
    for (int64_t c = 0; c < 16; ++c) {
      const int64_t row = g * 16 + c;
      if (row >= rows) break;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = raw + (row * nb + b) * bb;
        const uint8_t* qs = blk + off;
        std::memcpy(&sg[b * 16 + c], blk, 2);
        if (mg) {
          uint16_t m;
          std::memcpy(&m, blk + 2, 2);
          mg[b * 16 + c] = m ^ 0x8000;
        }
        if (fast4) {
          // u = the nibble itself: the four 8-input chunks are masks and shifts of the block's four words
          // (qs[0..3] holds elements 0-3 and 16-19, qs[4..7] 4-7 and 20-23, ...).
          uint32_t w[4], o[4];
          std::memcpy(w, qs, 16);
          const uint32_t lo = 0x0F0F0F0Fu, hi = 0xF0F0F0F0u;
          o[0] = (w[0] & lo) | ((w[1] & lo) << 4);
          o[1] = (w[2] & lo) | ((w[3] & lo) << 4);
          o[2] = ((w[0] >> 4) & lo) | (w[1] & hi);
          o[3] = ((w[2] >> 4) & lo) | (w[3] & hi);
          for (int t = 0; t < 4; ++t) std::memcpy(cg + ((b * 4 + t) * 16 + c) * 4, &o[t], 4);
        } else if (fast8) {
          for (int t = 0; t < 8; ++t) {  // u = code + 128: the int8's sign bit flipped, four at a time
            uint32_t x;
            std::memcpy(&x, qs + 4 * t, 4);
            x ^= 0x80808080u;
            std::memcpy(cg + ((b * 8 + t) * 16 + c) * 4, &x, 4);
          }
        } else if (bits == 4) {
          for (int t = 0; t < 4; ++t) {  // chunks s = 4b + t of 8 inputs
            uint8_t* dst = cg + ((b * 4 + t) * 16 + c) * 4;
            for (int j = 0; j < 4; ++j)
              dst[j] = uint8_t((Code(fmt, qs, 8 * t + j) + offset) | ((Code(fmt, qs, 8 * t + 4 + j) + offset) << 4));
          }
        } else {
          for (int t = 0; t < 8; ++t) {  // chunks s = 8b + t of 4 inputs
            uint8_t* dst = cg + ((b * 8 + t) * 16 + c) * 4;
            for (int j = 0; j < 4; ++j) dst[j] = uint8_t(Code(fmt, qs, 4 * t + j) + offset);
          }
        }
      }
    }
  };
  ForRanges(groups, 64, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) group(g);
  });
  return 0;
}

}  // extern "C"
