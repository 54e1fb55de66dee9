// Shared helpers for the CPU kernels: half-precision conversions and a
// parallel-for over independent work items.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace spdnn::cpu {

// bfloat16 and float16 are stored as raw 16-bit words; the kernels convert to
// float on load and round to nearest even on store.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }
inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(f16 v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}

template <typename T> inline T from_float(float v);
template <typename T> inline T from_float(double v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline double from_float<double>(double v) { return v; }
template <> inline float from_float<float>(double v) { return static_cast<float>(v); }
template <> inline bf16 from_float<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
template <> inline f16 from_float<f16>(float v) {
  // The compiler's _Float16 conversion rounds to nearest even and handles
  // subnormals, overflow and NaN.
  _Float16 h = static_cast<_Float16>(v);
  f16 out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}

inline int num_threads() {
  static const int n = [] {
    unsigned hw = std::thread::hardware_concurrency();
    return static_cast<int>(hw == 0 ? 1 : std::min(hw, 256u));
  }();
  return n;
}

// Runs fn(item) for item in [0, n_items) on up to num_threads() threads.
// Items are handed out dynamically so uneven items balance.
template <typename Fn>
void parallel_for(int64_t n_items, Fn&& fn) {
  if (n_items <= 0) return;
  int nt = static_cast<int>(std::min<int64_t>(num_threads(), n_items));
  if (nt <= 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) fn(i);
  };
  std::vector<std::thread> threads;
  threads.reserve(nt - 1);
  for (int t = 1; t < nt; ++t) threads.emplace_back(worker);
  worker();
  for (auto& th : threads) th.join();
}

}  // namespace spdnn::cpu
