// parallel_for for the native kernels' FFI handlers: the calling thread and helpers claim chunks of the work.
//
// The helpers (SpinPool) are threads of ours, one per core besides the caller's, that stay awake for a short
// while after each job, so that the next kernel call of a decode step finds them running. XLA's own intra-op
// pool (what the handlers used before) parks its threads between ops, and waking one took 36 us on average on
// a 2-core VM, longer than most of a decode step's calls (13-40 us): the caller did the small ones alone and
// the second core sat idle (docs/MEASUREMENTS.md). Spinning is bounded, because a spinning thread takes a core
// from whatever else wants it (XLA's pool, the host's Python threads; an unbounded spinner of an earlier
// version halved some runs): a helper spins kSpinNs after a short job and not at all after a long one
// (a prefill chunk's, where a wake-up is cheap beside the work), then sleeps on a condition variable.
//
// Deadlock-free by construction: the n chunks are claimed from an atomic counter by the calling thread and by
// every helper, so the caller never waits for a helper that has not started; it waits only for chunks another
// thread has claimed and is running. A helper that comes late finds nothing left. One job at a time: a second
// caller meanwhile (a kernel on another thread) hands its chunks to XLA's pool instead (parallel_for_xla), whose
// shared state is reference-counted, so a late pool task never touches freed memory.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace corejax {

// The machine's cores, read once (std::thread::hardware_concurrency reads /sys on every call: microseconds).
inline int64_t num_cores() {
  static const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return cores;
}

// No helper threads: the kernels' plain entry points (tests load each ISA's build with ctypes, no XLA) run serially.
struct SerialPool {
  int64_t num_threads() const { return 0; }
  template <typename T>
  void Schedule(T&&) {}
};

// The chunks over XLA's pool: the path while the helpers are on another caller's job.
template <typename Pool, typename F>
void parallel_for_xla(Pool& pool, int64_t n, int64_t max_workers, const F& f) {
  if (n <= 0) return;
  // The caller plus pool threads, never more than the cores: XLA's pool has one thread per core and the
  // calling thread is a further one, so n + 1 workers would time-share a core.
  const int64_t workers = std::min<int64_t>({n, max_workers, pool.num_threads() + 1, num_cores()});
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

// The helpers (see the top of this file). A helper spins with pause, yielding its core every 64 rounds, for
// kSpinNs after a job shorter than kShortJobNs; during a step's hundreds of calls it stays awake, between steps
// (host work, an idle server) it sleeps.
class SpinPool {
 public:
  static SpinPool& get() {
    static SpinPool* pool = new SpinPool();  // never destroyed: helpers may still spin at exit
    return *pool;
  }
  int64_t helpers() const { return int64_t(threads_.size()); }

  // Runs fn(ctx, i) for i < n on the caller and up to `extra` helpers; false (nothing run) when busy.
  bool run(int64_t n, int64_t extra, void (*fn)(const void*, int64_t), const void* ctx) {
    if (extra <= 0 || threads_.empty() || busy_.exchange(true, std::memory_order_acquire)) return false;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    n_ = n, fn_ = fn, ctx_ = ctx;
    wanted_.store(std::min<int64_t>(extra, helpers()), std::memory_order_relaxed);
    active_.store(true, std::memory_order_release);  // after the fields above
    epoch_.fetch_add(1, std::memory_order_seq_cst);  // publishes the job
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(mu_); }
      cv_.notify_all();
    }
    const int64_t started = now_ns();
    work();
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) pause(spins);
    // Only short jobs (a decode step's) are worth staying awake for; after a long one (a prefill chunk's) the
    // helpers sleep at once and leave the cores to XLA's own parallel ops, the wake-up being small beside it.
    stay_.store(now_ns() - started < kShortJobNs, std::memory_order_relaxed);
    active_.store(false, std::memory_order_seq_cst);
    for (int spins = 0; inside_.load(std::memory_order_seq_cst) > 0; ++spins) pause(spins);
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  static constexpr int64_t kSpinNs = 30000;
  static constexpr int64_t kShortJobNs = 200000;

  SpinPool() {
    for (int64_t t = 1; t < num_cores(); ++t) {
      try {
        threads_.emplace_back([this] { loop(); });
        threads_.back().detach();
      } catch (const std::system_error&) {  // no more threads allowed (a limit): fewer helpers, or none
        break;
      }
    }
  }

  static void pause(int spins) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
    if ((spins & 63) == 63) std::this_thread::yield();
  }

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
  }

  void work() {
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_;) {
      fn_(ctx_, i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = epoch_.load(std::memory_order_acquire);
    for (;;) {
      int64_t idle_since = now_ns();
      for (int spins = 0; epoch_.load(std::memory_order_acquire) == seen; ++spins) {
        pause(spins);
        if ((spins & 255) == 255 && (!stay_.load(std::memory_order_relaxed) || now_ns() - idle_since > kSpinNs)) {
          std::unique_lock<std::mutex> lock(mu_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lock, [&] { return epoch_.load(std::memory_order_seq_cst) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_relaxed);
          idle_since = now_ns();
        }
      }
      seen = epoch_.load(std::memory_order_acquire);
      inside_.fetch_add(1, std::memory_order_seq_cst);
      // The job may be over already (a fast caller), or want fewer helpers than there are.
      if (active_.load(std::memory_order_seq_cst) && wanted_.fetch_sub(1, std::memory_order_relaxed) > 0) work();
      inside_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::vector<std::thread> threads_;
  // Apart, so that helpers spinning on epoch_ do not pull the line the caller's claims write.
  alignas(64) std::atomic<uint64_t> epoch_{0};
  alignas(64) std::atomic<int64_t> next_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<bool> busy_{false}, active_{false}, stay_{true};
  std::atomic<int64_t> wanted_{0}, inside_{0}, sleeping_{0};
  int64_t n_ = 0;
  void (*fn_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
};

template <typename Pool, typename F>
void parallel_for(Pool& pool, int64_t n, int64_t max_workers, const F& f) {
  if (n <= 0) return;
  // The caller plus helpers, never more than the cores.
  const int64_t workers = std::min<int64_t>({n, max_workers, num_cores()});
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  if (pool.num_threads() > 0 &&
      SpinPool::get().run(n, workers - 1, [](const void* c, int64_t i) { (*static_cast<const F*>(c))(i); }, &f))
    return;
  parallel_for_xla(pool, n, std::min<int64_t>(workers, pool.num_threads() + 1), f);
}

}  // namespace corejax
