// CPU kernel of sparse_linear: y = min(act(x @ W + b), clip) with W stored by
// output neuron (CSR of W^T).
//
// Rows of x are processed in tiles of kRows.  Each tile is copied once into a
// transposed buffer xt[i * kRows + r] so that one weight (i -> j) meets kRows
// contiguous features: the inner loop is a short vector FMA and every weight
// loaded is reused kRows times.  Tiles are spread over threads; each output
// element is summed in CSR order by one thread, so results are deterministic.

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace spdnn::cpu {
namespace {

constexpr int kRows = 8;  // feature rows per tile (tuned default)

template <typename T, typename A>
void sparse_linear_kernel(const T* x, const A* values, const A* bias, const int32_t* indptr,
                          const int32_t* indices, T* y, int64_t rows, int64_t n_in,
                          int64_t n_out, bool relu, A clip) {
  const int64_t n_tiles = (rows + kRows - 1) / kRows;
  const int64_t n_items = std::min<int64_t>(n_tiles, 8 * static_cast<int64_t>(num_threads()));
  parallel_for(n_items, [&](int64_t item) {
    const int64_t t_begin = n_tiles * item / n_items;
    const int64_t t_end = n_tiles * (item + 1) / n_items;
    std::vector<A> xt(static_cast<size_t>(n_in) * kRows);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t row0 = t * kRows;
      const int valid = static_cast<int>(std::min<int64_t>(kRows, rows - row0));
      for (int r = 0; r < kRows; ++r) {
        if (r < valid) {
          const T* xr = x + (row0 + r) * n_in;
          for (int64_t i = 0; i < n_in; ++i) xt[i * kRows + r] = to_float(xr[i]);
        } else {
          for (int64_t i = 0; i < n_in; ++i) xt[i * kRows + r] = A(0);
        }
      }
      for (int64_t j = 0; j < n_out; ++j) {
        A acc[kRows] = {};
        for (int32_t p = indptr[j], e = indptr[j + 1]; p < e; ++p) {
          const A v = values[p];
          const A* xp = xt.data() + static_cast<int64_t>(indices[p]) * kRows;
          for (int r = 0; r < kRows; ++r) acc[r] += v * xp[r];
        }
        const A b = bias[j];
        for (int r = 0; r < valid; ++r) {
          A o = acc[r] + b;
          if (relu && o < A(0)) o = A(0);  // comparisons keep NaN, like jnp.maximum
          if (o > clip) o = clip;
          y[(row0 + r) * n_out + j] = from_float<T>(o);
        }
      }
    }
  });
}

template <typename T, typename A>
ffi::Error dispatch(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer bias,
                    const int32_t* indptr, const int32_t* indices, ffi::Result<ffi::AnyBuffer> y,
                    int64_t rows, int64_t n_in, int64_t n_out, bool relu, double clip) {
  constexpr ffi::DataType acc = sizeof(A) == 8 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (values.element_type() != acc || bias.element_type() != acc) {
    return ffi::Error::InvalidArgument(
        "sparse_linear: values and bias must have the accumulation dtype of x");
  }
  sparse_linear_kernel<T, A>(reinterpret_cast<const T*>(x.untyped_data()),
                             reinterpret_cast<const A*>(values.untyped_data()),
                             reinterpret_cast<const A*>(bias.untyped_data()), indptr, indices,
                             reinterpret_cast<T*>(y->untyped_data()), rows, n_in, n_out, relu,
                             static_cast<A>(clip));
  return ffi::Error::Success();
}

ffi::Error sparse_linear_impl(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer bias,
                              ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                              ffi::Result<ffi::AnyBuffer> y, int32_t activation, double clip) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() < 1 || yd.size() != xd.size()) {
    return ffi::Error::InvalidArgument("sparse_linear: x and y must have the same rank >= 1");
  }
  const int64_t n_in = xd.back();
  const int64_t n_out = yd.back();
  const int64_t rows = n_in > 0 ? static_cast<int64_t>(x.element_count()) / n_in
                                : static_cast<int64_t>(y->element_count()) / std::max<int64_t>(n_out, 1);
  if (indptr.element_count() != static_cast<size_t>(n_out + 1) ||
      bias.element_count() != static_cast<size_t>(n_out) ||
      values.element_count() != indices.element_count()) {
    return ffi::Error::InvalidArgument(
        "sparse_linear: inconsistent sizes: indptr " + std::to_string(indptr.element_count()) +
        ", n_out " + std::to_string(n_out) + ", bias " + std::to_string(bias.element_count()) +
        ", values " + std::to_string(values.element_count()) + ", indices " +
        std::to_string(indices.element_count()));
  }
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("sparse_linear: x and y must have the same dtype");
  }
  if (rows == 0 || n_out == 0) return ffi::Error::Success();
  const bool relu = activation == 1;
  const int32_t* ip = indptr.typed_data();
  const int32_t* ix = indices.typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return dispatch<float, float>(x, values, bias, ip, ix, y, rows, n_in, n_out, relu, clip);
    case ffi::DataType::F64:
      return dispatch<double, double>(x, values, bias, ip, ix, y, rows, n_in, n_out, relu, clip);
    case ffi::DataType::BF16:
      return dispatch<bf16, float>(x, values, bias, ip, ix, y, rows, n_in, n_out, relu, clip);
    case ffi::DataType::F16:
      return dispatch<f16, float>(x, values, bias, ip, ix, y, rows, n_in, n_out, relu, clip);
    default:
      return ffi::Error::InvalidArgument("sparse_linear: unsupported feature dtype");
  }
}

}  // namespace
}  // namespace spdnn::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseLinearCpu, spdnn::cpu::sparse_linear_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // x [..., n_in]
                                  .Arg<ffi::AnyBuffer>()         // values [nnz] (f32 | f64)
                                  .Arg<ffi::AnyBuffer>()         // bias [n_out]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [n_out + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [nnz], sorted per row
                                  .Ret<ffi::AnyBuffer>()         // y [..., n_out]
                                  .Attr<int32_t>("activation")   // 0 none, 1 relu
                                  .Attr<double>("clip"));        // +inf for no clip
