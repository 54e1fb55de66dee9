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
// nonzeros of OC output channels to it (weights broadcast: every lane reads the same
// record; each thread accumulates OC channels x IMG images in registers).  Staged
// values are reused by all the block's nonzeros that touch them, which is what makes
// the kernel fast: L2 traffic falls by about OC x density x taps.
//
// sparse_conv_kernel (fallback, when one channel's footprint exceeds the shared-memory
// budget, or SPDNN_CONV_CONFIG=direct): the Escort kernel proper, one thread per output
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
// A block owns a tile of output pixels (whole rows where they fit) for `slots` x IMG
// images and OC output channels.  It stages the tile's input footprint (zero-padded,
// so no bounds tests) for a chunk of input channels in shared memory, then applies
// the nonzeros of its OC channels that fall into the staged channels: chan_ptr[o][c]
// (first nonzero of o at local channel >= c, precomputed with the structure) gives
// each channel's range for the chunk without searching, so the inner loop has a
// known trip count and its broadcast loads pipeline.  Each staged value is reused by
// every nonzero of the block's channels that touches it (about OC x density x taps
// times); accumulators (OC x IMG) stay in registers.
constexpr int kStageBytes = 48 * 1024;

struct StagedGeom {
  int64_t batch, channels, height, width, out_channels, out_h, out_w;
  int sh, sw, pt, pl;
  int th, tw, fh, fw, slots, chunk, tiles_h, tiles_w, oc_blocks, cg, og;
};

template <typename T, typename A, int OC, int IMG>
__global__ void __launch_bounds__(kConvThreads, (OC * IMG * sizeof(A) <= 128   ? 3
                                                  : OC * IMG * sizeof(A) <= 256 ? 2
                                                                                : 1))
    sparse_conv_staged(const T* __restrict__ x, const int4* __restrict__ records,
                       const A* __restrict__ values, const A* __restrict__ bias,
                       const int32_t* __restrict__ chan_ptr, T* __restrict__ y, StagedGeom g,
                       bool relu) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* xs = reinterpret_cast<A*>(smem_raw);
  const int fhw = g.fh * g.fw;
  const int img_per_block = g.slots * IMG;
  // Block -> (image group, tile, output-channel block), channel block fastest so that
  // blocks sharing inputs run together.
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

  const int o0 = ocb * OC;
  const int o1 = static_cast<int>(min(static_cast<int64_t>(o0 + OC), g.out_channels));
  const int c_begin = (o0 / g.og) * g.cg;  // input channels of the block's groups
  const int c_end = ((o1 - 1) / g.og + 1) * g.cg;

  A acc[OC][IMG];
#pragma unroll
  for (int o = 0; o < OC; ++o) {
#pragma unroll
    for (int k = 0; k < IMG; ++k) acc[o][k] = A(0);
  }
  const int img_stride = g.chunk * fhw;
  const int my_base = slot * IMG * img_stride + ty * g.sh * g.fw + tx * g.sw;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int c0 = c_begin; c0 < c_end; c0 += g.chunk) {
    const int cn = min(g.chunk, c_end - c0);
    __syncthreads();
    // Stage rows (image, channel, footprint row): a warp per row, lanes along it.
    const int rows = img_per_block * cn * g.fh;
    for (int r = warp; r < rows; r += kConvThreads / 32) {
      const int fy = r % g.fh;
      const int c = (r / g.fh) % cn;
      const int img = r / (g.fh * cn);
      const int64_t b = b_base + img;
      const int ih = ih_base + fy;
      const bool row_ok = b < g.batch && static_cast<unsigned>(ih) < static_cast<unsigned>(g.height);
      const T* src = x + ((b * g.channels + c0 + c) * g.height + ih) * g.width;
      A* dst = xs + (img * g.chunk + c) * fhw + fy * g.fw;
      for (int fx = lane; fx < g.fw; fx += 32) {
        const int iw = iw_base + fx;
        dst[fx] = row_ok && static_cast<unsigned>(iw) < static_cast<unsigned>(g.width)
                      ? load_acc<A>(src + iw) : A(0);
      }
    }
    __syncthreads();
    if (!computes) continue;
#pragma unroll
    for (int o = 0; o < OC; ++o) {
      if (o0 + o < o1) {
        // This channel's nonzeros with input channel in [c0, c0 + cn) (its group's part).
        const int* cp = chan_ptr + static_cast<int64_t>(o0 + o) * (g.cg + 1);
        const int cbase = ((o0 + o) / g.og) * g.cg;
        const int lo = min(max(c0 - cbase, 0), g.cg), hi = min(max(c0 + cn - cbase, 0), g.cg);
        const int p_end = __ldg(cp + hi);
        const int rel = my_base - c0 * fhw;
#pragma unroll 4
        for (int p = __ldg(cp + lo); p < p_end; ++p) {
          const int4 rec = __ldg(records + p);  // {chan, dy, dx, 0}: same in every lane
          const A v = __ldg(values + p);
          const int off = rel + rec.x * fhw + rec.y * g.fw + rec.z;
#pragma unroll
          for (int k = 0; k < IMG; ++k) acc[o][k] = fma(v, xs[off + k * img_stride], acc[o][k]);
        }
      }
    }
  }
  if (!computes) return;
  const int64_t plane_out = g.out_h * g.out_w;
#pragma unroll
  for (int o = 0; o < OC; ++o) {
    if (o0 + o < o1) {
      const A bo = __ldg(bias + o0 + o);
#pragma unroll
      for (int k = 0; k < IMG; ++k) {
        const int64_t b = b_base + slot * IMG + k;
        if (b < g.batch) {
          A out = acc[o][k] + bo;
          if (relu && out < A(0)) out = A(0);  // comparisons keep NaN, like jnp.maximum
          store_from(y + (b * g.out_channels + o0 + o) * plane_out + oh * g.out_w + ow, out);
        }
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
template <typename A, int OC, int IMG>
bool plan_staged(StagedGeom& s, int window_h, int window_w, int64_t* blocks, size_t* smem) {
  s.tw = static_cast<int>(std::min<int64_t>(s.out_w, kConvThreads));
  s.th = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(s.out_h, kConvThreads / s.tw)));
  const int64_t img_groups_total = (s.batch + IMG - 1) / IMG;
  s.slots = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(kConvThreads / (s.th * s.tw), img_groups_total)));
  s.fh = (s.th - 1) * s.sh + window_h;
  s.fw = (s.tw - 1) * s.sw + window_w;
  const int64_t per_channel = static_cast<int64_t>(s.slots) * IMG * s.fh * s.fw * sizeof(A);
  const int64_t span = std::min<int64_t>(s.channels, (OC + s.og - 1) / s.og * s.cg + s.cg);
  s.chunk = static_cast<int>(std::min<int64_t>(kStageBytes / per_channel, span));
  if (s.chunk < 1) return false;
  s.tiles_h = static_cast<int>((s.out_h + s.th - 1) / s.th);
  s.tiles_w = static_cast<int>((s.out_w + s.tw - 1) / s.tw);
  s.oc_blocks = static_cast<int>((s.out_channels + OC - 1) / OC);
  const int64_t img_blocks = (s.batch + s.slots * IMG - 1) / (s.slots * IMG);
  *blocks = img_blocks * s.tiles_h * s.tiles_w * s.oc_blocks;
  *smem = static_cast<size_t>(per_channel) * s.chunk;
  return *blocks < (int64_t{1} << 31);
}

template <typename T, typename A, int OC, int IMG>
bool try_staged(cudaStream_t stream, const T* x, const int4* records, const A* values,
                const A* bias, const int32_t* chan_ptr, T* y, StagedGeom s, int window_h,
                int window_w, bool relu) {
  int64_t blocks = 0;
  size_t smem = 0;
  if (!plan_staged<A, OC, IMG>(s, window_h, window_w, &blocks, &smem)) return false;
  sparse_conv_staged<T, A, OC, IMG><<<static_cast<unsigned>(blocks), kConvThreads, smem, stream>>>(
      x, records, values, bias, chan_ptr, y, s, relu);
  return true;
}

// Staged configurations (output channels x images per thread); SPDNN_CONV_CONFIG
// picks one for tuning runs ("direct" forces the direct kernel).
template <typename T, typename A>
ffi::Error launch(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer records,
                  ffi::AnyBuffer values, ffi::AnyBuffer bias, const int32_t* indptr,
                  const int32_t* chan_ptr, ffi::Result<ffi::AnyBuffer> y, ConvGeom g,
                  int groups, int window_h, int window_w, bool relu) {
  if (g.batch == 0 || g.out_h * g.out_w == 0 || g.out_channels == 0) {
    return ffi::Error::Success();
  }
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  const int4* rp = reinterpret_cast<const int4*>(records.untyped_data());
  const A* vp = reinterpret_cast<const A*>(values.untyped_data());
  const A* bp = reinterpret_cast<const A*>(bias.untyped_data());
  T* yp = reinterpret_cast<T*>(y->untyped_data());
  static const std::string config = [] {
    const char* env = std::getenv("SPDNN_CONV_CONFIG");
    return std::string(env ? env : "");
  }();
  StagedGeom s{g.batch, g.channels, g.height, g.width, g.out_channels, g.out_h, g.out_w,
               g.sh, g.sw, g.pt, g.pl};
  s.cg = static_cast<int>(g.channels / groups);
  s.og = static_cast<int>(g.out_channels / groups);
  bool done = false;
  if (config == "32x2") {
    done = try_staged<T, A, 32, 2>(stream, xp, rp, vp, bp, chan_ptr, yp, s, window_h, window_w, relu);
  } else if (config == "16x2") {
    done = try_staged<T, A, 16, 2>(stream, xp, rp, vp, bp, chan_ptr, yp, s, window_h, window_w, relu);
  } else if (config == "8x4") {
    done = try_staged<T, A, 8, 4>(stream, xp, rp, vp, bp, chan_ptr, yp, s, window_h, window_w, relu);
  } else if (config != "direct") {
    done = try_staged<T, A, 16, 4>(stream, xp, rp, vp, bp, chan_ptr, yp, s, window_h, window_w, relu);
  }
  if (!done) return launch_direct<T, A>(stream, xp, rp, vp, bp, indptr, yp, g, relu);
  return last_launch_error("sparse_conv2d (staged)");
}

ffi::Error sparse_conv_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer records,
                            ffi::AnyBuffer values, ffi::AnyBuffer bias,
                            ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> chan_ptr,
                            ffi::Result<ffi::AnyBuffer> y,
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
  if (static_cast<int64_t>(chan_ptr.element_count()) != g.out_channels * (g.channels / groups + 1)) {
    return ffi::Error::InvalidArgument("sparse_conv2d: chan_ptr must be [O, C / groups + 1]");
  }
  const int32_t* cp = chan_ptr.typed_data();
  const int ng = static_cast<int>(groups), wh = static_cast<int>(window_h),
            ww = static_cast<int>(window_w);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return launch<float, float>(stream, x, records, values, bias, ip, cp, y, g, ng, wh, ww,
                                relu);
    case ffi::DataType::F64:
      return launch<double, double>(stream, x, records, values, bias, ip, cp, y, g, ng, wh, ww,
                                relu);
    case ffi::DataType::BF16:
      return launch<__nv_bfloat16, float>(stream, x, records, values, bias, ip, cp, y, g, ng, wh, ww,
                                relu);
    case ffi::DataType::F16:
      return launch<__half, float>(stream, x, records, values, bias, ip, cp, y, g, ng, wh, ww,
                                relu);
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
