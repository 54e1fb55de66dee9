// Shared device helpers for the CUDA kernels: typed loads/stores with float
// accumulation for half-precision storage, and launch-error checking.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace spdnn::cuda {

template <typename A> __device__ __forceinline__ A load_acc(const float* p) { return __ldg(p); }
template <typename A> __device__ __forceinline__ A load_acc(const double* p) { return __ldg(p); }
template <typename A> __device__ __forceinline__ A load_acc(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <typename A> __device__ __forceinline__ A load_acc(const __half* p) {
  return __half2float(*p);
}

// Stores v rounded to the storage type and returns the stored value.
__device__ __forceinline__ float store_from(float* p, float v) { *p = v; return v; }
__device__ __forceinline__ double store_from(double* p, double v) { *p = v; return v; }
__device__ __forceinline__ float store_from(__nv_bfloat16* p, float v) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  *p = h;
  return __bfloat162float(h);
}
__device__ __forceinline__ float store_from(__half* p, float v) {
  const __half h = __float2half_rn(v);
  *p = h;
  return __half2float(h);
}

// 16-byte vector of the accumulation type, for wide shared-memory loads.
template <typename A> struct Vec16;
template <> struct Vec16<float> {
  using type = float4;
  static constexpr int n = 4;
  __device__ __forceinline__ static float get(const float4& v, int k) {
    return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
  }
  __device__ __forceinline__ static float4 make(const float* e) {
    return make_float4(e[0], e[1], e[2], e[3]);
  }
};
template <> struct Vec16<double> {
  using type = double2;
  static constexpr int n = 2;
  __device__ __forceinline__ static double get(const double2& v, int k) {
    return k == 0 ? v.x : v.y;
  }
  __device__ __forceinline__ static double2 make(const double* e) { return make_double2(e[0], e[1]); }
};

// cp.async (sm_80+): copies global -> shared without holding registers, so a block
// can have its next stage's whole footprint in flight while it computes.
// Copies one B-byte element (B = 4 or 8); valid = false zero-fills dst without reading src.
template <int B = 4>
__device__ __forceinline__ void cp_async_elem(void* dst, const void* src, bool valid) {
  static_assert(B == 4 || B == 8, "cp.async copies 4, 8 or 16 bytes");
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? B : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(B),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  cp_async_elem<4>(dst, src, valid);
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// With SPDNN_HOST_TIMING set, prints on destruction the host time since construction
// (a handler's enqueueing of `layers` layers; profiling aid).
struct HostTiming {
  const char* what;
  int64_t layers;
  bool on = std::getenv("SPDNN_HOST_TIMING") != nullptr;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  ~HostTiming() {
    if (!on) return;
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "%s: enqueued %lld layers in %.1f us on the host\n", what,
                 static_cast<long long>(layers), us);
  }
};

inline xla::ffi::Error last_launch_error(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return xla::ffi::Error::Internal(std::string(what) + ": CUDA error: " + cudaGetErrorString(err));
  }
  return xla::ffi::Error::Success();
}

}  // namespace spdnn::cuda
