// Runs kernels/quant_matmul.cc's plain entry point over many formats and row counts with deterministic inputs
// and writes every output float to stdout (binary). tests/test_isa.py builds it for each ISA — for aarch64
// with the cross compiler, run under qemu-user — and compares each path's bytes with the scalar build's.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "quant_matmul.cc"
#include "vecmath.h"

namespace {
uint64_t state = 0x9E3779B97F4A7C15ull;
uint32_t next() {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return uint32_t(state >> 11);
}
float uniform(float lo, float hi) { return lo + (hi - lo) * float(next() % 1000000) / 1e6f; }
}  // namespace

int main() {
  struct Case { int bits, block, offset, max_code; bool mins, f16; int64_t K, N; };
  const Case cases[] = {
      {4, 32, 8, 15, false, true, 256, 48},    // Q4_0
      {4, 32, 0, 15, true, true, 288, 32},     // Q4_1, K = 9 blocks
      {8, 32, 16, 31, false, true, 256, 64},   // Q5_0
      {8, 32, 128, 255, false, true, 512, 32}, // Q8_0: the full byte range (AVX2's saturation case)
      {4, 32, 0, 15, true, false, 256, 32},    // Q4_K (float32 products as scales)
      {8, 16, 32, 63, false, false, 256, 48},  // Q6_K
      {4, 16, 2, 3, true, false, 256, 16},     // Q2_K
      {8, 32, 0, 127, true, true, 256, 32},    // 7-bit codes: AVX2's largest sign-free case, one step a chunk
  };
  const int64_t rows[] = {1, 2, 3, 4, 5, 8, 9, 13, 16, 33, 64};
  for (const Case& c : cases) {
    const int64_t groups = c.N / 16, nb = c.K / c.block;
    std::vector<uint8_t> codes(groups * c.K * 16 * c.bits / 8);
    for (auto& b : codes) {
      if (c.bits == 8) b = uint8_t(next() % (c.max_code + 1));
      else b = uint8_t((next() % (c.max_code + 1)) | (next() % (c.max_code + 1)) << 4);
    }
    std::vector<float> sc32(groups * nb * 16), mn32(groups * nb * 16);
    std::vector<corejax::half_t> sc16(sc32.size()), mn16(mn32.size());
    for (size_t i = 0; i < sc32.size(); ++i) {
      sc32[i] = uniform(1e-3f, 0.05f);
      mn32[i] = uniform(-0.2f, 0.2f);
      sc16[i] = corejax::half_t(sc32[i]);
      mn16[i] = corejax::half_t(mn32[i]);
    }
    const void* scales = c.f16 ? static_cast<const void*>(sc16.data()) : sc32.data();
    const void* mins = !c.mins ? nullptr : c.f16 ? static_cast<const void*>(mn16.data()) : mn32.data();
    for (int64_t M : rows) {
      std::vector<float> x(M * c.K), y(M * c.N);
      for (auto& v : x) v = uniform(-2.f, 2.f);
      for (int64_t k = 0; k < 32 && k < c.K; ++k) x[k] *= 1e-3f;  // a block of tiny values
      if (corejax_quant_matmul_plain(x.data(), M, c.K, codes.data(), scales, mins, c.N, c.bits, c.block,
                                     c.offset, c.f16, c.max_code, y.data()))
        return 2;
      std::fwrite(y.data(), sizeof(float), y.size(), stdout);
    }
  }
  std::fprintf(stderr, "%s\n", corejax_isa());
  return 0;
}
