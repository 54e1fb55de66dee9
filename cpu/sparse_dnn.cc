// CPU kernel of SparseDNN: a whole network of L square sparse layers in one FFI
// call, Y <- min(relu(Y W_l + b_l), clip) for l = 1..L, skipping dead rows.
//
// With relu and biases <= 0 a row that became all zero stays zero, so only the
// active rows are computed: an active-row list is kept between layers and
// compacted (in order, so results are deterministic) after each layer.  Rows
// are processed in tiles of kRows through the list, exactly as in
// sparse_linear.cc: the tile is copied once into a transposed buffer and each
// weight is reused for kRows rows.

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace spdnn::cpu {
namespace {

constexpr int kRows = 8;

template <typename T, typename A>
void run_network(const T* x, const A* values, const A* bias, const int32_t* indptr,
                 const int32_t* indices, T* y, int32_t* active_per_layer, int64_t rows, int64_t n,
                 int64_t n_layers, A clip, bool drop_dead) {
  std::vector<T> buf_a(static_cast<size_t>(rows) * n), buf_b(static_cast<size_t>(rows) * n);
  std::vector<int64_t> list(rows), next;  // list[k] = original row of packed row k
  std::vector<uint8_t> alive(rows);
  // Packed layout: active row k lives at buf[k * n]; input rows with no nonzero
  // feature are dropped before the first layer when dead rows may be skipped.
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    bool any = !drop_dead;
    for (int64_t i = 0; i < n && !any; ++i) any = to_float(xr[i]) != 0;
    if (any) {
      std::memcpy(buf_a.data() + count * n, xr, sizeof(T) * n);
      list[count++] = r;
    }
  }
  list.resize(count);
  T* in = buf_a.data();
  T* out = buf_b.data();
  int64_t nnz_offset = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    const int32_t* ip = indptr + l * (n + 1);
    const A* val = values + nnz_offset;
    const int32_t* idx = indices + nnz_offset;
    const A* b = bias + l * n;
    nnz_offset += ip[n];
    const int64_t n_tiles = (count + kRows - 1) / kRows;
    const int64_t n_items = std::min<int64_t>(n_tiles, 8 * static_cast<int64_t>(num_threads()));
    parallel_for(n_items, [&](int64_t item) {
      std::vector<A> xt(static_cast<size_t>(n) * kRows);
      for (int64_t t = n_tiles * item / n_items; t < n_tiles * (item + 1) / n_items; ++t) {
        const int64_t k0 = t * kRows;
        const int valid = static_cast<int>(std::min<int64_t>(kRows, count - k0));
        for (int r = 0; r < kRows; ++r) {
          const T* xr = in + (k0 + r) * n;
          for (int64_t i = 0; i < n; ++i) xt[i * kRows + r] = r < valid ? to_float(xr[i]) : A(0);
        }
        bool row_alive[kRows] = {};
        for (int64_t j = 0; j < n; ++j) {
          A acc[kRows] = {};
          for (int32_t p = ip[j]; p < ip[j + 1]; ++p) {
            const A v = val[p];
            const A* xp = xt.data() + static_cast<int64_t>(idx[p]) * kRows;
            for (int r = 0; r < kRows; ++r) acc[r] += v * xp[r];
          }
          for (int r = 0; r < valid; ++r) {
            A o = acc[r] + b[j];
            if (o < A(0)) o = A(0);
            if (o > clip) o = clip;
            const T stored = from_float<T>(o);
            out[(k0 + r) * n + j] = stored;
            row_alive[r] |= to_float(stored) != 0;
          }
        }
        for (int r = 0; r < valid; ++r) alive[k0 + r] = row_alive[r];
      }
    });
    int64_t n_alive = 0;
    for (int64_t k = 0; k < count; ++k) n_alive += alive[k];
    active_per_layer[l] = static_cast<int32_t>(n_alive);
    if (drop_dead) {
      // Compact in order: deterministic and independent of the thread count.
      int64_t kept = 0;
      for (int64_t k = 0; k < count; ++k) {
        if (!alive[k]) continue;
        if (kept != k) std::memcpy(out + kept * n, out + k * n, sizeof(T) * n);
        list[kept++] = list[k];
      }
      count = kept;
      list.resize(count);
    }
    std::swap(in, out);
  }
  std::memset(y, 0, sizeof(T) * rows * n);
  for (int64_t k = 0; k < count; ++k) std::memcpy(y + list[k] * n, in + k * n, sizeof(T) * n);
}

template <typename T, typename A>
ffi::Error dispatch(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer bias,
                    ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                    ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::S32>> active,
                    int64_t rows, int64_t n, int64_t n_layers, double clip, bool drop_dead) {
  constexpr ffi::DataType acc = sizeof(A) == 8 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (values.element_type() != acc || bias.element_type() != acc) {
    return ffi::Error::InvalidArgument(
        "sparse_dnn: values and bias must have the accumulation dtype of x");
  }
  // The index structure is checked once here (it is cheap next to the network).
  const int32_t* ip = indptr.typed_data();
  int64_t total = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    const int32_t* p = ip + l * (n + 1);
    if (p[0] != 0) return ffi::Error::InvalidArgument("sparse_dnn: indptr must start at 0");
    for (int64_t j = 0; j < n; ++j) {
      if (p[j + 1] < p[j]) return ffi::Error::InvalidArgument("sparse_dnn: indptr not monotone");
    }
    total += p[n];
  }
  if (total != static_cast<int64_t>(indices.element_count()) ||
      total != static_cast<int64_t>(values.element_count())) {
    return ffi::Error::InvalidArgument("sparse_dnn: indptr does not match the number of nonzeros");
  }
  const int32_t* ix = indices.typed_data();
  for (int64_t k = 0; k < total; ++k) {
    if (ix[k] < 0 || ix[k] >= n) return ffi::Error::InvalidArgument("sparse_dnn: index out of range");
  }
  run_network<T, A>(reinterpret_cast<const T*>(x.untyped_data()),
                    reinterpret_cast<const A*>(values.untyped_data()),
                    reinterpret_cast<const A*>(bias.untyped_data()), ip, ix,
                    reinterpret_cast<T*>(y->untyped_data()), active->typed_data(), rows, n,
                    n_layers, static_cast<A>(clip), drop_dead);
  return ffi::Error::Success();
}

ffi::Error sparse_dnn_impl(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer bias,
                           ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> indices,
                           ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::Buffer<ffi::S32>> active, double clip,
                           bool drop_dead) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("sparse_dnn: x must be [batch, n]");
  const int64_t rows = xd[0], n = xd[1];
  const int64_t n_layers = static_cast<int64_t>(active->element_count());
  if (static_cast<int64_t>(indptr.element_count()) != n_layers * (n + 1) ||
      static_cast<int64_t>(bias.element_count()) != n_layers * n) {
    return ffi::Error::InvalidArgument("sparse_dnn: indptr or bias size does not match L and n");
  }
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("sparse_dnn: x and y must have the same dtype");
  }
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return dispatch<float, float>(x, values, bias, indptr, indices, y, active, rows, n, n_layers,
                                    clip, drop_dead);
    case ffi::DataType::F64:
      return dispatch<double, double>(x, values, bias, indptr, indices, y, active, rows, n,
                                      n_layers, clip, drop_dead);
    case ffi::DataType::BF16:
      return dispatch<bf16, float>(x, values, bias, indptr, indices, y, active, rows, n, n_layers,
                                   clip, drop_dead);
    case ffi::DataType::F16:
      return dispatch<f16, float>(x, values, bias, indptr, indices, y, active, rows, n, n_layers,
                                  clip, drop_dead);
    default:
      return ffi::Error::InvalidArgument("sparse_dnn: unsupported feature dtype");
  }
}

}  // namespace
}  // namespace spdnn::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseDnnCpu, spdnn::cpu::sparse_dnn_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // x [batch, n]
                                  .Arg<ffi::AnyBuffer>()         // values [sum nnz] (f32 | f64)
                                  .Arg<ffi::AnyBuffer>()         // bias [L, n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [L, n + 1] per layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [sum nnz]
                                  .Ret<ffi::AnyBuffer>()         // y [batch, n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // active rows after each layer [L]
                                  .Attr<double>("clip")          // +inf for no clip
                                  .Attr<bool>("drop_dead"));     // skip rows that became zero
