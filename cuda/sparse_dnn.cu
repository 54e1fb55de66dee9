// CUDA kernels of SparseDNN: a whole network of L square sparse layers in one FFI
// call, Y <- min(relu(Y W_l + b_l), clip), with dead rows dropped on the device.
//
// Per layer the handler enqueues one kernel and never synchronizes with the host:
// the fused layer kernel (cuda/fused_layer.cuh) reads the active rows through a
// list, writes its outputs packed, and builds the next list itself (the block
// that finishes a row tile appends its surviving rows with an atomic counter,
// which is also the layer's active count).  The order of rows within a list
// depends on timing; the results do not, because every row is computed alone
// in a fixed order and finally scattered back to its original position.  The
// layer kernel runs a persistent grid that reads the row count from device
// memory, so no launch depends on host-side knowledge of how many rows survive.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "cuda/common.cuh"
#include "cuda/fused_layer.cuh"

namespace ffi = xla::ffi;

namespace spdnn::cuda {
namespace {

// The first list: rows of x with any nonzero feature (one warp per row); with
// drop off, every row in order and *count = rows.
template <typename T, typename A>
__global__ void list_nonzero_rows(const T* __restrict__ x, int64_t rows, int n, bool drop,
                                  int32_t* __restrict__ src, int32_t* __restrict__ ids,
                                  int32_t* __restrict__ count) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  if (!drop && blockIdx.x == 0 && threadIdx.x == 0) *count = static_cast<int32_t>(rows);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows;
       row += warps) {
    bool nz = false;
    for (int c = lane; c < n; c += 32) nz |= load_acc<A>(x + row * n + c) != A(0);
    const bool any = __any_sync(0xffffffffu, nz);
    if (lane == 0 && (any || !drop)) {
      const int64_t slot = drop ? atomicAdd(count, 1) : row;
      src[slot] = static_cast<int32_t>(row);
      ids[slot] = static_cast<int32_t>(row);
    }
  }
}

// y[ids[k]] = buf[src[k]] for the *count surviving rows.
template <typename T>
__global__ void scatter_rows(const T* __restrict__ buf, const int32_t* __restrict__ src,
                             const int32_t* __restrict__ ids, const int32_t* __restrict__ count,
                             int n, T* __restrict__ y) {
  const int64_t total = static_cast<int64_t>(*count) * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t k = e / n, j = e - k * n;
    y[static_cast<int64_t>(ids[k]) * n + j] = buf[static_cast<int64_t>(src[k]) * n + j];
  }
}

template <typename T, typename A>
ffi::Error run_network(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                       ffi::AnyBuffer bias, const int32_t* slice_ptr, const int32_t* indices,
                       ffi::Result<ffi::AnyBuffer> y, int32_t* active, ffi::Result<ffi::AnyBuffer> work,
                       int32_t* iwork, int64_t rows, int n, int64_t n_layers, double clip,
                       bool drop, ffi::Span<const int64_t> sp_off, ffi::Span<const int64_t> ell_off) {
  constexpr ffi::DataType acc = sizeof(A) == 8 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (values.element_type() != acc || bias.element_type() != acc) {
    return ffi::Error::InvalidArgument(
        "sparse_dnn: values and bias must have the accumulation dtype of x");
  }
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  T* yp = reinterpret_cast<T*>(y->untyped_data());
  T* feat = reinterpret_cast<T*>(work->untyped_data());
  const A* vp = reinterpret_cast<const A*>(values.untyped_data());
  const A* bp = reinterpret_cast<const A*>(bias.untyped_data());
  // Integer workspace: alive and done (zero between kernels), two row lists of
  // packed positions and original ids (double-buffered), the first count.
  int32_t* alive = iwork;
  int32_t* done = iwork + rows;
  int32_t* src[2] = {iwork + 2 * rows, iwork + 3 * rows};
  int32_t* ids[2] = {iwork + 4 * rows, iwork + 5 * rows};
  int32_t* count0 = iwork + 6 * rows;
  cudaMemsetAsync(iwork, 0, sizeof(int32_t) * 2 * rows, stream);
  cudaMemsetAsync(count0, 0, sizeof(int32_t) * 2, stream);
  cudaMemsetAsync(active, 0, sizeof(int32_t) * n_layers, stream);

  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const unsigned grid = static_cast<unsigned>(std::max(1, sms * 8));

  list_nonzero_rows<T, A><<<grid, 256, 0, stream>>>(xp, rows, n, drop, src[0], ids[0], count0);
  if (auto err = last_launch_error("sparse_dnn: first row list"); err.failure()) return err;

  const T* in = xp;
  const int32_t* count = count0;
  int cur = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    LayerArgs<T, A> args{};
    args.x = in;
    args.values = vp + ell_off[l];
    args.bias = bp + l * n;
    args.slice_ptr = slice_ptr + sp_off[l];
    args.indices = indices + ell_off[l];
    args.y = feat + (l % 2) * rows * n;
    args.rows = rows;
    args.count = count;
    args.src_rows = src[cur];
    args.alive = alive;
    args.done = done;
    args.ids_in = ids[cur];
    args.next_src = src[1 - cur];
    args.next_ids = ids[1 - cur];
    args.active_out = active + l;
    args.drop = drop;
    args.n_in = n;
    args.n_out = n;
    args.relu = true;
    args.clip = static_cast<A>(clip);
    if (auto err = launch_layer<T, A>(stream, args); err.failure()) return err;
    in = args.y;
    if (drop) count = active + l;
    cur = 1 - cur;
  }
  cudaMemsetAsync(yp, 0, sizeof(T) * rows * n, stream);
  scatter_rows<T><<<grid, 256, 0, stream>>>(in, src[cur], ids[cur], count, n, yp);
  return last_launch_error("sparse_dnn: scatter");
}

ffi::Error sparse_dnn_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                           ffi::AnyBuffer bias, ffi::Buffer<ffi::S32> slice_ptr,
                           ffi::Buffer<ffi::S32> indices, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::Buffer<ffi::S32>> active,
                           ffi::Result<ffi::AnyBuffer> work,
                           ffi::Result<ffi::Buffer<ffi::S32>> iwork, double clip, bool drop_dead,
                           ffi::Span<const int64_t> sp_off, ffi::Span<const int64_t> ell_off) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("sparse_dnn: x must be [batch, n]");
  const int64_t rows = xd[0], n = xd[1];
  const int64_t n_layers = static_cast<int64_t>(active->element_count());
  const int64_t n_slices = (n + kSlice - 1) / kSlice;
  if (n > 0x7fffffff || rows >= 0x7fffffff) {
    return ffi::Error::InvalidArgument("sparse_dnn: batch and n must be below 2^31");
  }
  if (static_cast<int64_t>(sp_off.size()) != n_layers ||
      static_cast<int64_t>(ell_off.size()) != n_layers + 1 ||
      static_cast<int64_t>(bias.element_count()) != n_layers * n ||
      static_cast<int64_t>(slice_ptr.element_count()) != n_layers * (n_slices + 1) ||
      static_cast<int64_t>(indices.element_count()) != ell_off[n_layers] ||
      static_cast<int64_t>(values.element_count()) != ell_off[n_layers] ||
      static_cast<int64_t>(work->element_count()) != 2 * rows * n ||
      static_cast<int64_t>(iwork->element_count()) != 6 * rows + 2) {
    return ffi::Error::InvalidArgument("sparse_dnn: inconsistent buffer sizes for L and n");
  }
  if (x.element_type() != y->element_type() || x.element_type() != work->element_type()) {
    return ffi::Error::InvalidArgument("sparse_dnn: x, y and the workspace must share a dtype");
  }
  if (rows == 0 || n_layers == 0) {
    cudaMemsetAsync(active->typed_data(), 0, sizeof(int32_t) * n_layers, stream);
    return last_launch_error("sparse_dnn");
  }
  // SPDNN_HOST_TIMING=1 prints the host time spent enqueueing the network (profiling aid).
  static const bool host_timing = std::getenv("SPDNN_HOST_TIMING") != nullptr;
  const auto t0 = std::chrono::steady_clock::now();
  struct Report {
    bool on;
    std::chrono::steady_clock::time_point t0;
    int64_t layers;
    ~Report() {
      if (!on) return;
      const double us = std::chrono::duration<double, std::micro>(
          std::chrono::steady_clock::now() - t0).count();
      std::fprintf(stderr, "sparse_dnn: enqueued %lld layers in %.1f us on the host\n",
                   static_cast<long long>(layers), us);
    }
  } report{host_timing, t0, n_layers};
  const int ni = static_cast<int>(n);
  int32_t* ap = active->typed_data();
  int32_t* ip = iwork->typed_data();
  const int32_t* sp = slice_ptr.typed_data();
  const int32_t* ix = indices.typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return run_network<float, float>(stream, x, values, bias, sp, ix, y, ap, work, ip, rows, ni,
                                       n_layers, clip, drop_dead, sp_off, ell_off);
    case ffi::DataType::F64:
      return run_network<double, double>(stream, x, values, bias, sp, ix, y, ap, work, ip, rows,
                                         ni, n_layers, clip, drop_dead, sp_off, ell_off);
    case ffi::DataType::BF16:
      return run_network<__nv_bfloat16, float>(stream, x, values, bias, sp, ix, y, ap, work, ip,
                                               rows, ni, n_layers, clip, drop_dead, sp_off, ell_off);
    case ffi::DataType::F16:
      return run_network<__half, float>(stream, x, values, bias, sp, ix, y, ap, work, ip, rows, ni,
                                        n_layers, clip, drop_dead, sp_off, ell_off);
    default:
      return ffi::Error::InvalidArgument("sparse_dnn: unsupported feature dtype");
  }
}

}  // namespace
}  // namespace spdnn::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseDnnCuda, spdnn::cuda::sparse_dnn_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [batch, n]
                                  .Arg<ffi::AnyBuffer>()         // values, all layers, ELL order
                                  .Arg<ffi::AnyBuffer>()         // bias [L, n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slice_ptr, all layers
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ELL indices, all layers
                                  .Ret<ffi::AnyBuffer>()         // y [batch, n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // active rows after each layer [L]
                                  .Ret<ffi::AnyBuffer>()         // workspace [2, batch, n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // workspace [6 batch + 2]
                                  .Attr<double>("clip")
                                  .Attr<bool>("drop_dead")
                                  .Attr<ffi::Span<const int64_t>>("slice_offsets")  // [L]
                                  .Attr<ffi::Span<const int64_t>>("ell_offsets"));  // [L + 1]
