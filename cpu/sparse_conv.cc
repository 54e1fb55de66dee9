// CPU kernel of sparse_conv2d: direct sparse convolution (Escort-style), NCHW.
//
//   y[b, o, oh, ow] = act(bias[o] + sum_j values[j] * x[b, chan[j], oh*sh - pt + dy[j],
//                                                          ow*sw - pl + dx[j]])
// over the nonzeros j of output channel o (CSR by output channel).  chan[j] is the
// input channel including the group's base, dy/dx the dilated tap offsets; the
// Python side precomputes them once per kernel and geometry.  Taps that fall into
// the padding contribute zero: for each nonzero the range of output rows and
// columns whose input is inside the image is computed once, so the inner loop is
// a plain (vectorizable for stride 1) multiply-add along an output row.
//
// The input is first staged with kImg images innermost ([block][c][h][w][kImg]), so
// each weight multiplies one contiguous vector of kImg images per output pixel:
// the FMA vectorizes whatever the map's width and the weight is reused kImg times.
// Nonzeros go in blocks of four over the outputs all four reach, so each accumulator
// vector is loaded and stored once per four multiply-adds (1.2-1.8x on the pruned
// layers of the benchmark); the sums keep CSR order, so results are unchanged.
// Work items are (image block, output channel) planes, spread over threads; each
// output is summed in CSR order by one thread (deterministic).  NHWC is handled by the
// Python lowering (transposes around this kernel).

#include <algorithm>
#include <memory>
#include <type_traits>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace spdnn::cpu {
namespace {

// First and one-past-last output index o with 0 <= o*s - p + d < n, clamped to [0, out).
inline void valid_range(int64_t n, int64_t out, int64_t s, int64_t p, int64_t d, int64_t* lo,
                        int64_t* hi) {
  const int64_t a = p - d;                                // need o*s >= a
  int64_t l = a <= 0 ? 0 : (a + s - 1) / s;
  const int64_t b = n - 1 + p - d;                        // need o*s <= b
  int64_t h = b < 0 ? 0 : b / s + 1;
  *lo = std::min(l, out);
  *hi = std::max(*lo, std::min(h, out));
}

struct Geometry {
  int64_t batch, channels, height, width, out_channels, out_h, out_w;
  int64_t sh, sw, pt, pl;
};

constexpr int kImg = 8;  // images per work item, innermost in the staged input (one vector)

template <typename T, typename A>
void sparse_conv_kernel(const T* x, const A* values, const A* bias, const int32_t* indptr,
                        const int32_t* chan, const int32_t* dy, const int32_t* dx, T* y,
                        const Geometry& g, bool relu) {
  const int64_t plane_in = g.height * g.width, plane_out = g.out_h * g.out_w;
  const int64_t image_in = g.channels * plane_in;
  const int64_t blocks = (g.batch + kImg - 1) / kImg;
  // Stage the input as [block][channel][row][col][kImg]: one weight then meets kImg
  // images in one contiguous vector, whatever the map's width.
  // Uninitialized: every element is written below (no zero-fill pass over the copy).
  std::unique_ptr<A[]> xt(new A[static_cast<size_t>(blocks * image_in * kImg)]);
  parallel_for(blocks * g.channels, [&](int64_t item) {
    const int64_t blk = item / g.channels, c = item % g.channels;
    A* dst = xt.get() + (blk * g.channels + c) * plane_in * kImg;
    for (int k = 0; k < kImg; ++k) {
      const int64_t b = blk * kImg + k;
      if (b < g.batch) {
        const T* src = x + b * image_in + c * plane_in;
        for (int64_t e = 0; e < plane_in; ++e) dst[e * kImg + k] = to_float(src[e]);
      } else {
        for (int64_t e = 0; e < plane_in; ++e) dst[e * kImg + k] = A(0);
      }
    }
  });
  parallel_for(blocks * g.out_channels, [&](int64_t item) {
    const int64_t blk = item / g.out_channels, o = item % g.out_channels;
    thread_local std::vector<A> acc;
    acc.assign(static_cast<size_t>(plane_out * kImg), A(0));
    const A* xb = xt.get() + blk * image_in * kImg;
    // Input row of nonzero j that output row oh reads (column 0 of the output).
    auto row_of = [&](int32_t j, int64_t oh) {
      return xb + static_cast<int64_t>(chan[j]) * plane_in * kImg +
             ((oh * g.sh - g.pt + dy[j]) * g.width - g.pl + dx[j]) * kImg;
    };
    // Nonzero j on the output rectangle [r0, r1) x [c0, c1).
    auto apply1 = [&](int32_t j, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      if (r0 >= r1 || c0 >= c1) return;
      const A v = values[j];
      for (int64_t oh = r0; oh < r1; ++oh) {
        const A* xr = row_of(j, oh);
        A* ar = acc.data() + oh * g.out_w * kImg;
        for (int64_t ow = c0; ow < c1; ++ow) {
          const A* xp = xr + ow * g.sw * kImg;
          A* ap = ar + ow * kImg;
          for (int k = 0; k < kImg; ++k) ap[k] += v * xp[k];
        }
      }
    };
    // Nonzeros in blocks of four: on the outputs all four reach, one pass applies them in
    // order (each accumulator loaded and stored once for four multiply-adds); each one's
    // other outputs follow.  Every output still sums its terms in CSR order.
    constexpr int kBlock = 4;
    int32_t j = indptr[o];
    for (; j + kBlock <= indptr[o + 1]; j += kBlock) {
      int64_t r0[kBlock], r1[kBlock], c0[kBlock], c1[kBlock];
      int64_t R0 = 0, R1 = g.out_h, C0 = 0, C1 = g.out_w;
      for (int i = 0; i < kBlock; ++i) {
        valid_range(g.height, g.out_h, g.sh, g.pt, dy[j + i], &r0[i], &r1[i]);
        valid_range(g.width, g.out_w, g.sw, g.pl, dx[j + i], &c0[i], &c1[i]);
        R0 = std::max(R0, r0[i]);
        R1 = std::min(R1, r1[i]);
        C0 = std::max(C0, c0[i]);
        C1 = std::min(C1, c1[i]);
      }
      if (R0 >= R1 || C0 >= C1) {
        for (int i = 0; i < kBlock; ++i) apply1(j + i, r0[i], r1[i], c0[i], c1[i]);
        continue;
      }
      const A v0 = values[j], v1 = values[j + 1], v2 = values[j + 2], v3 = values[j + 3];
      for (int64_t oh = R0; oh < R1; ++oh) {
        const A* x0 = row_of(j, oh);
        const A* x1 = row_of(j + 1, oh);
        const A* x2 = row_of(j + 2, oh);
        const A* x3 = row_of(j + 3, oh);
        A* ar = acc.data() + oh * g.out_w * kImg;
        for (int64_t ow = C0; ow < C1; ++ow) {
          const int64_t off = ow * g.sw * kImg;
          A* ap = ar + ow * kImg;
          for (int k = 0; k < kImg; ++k) {
            A a = ap[k];
            a += v0 * x0[off + k];
            a += v1 * x1[off + k];
            a += v2 * x2[off + k];
            a += v3 * x3[off + k];
            ap[k] = a;
          }
        }
      }
      for (int i = 0; i < kBlock; ++i) {  // the rest of each one's rectangle
        apply1(j + i, r0[i], R0, c0[i], c1[i]);
        apply1(j + i, R1, r1[i], c0[i], c1[i]);
        apply1(j + i, R0, R1, c0[i], C0);
        apply1(j + i, R0, R1, C1, c1[i]);
      }
    }
    for (; j < indptr[o + 1]; ++j) {
      int64_t r0, r1, c0, c1;
      valid_range(g.height, g.out_h, g.sh, g.pt, dy[j], &r0, &r1);
      valid_range(g.width, g.out_w, g.sw, g.pl, dx[j], &c0, &c1);
      apply1(j, r0, r1, c0, c1);
    }
    const A bo = bias[o];
    for (int k = 0; k < kImg; ++k) {
      const int64_t b = blk * kImg + k;
      if (b >= g.batch) break;
      T* yo = y + (b * g.out_channels + o) * plane_out;
      for (int64_t e = 0; e < plane_out; ++e) {
        A out = acc[e * kImg + k] + bo;
        if (relu && out < A(0)) out = A(0);  // comparisons keep NaN, like jnp.maximum
        yo[e] = from_float<T>(out);
      }
    }
  });
}

ffi::Error sparse_conv_impl(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::AnyBuffer bias,
                            ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> chan,
                            ffi::Buffer<ffi::S32> dy, ffi::Buffer<ffi::S32> dx,
                            ffi::Result<ffi::AnyBuffer> y, int64_t stride_h, int64_t stride_w,
                            int64_t pad_top, int64_t pad_left, int32_t activation) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("sparse_conv2d: x and y must be NCHW arrays");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], stride_h, stride_w, pad_top, pad_left};
  const int64_t nnz = static_cast<int64_t>(values.element_count());
  if (yd[0] != g.batch || static_cast<int64_t>(indptr.element_count()) != g.out_channels + 1 ||
      static_cast<int64_t>(bias.element_count()) != g.out_channels ||
      static_cast<int64_t>(chan.element_count()) != nnz ||
      static_cast<int64_t>(dy.element_count()) != nnz ||
      static_cast<int64_t>(dx.element_count()) != nnz) {
    return ffi::Error::InvalidArgument("sparse_conv2d: inconsistent buffer sizes");
  }
  if (stride_h < 1 || stride_w < 1) {
    return ffi::Error::InvalidArgument("sparse_conv2d: strides must be positive");
  }
  const int32_t* ip = indptr.typed_data();
  const int32_t* cp = chan.typed_data();
  if (ip[0] != 0 || ip[g.out_channels] != nnz) {
    return ffi::Error::InvalidArgument("sparse_conv2d: indptr does not match the nonzeros");
  }
  for (int64_t j = 0; j < nnz; ++j) {
    if (cp[j] < 0 || cp[j] >= g.channels) {
      return ffi::Error::InvalidArgument("sparse_conv2d: input channel index out of range");
    }
  }
  const bool relu = activation == 1;
  const auto acc_type = x.element_type() == ffi::DataType::F64 ? ffi::DataType::F64
                                                                : ffi::DataType::F32;
  if (values.element_type() != acc_type || bias.element_type() != acc_type) {
    return ffi::Error::InvalidArgument(
        "sparse_conv2d: values and bias must have the accumulation dtype of x");
  }
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("sparse_conv2d: x and y must share a dtype");
  }
  auto run = [&](auto* tag, auto* acc_tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = std::remove_pointer_t<decltype(acc_tag)>;
    sparse_conv_kernel<T, A>(reinterpret_cast<const T*>(x.untyped_data()),
                             reinterpret_cast<const A*>(values.untyped_data()),
                             reinterpret_cast<const A*>(bias.untyped_data()), ip, cp,
                             dy.typed_data(), dx.typed_data(),
                             reinterpret_cast<T*>(y->untyped_data()), g, relu);
    return ffi::Error::Success();
  };
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return run(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
    case ffi::DataType::F64:
      return run(static_cast<double*>(nullptr), static_cast<double*>(nullptr));
    case ffi::DataType::BF16:
      return run(static_cast<bf16*>(nullptr), static_cast<float*>(nullptr));
    case ffi::DataType::F16:
      return run(static_cast<f16*>(nullptr), static_cast<float*>(nullptr));
    default:
      return ffi::Error::InvalidArgument("sparse_conv2d: unsupported feature dtype");
  }
}

}  // namespace
}  // namespace spdnn::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseConvCpu, spdnn::cpu::sparse_conv_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // x [B, C, H, W]
                                  .Arg<ffi::AnyBuffer>()         // values [nnz]
                                  .Arg<ffi::AnyBuffer>()         // bias [O]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [O + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // input channel [nnz]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dilated row offset [nnz]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dilated column offset [nnz]
                                  .Ret<ffi::AnyBuffer>()         // y [B, O, OH, OW]
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int32_t>("activation"));
