// parallel_for over XLA's own intra-op thread pool, for the native kernels' FFI handlers.
//
// Why XLA's pool and not threads of our own: on a 2-core machine, threads started per call cost too much at
// dozens of calls per decode step, and helper threads kept between calls had to spin to wake fast, fighting
// XLA's pool for the same two cores (some runs fell to a fraction of the speed; docs/MEASUREMENTS.md). The
// pool XLA hands a handler (ffi::Ctx<ffi::ThreadPool>) is the one that runs XLA's own kernels: its threads are
// already awake while a program runs, and there are no more of them than cores.
//
// Deadlock-free by construction: the n chunks are claimed from an atomic counter by the calling thread and by
// every helper task, so the caller never waits for a task that has not started; it waits only for chunks
// another thread has claimed and is running. A helper that starts late finds nothing left and returns. The
// shared state is reference-counted, so a late helper never touches freed memory.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace corejax {

// No helper threads: the kernels' plain entry points (tests load each ISA's build with ctypes, no XLA) run serially.
struct SerialPool {
  int64_t num_threads() const { return 0; }
  template <typename T>
  void Schedule(T&&) {}
};

template <typename Pool, typename F>
void parallel_for(Pool& pool, int64_t n, int64_t max_workers, const F& f) {
  if (n <= 0) return;
  // The caller plus pool threads, never more than the cores: XLA's pool has one thread per core and the
  // calling thread is a further one, so n + 1 workers would time-share a core.
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t workers = std::min<int64_t>({n, max_workers, pool.num_threads() + 1, cores});
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n;
    const F* f;  // valid until done == n: the caller returns only then, and f runs only on a claimed chunk
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->f = &f;
  auto work = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.n;) {
      (*s.f)(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < workers; ++t) pool.Schedule([state, work] { work(*state); });
  work(*state);
  // Every chunk is claimed; wait for those still running elsewhere (at most workers - 1, each one chunk).
  for (int spins = 0; state->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins > 64) std::this_thread::yield();
  }
}

}  // namespace corejax
