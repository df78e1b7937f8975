// Whether this process may use AMX tiles: shared by the kernels that have an AMX path (kernels/quant_matmul.cc's
// int8 tiles, kernels/small_matmul.cc's bfloat16 ones).
//
// Linux grants the tile state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); a CPU
// without AMX, a kernel without support, or COREJAX_AMX=0 leaves every kernel on its vector path. Asked once:
// the answer is a function-local static of an inline function, one for the whole library.

#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace corejax {

inline bool amx_granted() {
#if defined(__x86_64__) && defined(SYS_arch_prctl)
  static const bool granted = [] {
    const char* env = std::getenv("COREJAX_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;  // AMX is x86's
#endif
}

}  // namespace corejax
