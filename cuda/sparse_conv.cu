// CUDA kernel of sparse_conv2d: direct sparse convolution (Escort-style), NCHW.
//
//   y[b, o, oh, ow] = act(bias[o] + sum_j w_j * x[b, chan_j, oh*sh - pt + dy_j, ow*sw - pl + dx_j])
//
// over the nonzeros j of output channel o (CSR by output channel).  Each nonzero has
// a 16-byte record {offset, dy, dx, 0} precomputed once per kernel and input
// geometry (offset = chan*H*W + dy*W + dx, "stretched" as in Escort), so the inner
// loop is two broadcast loads (record, value), a bounds test and, per image, one load and one
// FMA: no im2col, no padded copy of the input (taps in the padding are skipped).
//
// Thread = one output pixel of kImg images (the Escort batched variant): the record
// and the bounds test are shared by the kImg images, and consecutive lanes hold
// consecutive pixels, so input loads and output stores are coalesced.  A block
// loops over a chunk of output channels (all lanes walk the same channel's
// nonzeros: warp-uniform control flow, broadcast record loads).  Blocks that share
// pixels are adjacent in the grid (channel chunk fastest), so their inputs come
// from L2 once and from L1 after.  Each output is summed by one thread in CSR
// order: deterministic, no atomics.  Any stride, padding (including negative),
// dilation and groups; NHWC is handled by the Python lowering (transposes).

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/common.cuh"

namespace ffi = xla::ffi;

namespace spdnn::cuda {
namespace {

constexpr int kConvThreads = 256;
constexpr int kImg = 4;  // images per thread (record and bounds test shared)

struct ConvGeom {
  int64_t batch, channels, height, width, out_channels, out_h, out_w;
  int sh, sw, pt, pl;
  int oc_chunk;  // output channels per block
};

template <typename T, typename A>
__global__ void __launch_bounds__(kConvThreads)
    sparse_conv_kernel(const T* __restrict__ x, const int4* __restrict__ records,
                       const A* __restrict__ values, const A* __restrict__ bias,
                       const int32_t* __restrict__ indptr, T* __restrict__ y, ConvGeom g,
                       bool relu) {
  const int64_t plane_out = g.out_h * g.out_w;
  const int64_t plane_in = g.height * g.width;
  const int64_t image_in = g.channels * plane_in;
  const int64_t q = static_cast<int64_t>(blockIdx.y) * kConvThreads + threadIdx.x;
  const int64_t b0 = q / plane_out * kImg;
  const bool active = b0 < g.batch;
  const int64_t p = q % plane_out;
  const int oh = static_cast<int>(p / g.out_w), ow = static_cast<int>(p % g.out_w);
  const int ih0 = oh * g.sh - g.pt, iw0 = ow * g.sw - g.pl;
  const int n_img = active ? static_cast<int>(min(static_cast<int64_t>(kImg), g.batch - b0)) : 0;
  // Base of each image's window corner (may point before the image: only in-bounds
  // taps are read).
  const T* base[kImg];
#pragma unroll
  for (int k = 0; k < kImg; ++k) {
    base[k] = x + (b0 + min(k, max(n_img - 1, 0))) * image_in +
              (static_cast<int64_t>(ih0) * g.width + iw0);
  }
  const int o_begin = blockIdx.x * g.oc_chunk;
  const int o_end = static_cast<int>(min(static_cast<int64_t>(o_begin) + g.oc_chunk, g.out_channels));
  for (int o = o_begin; o < o_end; ++o) {
    A acc[kImg];
#pragma unroll
    for (int k = 0; k < kImg; ++k) acc[k] = A(0);
    const int j_end = __ldg(indptr + o + 1);
    for (int j = __ldg(indptr + o); j < j_end; ++j) {
      const int4 r = __ldg(records + j);  // same address in every lane: one broadcast
      const A v = __ldg(values + j);
      const int off = r.x, dy = r.y, dx = r.z;
      const bool inside = static_cast<unsigned>(ih0 + dy) < static_cast<unsigned>(g.height) &&
                          static_cast<unsigned>(iw0 + dx) < static_cast<unsigned>(g.width);
      if (inside) {
#pragma unroll
        for (int k = 0; k < kImg; ++k) acc[k] = fma(v, load_acc<A>(base[k] + off), acc[k]);
      }
    }
    if (active) {
      const A bo = __ldg(bias + o);
#pragma unroll
      for (int k = 0; k < kImg; ++k) {
        if (k < n_img) {
          A out = acc[k] + bo;
          if (relu && out < A(0)) out = A(0);  // comparisons keep NaN, like jnp.maximum
          store_from(y + ((b0 + k) * g.out_channels + o) * plane_out + p, out);
        }
      }
    }
  }
}

template <typename T, typename A>
ffi::Error launch(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer records,
                  ffi::AnyBuffer values, ffi::AnyBuffer bias, const int32_t* indptr,
                  ffi::Result<ffi::AnyBuffer> y, ConvGeom g, bool relu) {
  const int64_t plane_out = g.out_h * g.out_w;
  const int64_t groups = (g.batch + kImg - 1) / kImg;
  const int64_t pixel_blocks = (groups * plane_out + kConvThreads - 1) / kConvThreads;
  if (pixel_blocks == 0 || g.out_channels == 0) return ffi::Error::Success();
  if (pixel_blocks > 65535) {
    return ffi::Error::InvalidArgument("sparse_conv2d: batch x output pixels too large for one launch");
  }
  // Enough blocks to fill the device a few times over; the rest of the channels
  // loop inside a block (reusing its inputs from L1).
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  sms = std::max(1, sms);
  const int64_t want_chunks = std::max<int64_t>(1, (8 * sms + pixel_blocks - 1) / pixel_blocks);
  g.oc_chunk = static_cast<int>(std::max<int64_t>(
      1, (g.out_channels + want_chunks - 1) / want_chunks));
  const int64_t chunks = (g.out_channels + g.oc_chunk - 1) / g.oc_chunk;
  dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(pixel_blocks));
  sparse_conv_kernel<T, A><<<grid, kConvThreads, 0, stream>>>(
      reinterpret_cast<const T*>(x.untyped_data()),
      reinterpret_cast<const int4*>(records.untyped_data()),
      reinterpret_cast<const A*>(values.untyped_data()),
      reinterpret_cast<const A*>(bias.untyped_data()), indptr,
      reinterpret_cast<T*>(y->untyped_data()), g, relu);
  return last_launch_error("sparse_conv2d");
}

ffi::Error sparse_conv_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer records,
                            ffi::AnyBuffer values, ffi::AnyBuffer bias,
                            ffi::Buffer<ffi::S32> indptr, ffi::Result<ffi::AnyBuffer> y,
                            int64_t stride_h, int64_t stride_w, int64_t pad_top,
                            int64_t pad_left, int32_t activation) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4) {
    return ffi::Error::InvalidArgument("sparse_conv2d: x and y must be NCHW arrays");
  }
  ConvGeom g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3],
             static_cast<int>(stride_h), static_cast<int>(stride_w),
             static_cast<int>(pad_top), static_cast<int>(pad_left), 1};
  const int64_t nnz = static_cast<int64_t>(values.element_count());
  if (yd[0] != g.batch || static_cast<int64_t>(indptr.element_count()) != g.out_channels + 1 ||
      static_cast<int64_t>(bias.element_count()) != g.out_channels ||
      static_cast<int64_t>(records.element_count()) != 4 * nnz ||
      records.element_type() != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument("sparse_conv2d: inconsistent buffer sizes");
  }
  if (g.channels * g.height * g.width >= (int64_t{1} << 31) || g.height >= (1 << 30) ||
      g.width >= (1 << 30)) {
    return ffi::Error::InvalidArgument("sparse_conv2d: one image must have fewer than 2^31 elements");
  }
  if (stride_h < 1 || stride_w < 1) {
    return ffi::Error::InvalidArgument("sparse_conv2d: strides must be positive");
  }
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("sparse_conv2d: x and y must share a dtype");
  }
  const auto acc_type = x.element_type() == ffi::DataType::F64 ? ffi::DataType::F64
                                                                : ffi::DataType::F32;
  if (values.element_type() != acc_type || bias.element_type() != acc_type) {
    return ffi::Error::InvalidArgument(
        "sparse_conv2d: values and bias must have the accumulation dtype of x");
  }
  const bool relu = activation == 1;
  const int32_t* ip = indptr.typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return launch<float, float>(stream, x, records, values, bias, ip, y, g, relu);
    case ffi::DataType::F64:
      return launch<double, double>(stream, x, records, values, bias, ip, y, g, relu);
    case ffi::DataType::BF16:
      return launch<__nv_bfloat16, float>(stream, x, records, values, bias, ip, y, g, relu);
    case ffi::DataType::F16:
      return launch<__half, float>(stream, x, records, values, bias, ip, y, g, relu);
    default:
      return ffi::Error::InvalidArgument("sparse_conv2d: unsupported feature dtype");
  }
}

}  // namespace
}  // namespace spdnn::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseConvCuda, spdnn::cuda::sparse_conv_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [B, C, H, W]
                                  .Arg<ffi::AnyBuffer>()         // records int32 [nnz, 4]
                                  .Arg<ffi::AnyBuffer>()         // values [nnz]
                                  .Arg<ffi::AnyBuffer>()         // bias [O]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indptr [O + 1]
                                  .Ret<ffi::AnyBuffer>()         // y [B, O, OH, OW]
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int32_t>("activation"));
