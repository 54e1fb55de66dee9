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
#include <cstdlib>
#include <string>

#include <cuda_pipeline.h>

#include <type_traits>

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

// ---- tiled kernel (default) ---------------------------------------------------------
// A block owns 32 consecutive output pixels (flattened over the map) of kTileImg images
// and kTileOC output channels.  It stages the pixels' input footprint (zero-padded, so
// no bounds tests) for a chunk of input channels in shared memory; each of its 8 warps
// then applies the nonzeros of its own kTileOC / 8 output channels to the staged tile,
// lane = pixel, kTileImg images per lane.  The record and the smem offset of a tap are
// the same in every lane (broadcast); the lane adds its pixel's offset.  A staged value
// is reused by all the block's nonzeros that touch it (about kTileOC x density x taps
// times), so L2 traffic falls by that factor against the direct kernel, while the
// channel split across warps keeps registers low and occupancy high.  chan_ptr gives
// each output channel's nonzeros per input channel (two loads per chunk, no search).
constexpr int kTileImg = 4;
constexpr int kTileOC = 64;
constexpr int kTileWarps = kConvThreads / 32;
constexpr int kTileStageBytes = 48 * 1024;

struct TiledGeom {
  int64_t batch, channels, height, width, out_channels, out_h, out_w;
  int sh, sw, pt, pl, window_h;
  int fh, fw, chunk, pixel_tiles, oc_blocks, cg, og;
};

template <typename T, typename A>
__global__ void __launch_bounds__(kConvThreads)
    sparse_conv_tiled(const T* __restrict__ x, const int4* __restrict__ records,
                      const A* __restrict__ values, const A* __restrict__ bias,
                      const int32_t* __restrict__ chan_ptr, T* __restrict__ y, TiledGeom g,
                      bool relu) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* xs = reinterpret_cast<A*>(smem_raw);
  constexpr int kPerWarp = kTileOC / kTileWarps;
  const int fhw = g.fh * g.fw;
  const int img_stride = g.chunk * fhw;
  int64_t rest = blockIdx.x;
  const int ocb = static_cast<int>(rest % g.oc_blocks);
  rest /= g.oc_blocks;
  const int tile = static_cast<int>(rest % g.pixel_tiles);
  const int64_t b0 = rest / g.pixel_tiles * kTileImg;
  const int64_t plane_out = g.out_h * g.out_w;
  const int64_t p0 = static_cast<int64_t>(tile) * 32;
  const int64_t p_last = min(p0 + 31, plane_out - 1);
  const int r0 = static_cast<int>(p0 / g.out_w);
  const int rows = (static_cast<int>(p_last / g.out_w) - r0) * g.sh + g.window_h;  // <= g.fh
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t p = p0 + lane;
  const bool pixel_ok = p < plane_out;
  const int oh = static_cast<int>(p / g.out_w), ow = static_cast<int>(p % g.out_w);
  const int my_off = (oh - r0) * g.sh * g.fw + ow * g.sw;
  const int ih_base = r0 * g.sh - g.pt;

  const int o0 = ocb * kTileOC;
  const int o1 = static_cast<int>(min(static_cast<int64_t>(o0 + kTileOC), g.out_channels));
  const int c_begin = (o0 / g.og) * g.cg;  // input channels of the block's groups
  const int c_end = ((o1 - 1) / g.og + 1) * g.cg;

  A acc[kPerWarp][kTileImg];
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
#pragma unroll
    for (int k = 0; k < kTileImg; ++k) acc[i][k] = A(0);
  }
  // Source offset (within an input plane) of each footprint element, -1 in the padding;
  // the same for every staged plane, so computed once.
  int* table = reinterpret_cast<int*>(xs + kTileImg * img_stride);
  const int footprint = rows * g.fw;
  const int64_t plane_in = g.height * g.width;
  for (int e = threadIdx.x; e < footprint; e += kConvThreads) {
    const int ih = ih_base + e / g.fw, iw = e % g.fw - g.pl;
    const bool ok = static_cast<unsigned>(ih) < static_cast<unsigned>(g.height) &&
                    static_cast<unsigned>(iw) < static_cast<unsigned>(g.width);
    table[e] = ok ? static_cast<int>(ih * g.width + iw) : -1;
  }

  for (int c0 = c_begin; c0 < c_end; c0 += g.chunk) {
    const int cn = min(g.chunk, c_end - c0);
    __syncthreads();
    // Stage the footprint of each (image, channel) plane: a warp per plane, lanes over
    // its elements, source offsets from the table (no index arithmetic per element).
    const int planes = kTileImg * cn;
    for (int pl_i = warp; pl_i < planes; pl_i += kTileWarps) {
      const int img = pl_i / cn, c = pl_i - img * cn;
      const int64_t b = b0 + img;
      const bool image_ok = b < g.batch;
      const T* src = x + (b * g.channels + c0 + c) * plane_in;
      A* dst = xs + img * img_stride + c * fhw;
      for (int e = lane; e < footprint; e += 32) {
        const int off = table[e];
        const bool ok = image_ok && off >= 0;
        if constexpr (std::is_same_v<T, A>) {
          // Asynchronous copy, zero-filled in the padding.
          __pipeline_memcpy_async(dst + e, ok ? src + off : x, sizeof(A), ok ? 0 : sizeof(A));
        } else {
          dst[e] = ok ? load_acc<A>(src + off) : A(0);
        }
      }
    }
    if constexpr (std::is_same_v<T, A>) {
      __pipeline_commit();
      __pipeline_wait_prior(0);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int o = o0 + warp + i * kTileWarps;
      if (o < o1) {
        const int32_t* cp = chan_ptr + static_cast<int64_t>(o) * (g.cg + 1);
        const int cbase = (o / g.og) * g.cg;
        const int lo = min(max(c0 - cbase, 0), g.cg), hi = min(max(c0 + cn - cbase, 0), g.cg);
        const int q_end = __ldg(cp + hi);
        const int base = my_off - c0 * fhw;
#pragma unroll 2
        for (int q = __ldg(cp + lo); q < q_end; ++q) {
          const int4 rec = __ldg(records + q);  // {offset, dy, dx, chan}: same in every lane
          const A v = __ldg(values + q);
          const int off = base + rec.w * fhw + rec.y * g.fw + rec.z;
#pragma unroll
          for (int k = 0; k < kTileImg; ++k) {
            acc[i][k] = fma(v, xs[off + k * img_stride], acc[i][k]);
          }
        }
      }
    }
  }
  if (!pixel_ok) return;
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    const int o = o0 + warp + i * kTileWarps;
    if (o < o1) {
      const A bo = __ldg(bias + o);
#pragma unroll
      for (int k = 0; k < kTileImg; ++k) {
        const int64_t b = b0 + k;
        if (b < g.batch) {
          A out = acc[i][k] + bo;
          if (relu && out < A(0)) out = A(0);  // comparisons keep NaN, like jnp.maximum
          store_from(y + (b * g.out_channels + o) * plane_out + p, out);
        }
      }
    }
  }
}

template <typename T, typename A>
ffi::Error launch_direct(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer records,
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
  return last_launch_error("sparse_conv2d (direct)");
}

// The tiled kernel unless one channel's footprint exceeds its shared-memory budget
// (very wide, strided maps) or SPDNN_CONV_KERNEL=direct; then the direct kernel.
template <typename T, typename A>
ffi::Error launch(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer records,
                  ffi::AnyBuffer values, ffi::AnyBuffer bias, const int32_t* indptr,
                  const int32_t* chan_ptr, ffi::Result<ffi::AnyBuffer> y, ConvGeom g,
                  int groups, int window_h, int window_w, bool relu) {
  if (g.batch == 0 || g.out_h * g.out_w == 0 || g.out_channels == 0) {
    return ffi::Error::Success();
  }
  static const bool force_direct = [] {
    const char* env = std::getenv("SPDNN_CONV_KERNEL");
    return env != nullptr && std::string(env) == "direct";
  }();
  TiledGeom t{g.batch, g.channels, g.height, g.width, g.out_channels, g.out_h, g.out_w,
              g.sh, g.sw, g.pt, g.pl, window_h};
  t.cg = static_cast<int>(g.channels / groups);
  t.og = static_cast<int>(g.out_channels / groups);
  const int64_t rows = std::min<int64_t>(g.out_h, 31 / g.out_w + 2);
  t.fh = static_cast<int>((rows - 1) * g.sh + window_h);
  t.fw = static_cast<int>((g.out_w - 1) * g.sw + window_w);
  const int64_t per_channel = int64_t{kTileImg} * t.fh * t.fw * sizeof(A);
  const int64_t table_bytes = int64_t{4} * t.fh * t.fw;
  const int64_t span = std::min<int64_t>(g.channels, (kTileOC + t.og - 1) / t.og * t.cg + t.cg);
  const int64_t chunk = std::min<int64_t>((kTileStageBytes - table_bytes) / per_channel, span);
  const int64_t plane_out = g.out_h * g.out_w;
  t.pixel_tiles = static_cast<int>((plane_out + 31) / 32);
  t.oc_blocks = static_cast<int>((g.out_channels + kTileOC - 1) / kTileOC);
  const int64_t blocks =
      (g.batch + kTileImg - 1) / kTileImg * t.pixel_tiles * int64_t{t.oc_blocks};
  if (force_direct || chunk < 1 || blocks >= (int64_t{1} << 31) || t.fh * int64_t{t.fw} > (1 << 24)) {
    return launch_direct<T, A>(stream, x, records, values, bias, indptr, y, g, relu);
  }
  t.chunk = static_cast<int>(chunk);
  const size_t smem = static_cast<size_t>(per_channel * chunk) +
                      sizeof(int) * static_cast<size_t>(t.fh) * t.fw;  // + offset table
  sparse_conv_tiled<T, A><<<static_cast<unsigned>(blocks), kConvThreads, smem, stream>>>(
      reinterpret_cast<const T*>(x.untyped_data()),
      reinterpret_cast<const int4*>(records.untyped_data()),
      reinterpret_cast<const A*>(values.untyped_data()),
      reinterpret_cast<const A*>(bias.untyped_data()), chan_ptr,
      reinterpret_cast<T*>(y->untyped_data()), t, relu);
  return last_launch_error("sparse_conv2d (tiled)");
}

ffi::Error sparse_conv_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer records,
                            ffi::AnyBuffer values, ffi::AnyBuffer bias,
                            ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> chan_ptr,
                            ffi::Result<ffi::AnyBuffer> y, int64_t stride_h, int64_t stride_w,
                            int64_t pad_top, int64_t pad_left, int32_t activation,
                            int64_t groups, int64_t window_h, int64_t window_w) {
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
  if (stride_h < 1 || stride_w < 1 || groups < 1 || window_h < 1 || window_w < 1 ||
      g.channels % groups || g.out_channels % groups) {
    return ffi::Error::InvalidArgument("sparse_conv2d: bad strides, groups or window");
  }
  if (static_cast<int64_t>(chan_ptr.element_count()) !=
      g.out_channels * (g.channels / groups + 1)) {
    return ffi::Error::InvalidArgument("sparse_conv2d: chan_ptr must be [O, C / groups + 1]");
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
  const int32_t* cp = chan_ptr.typed_data();
  const int ng = static_cast<int>(groups), wh = static_cast<int>(window_h),
            ww = static_cast<int>(window_w);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return launch<float, float>(stream, x, records, values, bias, ip, cp, y, g, ng, wh,
                                ww, relu);
    case ffi::DataType::F64:
      return launch<double, double>(stream, x, records, values, bias, ip, cp, y, g, ng, wh,
                                ww, relu);
    case ffi::DataType::BF16:
      return launch<__nv_bfloat16, float>(stream, x, records, values, bias, ip, cp, y, g, ng, wh,
                                ww, relu);
    case ffi::DataType::F16:
      return launch<__half, float>(stream, x, records, values, bias, ip, cp, y, g, ng, wh,
                                ww, relu);
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
                                  .Arg<ffi::Buffer<ffi::S32>>()  // chan_ptr [O, C/groups + 1]
                                  .Ret<ffi::AnyBuffer>()         // y [B, O, OH, OW]
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int32_t>("activation")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("window_h")     // dilated filter extent
                                  .Attr<int64_t>("window_w"));
