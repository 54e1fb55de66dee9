// XLA FFI handler of sparse_linear on CUDA: validates the buffers and launches
// the fused layer kernel (cuda/fused_layer.cuh) on XLA's stream.

#include <cstdint>

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
