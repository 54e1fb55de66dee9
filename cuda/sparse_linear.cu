// XLA FFI handlers of sparse_linear on CUDA: validate the buffers and launch, on XLA's
// stream, the fused layer kernel (cuda/fused_layer.cuh) or the stationary-rows kernel below.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/fused_layer.cuh"

namespace ffi = xla::ffi;

namespace spdnn::cuda {
namespace {

template <typename T, typename A>
ffi::Error dispatch(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                    ffi::AnyBuffer bias, const int32_t* slice_ptr, const int32_t* indices,
                    ffi::Result<ffi::AnyBuffer> y, int64_t rows, int n_in, int n_out, bool relu,
                    double clip) {
  constexpr ffi::DataType acc = sizeof(A) == 8 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (values.element_type() != acc || bias.element_type() != acc) {
    return ffi::Error::InvalidArgument(
        "sparse_linear: values and bias must have the accumulation dtype of x");
  }
  LayerArgs<T, A> args{};
  args.x = reinterpret_cast<const T*>(x.untyped_data());
  args.values = reinterpret_cast<const A*>(values.untyped_data());
  args.bias = reinterpret_cast<const A*>(bias.untyped_data());
  args.slice_ptr = slice_ptr;
  args.indices = indices;
  args.y = reinterpret_cast<T*>(y->untyped_data());
  args.rows = rows;
  args.n_in = n_in;
  args.n_out = n_out;
  args.relu = relu;
  args.clip = static_cast<A>(clip);
  return launch_layer<T, A>(stream, args);
}

ffi::Error sparse_linear_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                              ffi::AnyBuffer bias, ffi::Buffer<ffi::S32> slice_ptr,
                              ffi::Buffer<ffi::S32> indices, ffi::Result<ffi::AnyBuffer> y,
                              int32_t activation, double clip) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() < 1 || yd.size() != xd.size()) {
    return ffi::Error::InvalidArgument("sparse_linear: x and y must have the same rank >= 1");
  }
  const int64_t n_in = xd.back();
  const int64_t n_out = yd.back();
  if (n_in > 0x7fffffff || n_out > 0x7fffffff) {
    return ffi::Error::InvalidArgument("sparse_linear: n_in and n_out must be below 2^31");
  }
  const int64_t rows = n_out > 0 ? static_cast<int64_t>(y->element_count()) / n_out : 0;
  const int64_t n_slices = (n_out + kSlice - 1) / kSlice;
  if (slice_ptr.element_count() != static_cast<size_t>(n_slices + 1) ||
      bias.element_count() != static_cast<size_t>(n_out) ||
      values.element_count() != indices.element_count() ||
      indices.element_count() % kSlice != 0) {
    return ffi::Error::InvalidArgument(
        "sparse_linear: inconsistent sizes of slice_ptr/bias/values/indices for the ELL layout");
  }
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("sparse_linear: x and y must have the same dtype");
  }
  if (rows == 0 || n_out == 0) return ffi::Error::Success();
  const bool relu = activation == 1;
  const int32_t* ip = slice_ptr.typed_data();
  const int32_t* ix = indices.typed_data();
  const int ni = static_cast<int>(n_in), no = static_cast<int>(n_out);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return dispatch<float, float>(stream, x, values, bias, ip, ix, y, rows, ni, no, relu, clip);
    case ffi::DataType::F64:
      return dispatch<double, double>(stream, x, values, bias, ip, ix, y, rows, ni, no, relu, clip);
    case ffi::DataType::BF16:
      return dispatch<__nv_bfloat16, float>(stream, x, values, bias, ip, ix, y, rows, ni, no, relu,
                                            clip);
    case ffi::DataType::F16:
      return dispatch<__half, float>(stream, x, values, bias, ip, ix, y, rows, ni, no, relu, clip);
    default:
      return ffi::Error::InvalidArgument("sparse_linear: unsupported feature dtype");
  }
}

// -- the stationary-rows kernel ----------------------------------------------------------
//
// One block per tile of R feature rows: the whole rows sit in shared memory (input i of
// row r at word i * R + r, R odd so that a row's word has the bank of its input), and
// every warp walks slices of 32 outputs, one output per lane, R sums in registers.  Per
// step a lane loads nothing from global memory but its weight (value and 16-bit index,
// four steps per 16- and 8-byte load, reused by the R rows); the gathers are shared-memory
// loads whose bank conflicts the host schedule (StationaryPack) keeps low.  Every feature
// row is read from DRAM once and every output written once: the layer kernel instead
// stages whole rows once per 1024 outputs, which costs most where a layer's outputs share
// few inputs (random patterns).

constexpr int kStatThreads = 1024;
constexpr int kStatSlice = 32;

template <typename T>
struct StationaryArgs {
  const T* x;               // [rows, n_in]
  const float4* values;     // [total / 4]: slot (g * 32 + lane) * 4 + step % 4
  const uint2* indices;     // [total / 4]: four 16-bit indices per lane and group
  const int32_t* group_ptr; // [n_slices + 1]
  const float* bias;        // [n_out]
  T* y;                     // [rows, n_out]
  int64_t rows;
  int n_in, n_out, n_slices;
  bool relu;
  float clip;
};

template <int R>
__device__ __forceinline__ void stationary_step(float (&acc)[R], const float* xs, unsigned i,
                                                float v) {
  const float* p = xs + i * R;
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = fmaf(v, p[r], acc[r]);
}

template <typename T, int R>
__global__ void __launch_bounds__(kStatThreads, 1) stationary_kernel(const StationaryArgs<T> a) {
  extern __shared__ __align__(16) float xs[];  // [(n_in + 1) * R]
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(R), a.rows - row0));
  const int n_in = a.n_in;
  // Stage the tile, rows past the batch as zeros; coalesced reads of each row, strided
  // stores (conflict-free with the odd stride).  float32: cp.async, every copy in flight at
  // once.  Half-precision storage: eight loads in flight per thread, widened to float32.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool valid = r < nrows;
    const T* src = a.x + (valid ? (row0 + r) * static_cast<int64_t>(n_in) : 0);
    if constexpr (std::is_same_v<T, float>) {
      for (int c = threadIdx.x; c < n_in; c += blockDim.x) {
        cp_async4(xs + c * R + r, src + c, valid);
      }
    } else {
      constexpr int kBatch = 8;
      for (int c0 = threadIdx.x; c0 < n_in; c0 += kBatch * blockDim.x) {
        float v[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const int c = c0 + k * blockDim.x;
          v[k] = valid && c < n_in ? load_acc<float>(src + c) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const int c = c0 + k * blockDim.x;
          if (c < n_in) xs[c * R + r] = v[k];
        }
      }
    }
  }
  cp_async_commit();
  if (threadIdx.x < R) xs[n_in * R + threadIdx.x] = 0.0f;  // the padding column
  cp_async_wait_all();
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int n_warps = blockDim.x >> 5;
  for (int s = threadIdx.x >> 5; s < a.n_slices; s += n_warps) {
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    const int g0 = __ldg(a.group_ptr + s), g1 = __ldg(a.group_ptr + s + 1);
    const float4* vp = a.values + static_cast<int64_t>(g0) * kStatSlice + lane;
    const uint2* ip = a.indices + static_cast<int64_t>(g0) * kStatSlice + lane;
    if (g0 < g1) {
      float4 v = __ldg(vp);
      uint2 i = __ldg(ip);
      for (int g = g0 + 1; g <= g1; ++g) {
        // Prefetch the next group (the slice's last prefetch reads its own first group
        // again: in bounds, and cached).
        vp += kStatSlice;
        ip += kStatSlice;
        const bool more = g < g1;
        const float4 vn = __ldg(more ? vp : vp - kStatSlice);
        const uint2 in = __ldg(more ? ip : ip - kStatSlice);
        stationary_step<R>(acc, xs, i.x & 0xffffu, v.x);
        stationary_step<R>(acc, xs, i.x >> 16, v.y);
        stationary_step<R>(acc, xs, i.y & 0xffffu, v.z);
        stationary_step<R>(acc, xs, i.y >> 16, v.w);
        v = vn;
        i = in;
      }
    }
    const int o = s * kStatSlice + lane;
    if (o < a.n_out) {
      const float b = __ldg(a.bias + o);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          float out = acc[r] + b;
          if (a.relu && out < 0.0f) out = 0.0f;  // comparisons keep NaN, like jnp.maximum
          if (out > a.clip) out = a.clip;
          store_from(a.y + (row0 + r) * static_cast<int64_t>(a.n_out) + o, out);
        }
      }
    }
  }
}

// The rows per tile the stationary kernel is built for (odd, so a row's word has its
// input's bank).
constexpr int kStatRows[] = {1, 3, 5, 7, 9, 11, 13, 15};

template <typename T, int R>
ffi::Error launch_stationary_r(cudaStream_t stream, const StationaryArgs<T>& a, size_t smem) {
  auto kernel = stationary_kernel<T, R>;
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (err != cudaSuccess) {
      return ffi::Error::Internal(std::string("sparse_linear stationary: cudaFuncSetAttribute: ") +
                                  cudaGetErrorString(err));
    }
  }
  const int64_t blocks = (a.rows + R - 1) / R;
  if (blocks > 0x7fffffff) {
    return ffi::Error::InvalidArgument("sparse_linear stationary: batch too large for one launch");
  }
  // 512 threads up to 8192 inputs, 1024 beyond (one block per SM there: more warps to
  // hide its latencies).  H100, random layers, batch 60000: 4096 inputs 3.20 ms against
  // 3.38, 1024 inputs 0.83 against 0.89, 16384 inputs 15.6 against 20.2
  // (benchmarks/RESULTS.md).  SPDNN_STAT_THREADS (read per call) forces one, for tuning.
  int threads = a.n_in > 8192 ? kStatThreads : 512;
  if (const char* env = std::getenv("SPDNN_STAT_THREADS")) {
    threads = std::atoi(env) == 512 ? 512 : kStatThreads;
  }
  threads = std::min(threads, a.n_slices * kStatSlice);
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(a);
  return last_launch_error("sparse_linear stationary");
}

// Largest tile (rows) whose shared memory fits the device's per-block limit, capped by
// SPDNN_STAT_ROWS (read per call; for tuning); 0 when not even one row fits.
int stationary_rows(int n_in) {
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  int cap = 1 << 30;
  if (const char* env = std::getenv("SPDNN_STAT_ROWS")) cap = std::max(1, std::atoi(env));
  int best = 0;
  for (int r : kStatRows) {
    if (r <= cap && static_cast<int64_t>(n_in + 1) * r * 4 <= optin) best = r;
  }
  return best;
}

template <typename T>
ffi::Error launch_stationary(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> values,
                             ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> group_ptr,
                             ffi::Buffer<ffi::U16> indices, ffi::Result<ffi::AnyBuffer> y,
                             int64_t rows, int n_in, int n_out, int n_slices, int r, bool relu,
                             double clip) {
  StationaryArgs<T> a{};
  a.x = reinterpret_cast<const T*>(x.untyped_data());
  a.values = reinterpret_cast<const float4*>(values.typed_data());
  a.indices = reinterpret_cast<const uint2*>(indices.typed_data());
  a.group_ptr = group_ptr.typed_data();
  a.bias = bias.typed_data();
  a.y = reinterpret_cast<T*>(y->untyped_data());
  a.rows = rows;
  a.n_in = n_in;
  a.n_out = n_out;
  a.n_slices = n_slices;
  a.relu = relu;
  a.clip = static_cast<float>(clip);
  const size_t smem = static_cast<size_t>(n_in + 1) * r * sizeof(float);
  switch (r) {
    case 1: return launch_stationary_r<T, 1>(stream, a, smem);
    case 3: return launch_stationary_r<T, 3>(stream, a, smem);
    case 5: return launch_stationary_r<T, 5>(stream, a, smem);
    case 7: return launch_stationary_r<T, 7>(stream, a, smem);
    case 9: return launch_stationary_r<T, 9>(stream, a, smem);
    case 11: return launch_stationary_r<T, 11>(stream, a, smem);
    case 13: return launch_stationary_r<T, 13>(stream, a, smem);
    default: return launch_stationary_r<T, 15>(stream, a, smem);
  }
}

ffi::Error sparse_linear_stationary_impl(cudaStream_t stream, ffi::AnyBuffer x,
                                         ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::F32> bias,
                                         ffi::Buffer<ffi::S32> group_ptr,
                                         ffi::Buffer<ffi::U16> indices,
                                         ffi::Result<ffi::AnyBuffer> y, int32_t activation,
                                         double clip) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() < 1 || yd.size() != xd.size()) {
    return ffi::Error::InvalidArgument("sparse_linear: x and y must have the same rank >= 1");
  }
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("sparse_linear: x and y must have the same dtype");
  }
  const int64_t n_in = xd.back();
  const int64_t n_out = yd.back();
  if (n_in >= 0xffff || n_out > 0x7fffffff) {
    return ffi::Error::InvalidArgument(
        "sparse_linear stationary: n_in must be below 65535 (16-bit indices)");
  }
  const int64_t rows = n_out > 0 ? static_cast<int64_t>(y->element_count()) / n_out : 0;
  const int64_t n_slices = (n_out + kStatSlice - 1) / kStatSlice;
  if (group_ptr.element_count() != static_cast<size_t>(n_slices + 1) ||
      bias.element_count() != static_cast<size_t>(n_out) ||
      values.element_count() != indices.element_count() ||
      indices.element_count() % (4 * kStatSlice) != 0) {
    return ffi::Error::InvalidArgument(
        "sparse_linear stationary: inconsistent sizes of group_ptr/bias/values/indices");
  }
  if (rows == 0 || n_out == 0) return ffi::Error::Success();
  const int r = stationary_rows(static_cast<int>(n_in));
  if (r == 0) {
    return ffi::Error::InvalidArgument(
        "sparse_linear stationary: one feature row of n_in = " + std::to_string(n_in) +
        " does not fit the device's shared memory");
  }
  const int ni = static_cast<int>(n_in), no = static_cast<int>(n_out);
  const int ns = static_cast<int>(n_slices);
  const bool relu = activation == 1;
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return launch_stationary<float>(stream, x, values, bias, group_ptr, indices, y, rows, ni,
                                      no, ns, r, relu, clip);
    case ffi::DataType::BF16:
      return launch_stationary<__nv_bfloat16>(stream, x, values, bias, group_ptr, indices, y,
                                              rows, ni, no, ns, r, relu, clip);
    case ffi::DataType::F16:
      return launch_stationary<__half>(stream, x, values, bias, group_ptr, indices, y, rows, ni,
                                       no, ns, r, relu, clip);
    default:
      return ffi::Error::InvalidArgument(
          "sparse_linear stationary: features must be float32, bfloat16 or float16");
  }
}

}  // namespace
}  // namespace spdnn::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseLinearCuda, spdnn::cuda::sparse_linear_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [..., n_in]
                                  .Arg<ffi::AnyBuffer>()         // values [total] (f32 | f64), ELL order
                                  .Arg<ffi::AnyBuffer>()         // bias [n_out]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slice_ptr [n_slices + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [total], sliced ELL
                                  .Ret<ffi::AnyBuffer>()         // y [..., n_out]
                                  .Attr<int32_t>("activation")   // 0 none, 1 relu
                                  .Attr<double>("clip"));        // +inf for no clip

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseLinearStationaryCuda,
                              spdnn::cuda::sparse_linear_stationary_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [..., n_in] (f32|bf16|f16)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values [total], stationary order
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [n_out]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // group_ptr [n_slices + 1]
                                  .Arg<ffi::Buffer<ffi::U16>>()  // indices [total]
                                  .Ret<ffi::AnyBuffer>()         // y [..., n_out], x's dtype
                                  .Attr<int32_t>("activation")   // 0 none, 1 relu
                                  .Attr<double>("clip"));        // +inf for no clip
