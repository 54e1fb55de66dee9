// CUDA kernels of sparse_conv2d: direct sparse convolution (Escort-style), NCHW.
//
//   y[b, o, oh, ow] = act(bias[o] + sum_j w_j * x[b, chan_j, oh*sh - pt + dy_j, ow*sw - pl + dx_j])
//
// over the nonzeros j of output channel o (CSR by output channel, sorted by tap).  Each
// nonzero has a 16-byte record {chan, dy, dx, 0} (input channel with the group's base,
// dilated tap offsets) precomputed once per kernel and geometry by the Python side.
// No im2col and no padded copy of the input.
//
// sparse_conv_staged (default): a block stages the zero-padded input footprint of its
// output tile in shared memory, a chunk of input channels at a time, and applies the
// nonzeros of kOC output channels to it (weights broadcast: every lane reads the same
// record; each thread accumulates kOC channels x kImgS images in registers).  Staged
// values are reused by all the block's nonzeros that touch them, which is what makes
// the kernel fast: L2 traffic falls by about kOC x density x taps.
//
// sparse_conv_kernel (fallback, when one channel's footprint exceeds the shared-memory
// budget, or SPDNN_CONV_DIRECT is set): the Escort kernel proper, one thread per output
// pixel of kImg images, inputs through L1 with bounds tests.
//
// Each output is summed by one thread in CSR order: deterministic, no atomics.  Any
// stride, padding (including negative), dilation and groups; NHWC is handled by the
// Python lowering (transposes).

#include <algorithm>
#include <cstdint>
#include <cstdlib>
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
  const int plane_in_i = static_cast<int>(plane_in), width_i = static_cast<int>(g.width);
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
      const int dy = r.y, dx = r.z;
      const int off = r.x * plane_in_i + dy * width_i + dx;
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

// ---- staged kernel (default) -------------------------------------------------------
// A block owns a tile of output pixels (whole rows where they fit) for kSlots x kImgS
// images and a chunk of kOC output channels.  It stages the tile's input footprint
// (zero-padded, so no bounds tests) for a chunk of input channels in shared memory,
// then every thread walks the nonzeros of its kOC channels that fall into the staged
// channels, resuming where it stopped at the next chunk (CSR rows are sorted by
// channel).  Each staged value is reused by every nonzero of the block's channels
// that touches it (kOC x density x taps times), so L2 traffic drops by that factor
// against the direct kernel; accumulators (kOC x kImgS) stay in registers.
constexpr int kImgS = 2;        // images per thread
constexpr int kOC = 32;         // output channels per block
constexpr int kStageBytes = 48 * 1024;

struct StagedGeom {
  int64_t batch, channels, height, width, out_channels, out_h, out_w;
  int sh, sw, pt, pl;
  int th, tw, fh, fw, slots, chunk, tiles_h, tiles_w, oc_blocks, cg, og;
};

template <typename T, typename A>
__global__ void __launch_bounds__(kConvThreads, sizeof(A) == 8 ? 1 : 2)
    sparse_conv_staged(const T* __restrict__ x, const int4* __restrict__ records,
                       const A* __restrict__ values, const A* __restrict__ bias,
                       const int32_t* __restrict__ indptr, T* __restrict__ y, StagedGeom g,
                       bool relu) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* xs = reinterpret_cast<A*>(smem_raw);
  const int fhw = g.fh * g.fw;
  const int img_per_block = g.slots * kImgS;
  // Block -> (image group, tile, output-channel chunk), channel chunk fastest.
  int64_t rest = blockIdx.x;
  const int ocb = static_cast<int>(rest % g.oc_blocks);
  rest /= g.oc_blocks;
  const int tile = static_cast<int>(rest % (g.tiles_h * g.tiles_w));
  const int64_t b_base = rest / (g.tiles_h * g.tiles_w) * img_per_block;
  const int tile_h = tile / g.tiles_w, tile_w = tile % g.tiles_w;
  const int pixels = g.th * g.tw;
  const int slot = threadIdx.x / pixels, pix = threadIdx.x % pixels;
  const int ty = pix / g.tw, tx = pix % g.tw;
  const int oh = tile_h * g.th + ty, ow = tile_w * g.tw + tx;
  const bool computes = slot < g.slots && oh < g.out_h && ow < g.out_w;
  const int ih_base = tile_h * g.th * g.sh - g.pt, iw_base = tile_w * g.tw * g.sw - g.pl;

  const int o0 = ocb * kOC;
  const int o1 = static_cast<int>(min(static_cast<int64_t>(o0 + kOC), g.out_channels));
  // Input channels the block's output channels read (their groups).
  const int c_begin = (o0 / g.og) * g.cg;
  const int c_end = ((o1 - 1) / g.og + 1) * g.cg;

  // Where each output channel's nonzeros for the staged channels start: the same for
  // every thread, so kept in shared memory and advanced by kOC threads per chunk.
  __shared__ int spos[kOC], send[kOC];
  if (threadIdx.x < kOC) {
    const int o = o0 + threadIdx.x;
    spos[threadIdx.x] = o < o1 ? __ldg(indptr + o) : 0;
    send[threadIdx.x] = o < o1 ? __ldg(indptr + o + 1) : 0;
  }
  A acc[kOC][kImgS];
#pragma unroll
  for (int o = 0; o < kOC; ++o) {
#pragma unroll
    for (int k = 0; k < kImgS; ++k) acc[o][k] = A(0);
  }
  const int my_base = slot * kImgS * g.chunk * fhw + ty * g.sh * g.fw + tx * g.sw;

  for (int c0 = c_begin; c0 < c_end; c0 += g.chunk) {
    const int cn = min(g.chunk, c_end - c0);
    __syncthreads();
    if (threadIdx.x < kOC) {  // skip nonzeros of channels before this chunk
      int p = spos[threadIdx.x];
      const int e = send[threadIdx.x];
      while (p < e && __ldg(records + p).x < c0) ++p;
      spos[threadIdx.x] = p;
    }
    const int total = img_per_block * cn * fhw;
    for (int e = threadIdx.x; e < total; e += kConvThreads) {
      const int fx = e % g.fw;
      int r = e / g.fw;
      const int fy = r % g.fh;
      r /= g.fh;
      const int c = r % cn;
      const int img = r / cn;
      const int64_t b = b_base + img;
      const int ih = ih_base + fy, iw = iw_base + fx;
      A v = A(0);
      if (b < g.batch && static_cast<unsigned>(ih) < static_cast<unsigned>(g.height) &&
          static_cast<unsigned>(iw) < static_cast<unsigned>(g.width)) {
        v = load_acc<A>(x + ((b * g.channels + c0 + c) * g.height + ih) * g.width + iw);
      }
      xs[(img * g.chunk + c) * fhw + fy * g.fw + fx] = v;
    }
    __syncthreads();
    if (!computes) continue;
    const int c1 = c0 + cn;
#pragma unroll
    for (int o = 0; o < kOC; ++o) {
      const int e = send[o];
      for (int p = spos[o]; p < e; ++p) {
        const int4 rec = __ldg(records + p);  // {chan, dy, dx, 0}: same in every lane
        if (rec.x >= c1) break;
        const A v = __ldg(values + p);
        const int off = my_base + (rec.x - c0) * fhw + rec.y * g.fw + rec.z;
#pragma unroll
        for (int k = 0; k < kImgS; ++k) acc[o][k] = fma(v, xs[off + k * g.chunk * fhw], acc[o][k]);
      }
    }
  }
  if (!computes) return;
  const int64_t plane_out = g.out_h * g.out_w;
#pragma unroll
  for (int o = 0; o < kOC; ++o) {
    if (o0 + o >= o1) break;
    const A bo = __ldg(bias + o0 + o);
#pragma unroll
    for (int k = 0; k < kImgS; ++k) {
      const int64_t b = b_base + slot * kImgS + k;
      if (b < g.batch) {
        A out = acc[o][k] + bo;
        if (relu && out < A(0)) out = A(0);  // comparisons keep NaN, like jnp.maximum
        store_from(y + (b * g.out_channels + o0 + o) * plane_out + oh * g.out_w + ow, out);
      }
    }
  }
}

template <typename T, typename A>
ffi::Error launch_direct(cudaStream_t stream, const T* x, const int4* records, const A* values,
                         const A* bias, const int32_t* indptr, T* y, ConvGeom g, bool relu) {
  const int64_t plane_out = g.out_h * g.out_w;
  const int64_t groups = (g.batch + kImg - 1) / kImg;
  const int64_t pixel_blocks = (groups * plane_out + kConvThreads - 1) / kConvThreads;
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
  sparse_conv_kernel<T, A><<<grid, kConvThreads, 0, stream>>>(x, records, values, bias, indptr,
                                                              y, g, relu);
  return last_launch_error("sparse_conv2d (direct)");
}

// Plans the staged kernel's tiles; false when one channel's footprint does not fit
// in the shared-memory budget or the grid is too large (then the direct kernel runs).
template <typename A>
bool plan_staged(StagedGeom& s, int window_h, int window_w, int64_t* blocks, size_t* smem) {
  s.tw = static_cast<int>(std::min<int64_t>(s.out_w, kConvThreads));
  s.th = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(s.out_h, kConvThreads / s.tw)));
  const int64_t img_groups_total = (s.batch + kImgS - 1) / kImgS;
  s.slots = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(kConvThreads / (s.th * s.tw), img_groups_total)));
  s.fh = (s.th - 1) * s.sh + window_h;
  s.fw = (s.tw - 1) * s.sw + window_w;
  const int64_t per_channel = static_cast<int64_t>(s.slots) * kImgS * s.fh * s.fw * sizeof(A);
  const int64_t span = std::min<int64_t>(s.channels, (kOC + s.og - 1) / s.og * s.cg + s.cg);
  s.chunk = static_cast<int>(std::min<int64_t>(kStageBytes / per_channel, span));
  if (s.chunk < 1) return false;
  s.tiles_h = static_cast<int>((s.out_h + s.th - 1) / s.th);
  s.tiles_w = static_cast<int>((s.out_w + s.tw - 1) / s.tw);
  s.oc_blocks = static_cast<int>((s.out_channels + kOC - 1) / kOC);
  const int64_t img_blocks = (s.batch + s.slots * kImgS - 1) / (s.slots * kImgS);
  *blocks = img_blocks * s.tiles_h * s.tiles_w * s.oc_blocks;
  *smem = static_cast<size_t>(per_channel) * s.chunk;
  return *blocks < (int64_t{1} << 31);
}

template <typename T, typename A>
ffi::Error launch(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer records,
                  ffi::AnyBuffer values, ffi::AnyBuffer bias, const int32_t* indptr,
                  ffi::Result<ffi::AnyBuffer> y, ConvGeom g, int groups, int window_h,
                  int window_w, bool relu) {
  if (g.batch == 0 || g.out_h * g.out_w == 0 || g.out_channels == 0) {
    return ffi::Error::Success();
  }
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  const int4* rp = reinterpret_cast<const int4*>(records.untyped_data());
  const A* vp = reinterpret_cast<const A*>(values.untyped_data());
  const A* bp = reinterpret_cast<const A*>(bias.untyped_data());
  T* yp = reinterpret_cast<T*>(y->untyped_data());
  static const bool force_direct = std::getenv("SPDNN_CONV_DIRECT") != nullptr;
  StagedGeom s{g.batch, g.channels, g.height, g.width, g.out_channels, g.out_h, g.out_w,
               g.sh, g.sw, g.pt, g.pl};
  s.cg = static_cast<int>(g.channels / groups);
  s.og = static_cast<int>(g.out_channels / groups);
  int64_t blocks = 0;
  size_t smem = 0;
  if (force_direct || !plan_staged<A>(s, window_h, window_w, &blocks, &smem)) {
    return launch_direct<T, A>(stream, xp, rp, vp, bp, indptr, yp, g, relu);
  }
  sparse_conv_staged<T, A><<<static_cast<unsigned>(blocks), kConvThreads, smem, stream>>>(
      xp, rp, vp, bp, indptr, yp, s, relu);
  return last_launch_error("sparse_conv2d (staged)");
}

ffi::Error sparse_conv_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer records,
                            ffi::AnyBuffer values, ffi::AnyBuffer bias,
                            ffi::Buffer<ffi::S32> indptr, ffi::Result<ffi::AnyBuffer> y,
                            int64_t stride_h, int64_t stride_w, int64_t pad_top,
                            int64_t pad_left, int32_t activation, int64_t groups,
                            int64_t window_h, int64_t window_w) {
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
  const int ng = static_cast<int>(groups), wh = static_cast<int>(window_h),
            ww = static_cast<int>(window_w);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return launch<float, float>(stream, x, records, values, bias, ip, y, g, ng, wh, ww, relu);
    case ffi::DataType::F64:
      return launch<double, double>(stream, x, records, values, bias, ip, y, g, ng, wh, ww, relu);
    case ffi::DataType::BF16:
      return launch<__nv_bfloat16, float>(stream, x, records, values, bias, ip, y, g, ng, wh, ww, relu);
    case ffi::DataType::F16:
      return launch<__half, float>(stream, x, records, values, bias, ip, y, g, ng, wh, ww, relu);
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
                                  .Attr<int32_t>("activation")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("window_h")     // dilated filter extent
                                  .Attr<int64_t>("window_w"));
