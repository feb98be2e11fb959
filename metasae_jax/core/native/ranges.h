// Splitting a loop over [0, n) into contiguous ranges on threads: shared by the kernels.
#ifndef METASAE_JAX_NATIVE_RANGES_H_
#define METASAE_JAX_NATIVE_RANGES_H_

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace metasae {

// Calls fn(begin, end) over contiguous ranges of [0, n) on up to `threads` threads, each with at least
// `min_per_thread` items, cut where the prefix sums `cost` (n + 1 entries, nondecreasing) split evenly;
// cost null = ranges of equal length.
template <typename Fn>
void ForRanges(int64_t n, int64_t threads, int64_t min_per_thread, const int64_t* cost, Fn fn) {
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, n / min_per_thread));
  if (t == 1) {
    fn(0, n);
    return;
  }
  std::vector<int64_t> cut(t + 1, n);
  cut[0] = 0;
  for (int64_t i = 1; i < t; ++i) {
    if (cost == nullptr) {
      cut[i] = n * i / t;
    } else {
      cut[i] = std::lower_bound(cost, cost + n + 1, cost[n] * i / t) - cost;
      cut[i] = std::max(cut[i - 1], std::min(cut[i], n));
    }
  }
  std::vector<std::thread> pool;
  for (int64_t i = 0; i < t; ++i) pool.emplace_back(fn, cut[i], cut[i + 1]);
  for (auto& th : pool) th.join();
}

}  // namespace metasae

#endif  // METASAE_JAX_NATIVE_RANGES_H_
