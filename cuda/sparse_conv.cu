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

// ---- The tiled kernel (stride 1, dilation 1, KW in {1, 3, 5}; float accumulation) ----------
//
// A block owns 32 strips of P consecutive output pixels of one output row ("strips",
// enumerated over (image, output row, strip)) and 8 groups of kT = 8 output channels,
// one group per warp (lane = strip).  The input rows the 32 strips need (padding as
// zeros) are staged in shared memory for a chunk of input channels at a time, double
// buffered with cp.async, and shared by the 8 warps: each staged value serves 64 output
// channels.  For each (input channel, filter row) a lane loads its strip's P + KW - 1
// inputs into registers once; every nonzero of the warp's 8 channels at that (channel,
// row) then applies to them from registers: the nonzero's code (channel in the group,
// filter column) selects, through a warp-uniform switch, a fully unrolled block of P
// FMAs with static register indices.  One staged load thus feeds up to 8 x KW nonzeros
// (the direct kernel does one global load per multiply-add).  Nonzeros are packed once
// per filter (jax_spdnn.conv.conv_tile_packing) by (channel group, input channel, filter
// row), then channel in the group and filter column: every output still sums its
// nonzeros in CSR order, one thread per output, no atomics.
//
// Opt-in (SPDNN_CONV_KERNEL=tiled): on an H200 it runs at 0.30-0.85x the direct kernel's speed
// on the benchmark suite (benchmarks/RESULTS.md), so the direct kernel stays the default.

constexpr int kTileThreads = 256;
constexpr int kTileWarps = kTileThreads / 32;
constexpr int kTileT = 8;        // output channels per warp
constexpr int kTileMaxK = 4;     // staged elements per thread and channel (span * Wv <= 1024)
constexpr int kTileStageBytes = 48 << 10;  // shared memory per stage (two stages per block)

struct TileGeom {
  int64_t batch, strips, q_base;
  int channels, height, width, out_channels, out_h, out_w;
  int pt, pl, kh, groups, cg, og, ngtg, cbpg, spr, wv, cc;
};

__device__ __forceinline__ void prefetch_l1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p));
}

__device__ __forceinline__ void cp_async_wait_one() {
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}

template <int S, int P, int t, int s>
__device__ __forceinline__ void tile_tap(float (&acc)[kTileT][P], const float (&hx)[P + S - 1],
                                         float w) {
#pragma unroll
  for (int i = 0; i < P; ++i) acc[t][i] = fmaf(w, hx[s + i], acc[t][i]);
}

#define SPDNN_TILE_CASE(q)                                                             \
  case q:                                                                              \
    if constexpr ((q) < kTileT * S) tile_tap<S, P, (q) / S, (q) % S>(acc, hx, w);      \
    break;
#define SPDNN_TILE_CASE8(b)                                                            \
  SPDNN_TILE_CASE(b + 0) SPDNN_TILE_CASE(b + 1) SPDNN_TILE_CASE(b + 2)                 \
  SPDNN_TILE_CASE(b + 3) SPDNN_TILE_CASE(b + 4) SPDNN_TILE_CASE(b + 5)                 \
  SPDNN_TILE_CASE(b + 6) SPDNN_TILE_CASE(b + 7)

template <typename Tx>
__device__ __forceinline__ void stage_elem(float* dst, const Tx* src, bool valid) {
  if constexpr (std::is_same_v<Tx, float>) {
    cp_async4(dst, src, valid);
  } else {
    *dst = valid ? load_acc<float>(src) : 0.0f;
  }
}

template <typename Tx, int S, int P>
__global__ void __launch_bounds__(kTileThreads, 2)
    sparse_conv_tiled_kernel(const Tx* __restrict__ x, const int2* __restrict__ recs,
                             const int32_t* __restrict__ ptr, const float* __restrict__ bias,
                             Tx* __restrict__ y, TileGeom g, bool relu) {
  extern __shared__ float tile_sm[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gi = blockIdx.x / g.cbpg;
  const int gtl = (blockIdx.x % g.cbpg) * kTileWarps + warp;  // channel group in conv group
  const bool warp_on = gtl < g.ngtg;
  const int64_t gt = static_cast<int64_t>(gi) * g.ngtg + gtl;
  const int64_t per_image = static_cast<int64_t>(g.out_h) * g.spr;
  const int vrows = g.out_h + g.kh - 1;  // virtual (padded) input rows per image
  auto vrow = [&](int64_t q) {
    const int64_t n = q / per_image;
    const int oh = static_cast<int>((q % per_image) / g.spr);
    return n * vrows + oh;
  };
  const int64_t q0 = g.q_base + static_cast<int64_t>(blockIdx.y) * 32;
  const int64_t qlast = min(q0 + 31, g.strips - 1);
  const int64_t vlo = vrow(q0);
  const int span = static_cast<int>(vrow(qlast) - vlo) + g.kh;
  const int elems = span * g.wv;  // staged floats per channel
  const int64_t q = q0 + lane;
  const bool lane_on = q < g.strips;
  const int64_t qq = lane_on ? q : qlast;
  const int64_t n_img = qq / per_image;
  const int oh = static_cast<int>((qq % per_image) / g.spr);
  const int ow0 = static_cast<int>(qq % g.spr) * P;
  const int lane_base = static_cast<int>(vrow(qq) - vlo) * g.wv + ow0;

  // Staging positions of this thread (the same in every channel).
  const int64_t plane = static_cast<int64_t>(g.height) * g.width;
  const Tx* xg = x + static_cast<int64_t>(gi) * g.cg * plane;
  int64_t goff[kTileMaxK];
  bool gval[kTileMaxK];
#pragma unroll
  for (int k = 0; k < kTileMaxK; ++k) {
    const int e = threadIdx.x + k * kTileThreads;
    const int v = e / g.wv, j = e % g.wv;
    const int64_t vg = vlo + v;
    const int64_t n = vg / vrows;
    const int ih = static_cast<int>(vg % vrows) - g.pt, iw = j - g.pl;
    gval[k] = e < elems && n < g.batch && ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
    goff[k] = gval[k] ? (n * g.channels * plane + static_cast<int64_t>(ih) * g.width + iw) : 0;
  }
  auto stage = [&](int buf, int c_begin) {
    float* dst = tile_sm + static_cast<int64_t>(buf) * g.cc * elems;
    const int nc = min(g.cc, g.cg - c_begin);
    for (int cl = 0; cl < nc; ++cl) {
      const Tx* src = xg + static_cast<int64_t>(c_begin + cl) * plane;
#pragma unroll
      for (int k = 0; k < kTileMaxK; ++k) {
        const int e = threadIdx.x + k * kTileThreads;
        if (e < elems) stage_elem(dst + cl * elems + e, src + goff[k], gval[k]);
      }
    }
  };

  float acc[kTileT][P];
#pragma unroll
  for (int t = 0; t < kTileT; ++t)
#pragma unroll
    for (int i = 0; i < P; ++i) acc[t][i] = 0.0f;

  // The warp's nonzeros are read once per block, in order: prefetch a chunk's records and
  // row pointers into L1 while the chunk before it computes.
  auto prefetch_chunk = [&](int c_begin) {
    if (!warp_on) return;
    const int rows = min(g.cc, g.cg - c_begin) * g.kh;
    const int32_t* rp = ptr + (gt * g.cg + c_begin) * g.kh;
    for (int i = lane * 32; i <= rows; i += 32 * 32) prefetch_l1(rp + i);
    const int e_b = __ldg(rp), e_e = __ldg(rp + rows);
    for (int i = e_b + lane * 16; i < e_e; i += 32 * 16) prefetch_l1(recs + i);
  };
  const int chunks = (g.cg + g.cc - 1) / g.cc;
  stage(0, 0);
  cp_async_commit();
  prefetch_chunk(0);
  for (int ch = 0; ch < chunks; ++ch) {
    if (ch + 1 < chunks) {
      stage((ch + 1) & 1, (ch + 1) * g.cc);
      prefetch_chunk((ch + 1) * g.cc);
      cp_async_commit();
      cp_async_wait_one();
    } else {
      cp_async_wait_all();
    }
    __syncthreads();
    if (warp_on) {
      const float* sb = tile_sm + static_cast<int64_t>(ch & 1) * g.cc * elems + lane_base;
      const int nc = min(g.cc, g.cg - ch * g.cc);
      const int32_t* rp = ptr + (gt * g.cg + static_cast<int64_t>(ch) * g.cc) * g.kh;
      int e = __ldg(rp);
      for (int cr = 0; cr < nc * g.kh; ++cr) {
        const int e_end = __ldg(rp + cr + 1);
        if (e == e_end) continue;
        const int cl = cr / g.kh, r = cr - cl * g.kh;
        const float* row = sb + cl * elems + r * g.wv;
        float hx[P + S - 1];
#pragma unroll
        for (int j = 0; j < P + S - 1; ++j) hx[j] = row[j];
        int2 rec = __ldg(recs + e);
        for (; e < e_end; ++e) {
          const int code = rec.x;
          const float w = __int_as_float(rec.y);
          if (e + 1 < e_end) rec = __ldg(recs + e + 1);
          switch (code) {
            SPDNN_TILE_CASE8(0)
            SPDNN_TILE_CASE8(8)
            SPDNN_TILE_CASE8(16)
            SPDNN_TILE_CASE8(24)
            SPDNN_TILE_CASE8(32)
            default:
              __builtin_unreachable();
          }
        }
      }
    }
    __syncthreads();
  }
  if (!warp_on || !lane_on) return;
#pragma unroll
  for (int t = 0; t < kTileT; ++t) {
    const int ol = gtl * kTileT + t;
    if (ol >= g.og) break;
    const int o = gi * g.og + ol;
    const float b = __ldg(bias + o);
    Tx* yr = y + ((n_img * g.out_channels + o) * g.out_h + oh) * static_cast<int64_t>(g.out_w) + ow0;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if (ow0 + i < g.out_w) {
        float out = acc[t][i] + b;
        if (relu && out < 0.0f) out = 0.0f;  // comparisons keep NaN, like jnp.maximum
        store_from(yr + i, out);
      }
    }
  }
}
#undef SPDNN_TILE_CASE8
#undef SPDNN_TILE_CASE

template <typename Tx, int S, int P>
ffi::Error launch_tiled(cudaStream_t stream, const Tx* x, const int2* recs, const int32_t* ptr,
                        const float* bias, Tx* y, TileGeom g, bool relu, int64_t span_max) {
  auto kernel = sparse_conv_tiled_kernel<Tx, S, P>;
  const int64_t per_chan = span_max * g.wv * static_cast<int64_t>(sizeof(float));
  g.cc = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({g.cg, 32, kTileStageBytes / per_chan})));
  const size_t smem = 2 * static_cast<size_t>(g.cc) * per_chan;
  if (smem > (48 << 10)) {
    // Per call: the limit belongs to the current device's context (one set per process would
    // leave other GPUs at the default).  Always the same value, so it never lowers.
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           2 * kTileStageBytes);
    if (err != cudaSuccess) {
      return ffi::Error::Internal(std::string("sparse_conv2d (tiled): cudaFuncSetAttribute: ") +
                                  cudaGetErrorString(err));
    }
  }
  const int64_t strip_blocks = (g.strips + 31) / 32;
  const unsigned gx = static_cast<unsigned>(g.groups * g.cbpg);
  for (int64_t b0 = 0; b0 < strip_blocks; b0 += 65535) {
    const int64_t nb = std::min<int64_t>(65535, strip_blocks - b0);
    g.q_base = b0 * 32;
    kernel<<<dim3(gx, static_cast<unsigned>(nb)), kTileThreads, smem, stream>>>(x, recs, ptr, bias,
                                                                                 y, g, relu);
  }
  return last_launch_error("sparse_conv2d (tiled)");
}

template <typename Tx>
ffi::Error dispatch_tiled(cudaStream_t stream, const void* x, const int2* recs, const int32_t* ptr,
                          const float* bias, void* y, TileGeom g, bool relu, int64_t span_max,
                          int kw, int strip) {
  const Tx* xt = reinterpret_cast<const Tx*>(x);
  Tx* yt = reinterpret_cast<Tx*>(y);
#define SPDNN_TILED(S, P)                                                                \
  if (kw == S && strip == P) return launch_tiled<Tx, S, P>(stream, xt, recs, ptr, bias, yt, g, relu, span_max);
  SPDNN_TILED(3, 8)
  SPDNN_TILED(5, 8)
  SPDNN_TILED(1, 8)
  if constexpr (std::is_same_v<Tx, float>) {
    SPDNN_TILED(3, 7)
    SPDNN_TILED(5, 7)
    SPDNN_TILED(1, 7)
  }
#undef SPDNN_TILED
  return ffi::Error::InvalidArgument("sparse_conv2d (tiled): unsupported kernel width / strip");
}

ffi::Error sparse_conv_tiled_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> recs,
                                  ffi::Buffer<ffi::S32> ptr, ffi::Buffer<ffi::F32> bias,
                                  ffi::Result<ffi::AnyBuffer> y, int64_t pad_top, int64_t pad_left,
                                  int64_t kernel_h, int64_t kernel_w, int64_t groups,
                                  int64_t strip, int32_t activation) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("sparse_conv2d (tiled): x and y must be NCHW arrays");
  }
  if (groups < 1 || xd[1] % groups || yd[1] % groups || kernel_h < 1 || strip < 1) {
    return ffi::Error::InvalidArgument("sparse_conv2d (tiled): bad groups, kernel or strip");
  }
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("sparse_conv2d (tiled): x and y must share a dtype");
  }
  if (xd[1] * xd[2] * xd[3] >= (int64_t{1} << 31) || yd[1] * yd[2] * yd[3] >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("sparse_conv2d (tiled): one image must have fewer than 2^31 elements");
  }
  TileGeom g{};
  g.batch = xd[0];
  g.channels = static_cast<int>(xd[1]);
  g.height = static_cast<int>(xd[2]);
  g.width = static_cast<int>(xd[3]);
  g.out_channels = static_cast<int>(yd[1]);
  g.out_h = static_cast<int>(yd[2]);
  g.out_w = static_cast<int>(yd[3]);
  g.pt = static_cast<int>(pad_top);
  g.pl = static_cast<int>(pad_left);
  g.kh = static_cast<int>(kernel_h);
  g.groups = static_cast<int>(groups);
  g.cg = g.channels / g.groups;
  g.og = g.out_channels / g.groups;
  g.ngtg = (g.og + kTileT - 1) / kTileT;
  g.cbpg = (g.ngtg + kTileWarps - 1) / kTileWarps;
  g.spr = static_cast<int>((g.out_w + strip - 1) / strip);
  g.wv = g.spr * static_cast<int>(strip) + static_cast<int>(kernel_w) - 1;
  g.wv |= 1;  // odd row pitch: lanes on consecutive rows hit different banks
  g.strips = g.batch * g.out_h * g.spr;
  if (static_cast<int64_t>(ptr.element_count()) !=
      static_cast<int64_t>(g.groups) * g.ngtg * g.cg * g.kh + 1) {
    return ffi::Error::InvalidArgument("sparse_conv2d (tiled): packing does not match the geometry");
  }
  if (static_cast<int64_t>(bias.element_count()) != g.out_channels ||
      recs.element_count() % 2 != 0) {
    return ffi::Error::InvalidArgument("sparse_conv2d (tiled): inconsistent buffer sizes");
  }
  if (g.strips == 0 || g.out_channels == 0) return ffi::Error::Success();
  // Rows staged per block, at most: the same rule as jax_spdnn.conv.tile_plan.
  const int64_t per_image = static_cast<int64_t>(g.out_h) * g.spr;
  const int64_t vrows = g.out_h + g.kh - 1;
  auto vrow = [&](int64_t q) { return q / per_image * vrows + (q % per_image) / g.spr; };
  int64_t span_max = 0;
  for (int64_t q0 = 0; q0 < g.strips; q0 += 32) {
    const int64_t ql = std::min(q0 + 31, g.strips - 1);
    span_max = std::max(span_max, vrow(ql) - vrow(q0) + g.kh);
  }
  if (span_max * g.wv > static_cast<int64_t>(kTileMaxK) * kTileThreads) {
    return ffi::Error::InvalidArgument("sparse_conv2d (tiled): staged rows too wide for this kernel");
  }
  const bool relu = activation == 1;
  const int2* rc = reinterpret_cast<const int2*>(recs.typed_data());
  const int kw = static_cast<int>(kernel_w), p = static_cast<int>(strip);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return dispatch_tiled<float>(stream, x.untyped_data(), rc, ptr.typed_data(),
                                   bias.typed_data(), y->untyped_data(), g, relu, span_max, kw, p);
    case ffi::DataType::BF16:
      return dispatch_tiled<__nv_bfloat16>(stream, x.untyped_data(), rc, ptr.typed_data(),
                                           bias.typed_data(), y->untyped_data(), g, relu,
                                           span_max, kw, p);
    case ffi::DataType::F16:
      return dispatch_tiled<__half>(stream, x.untyped_data(), rc, ptr.typed_data(),
                                    bias.typed_data(), y->untyped_data(), g, relu, span_max, kw, p);
    default:
      return ffi::Error::InvalidArgument("sparse_conv2d (tiled): unsupported feature dtype");
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseConvTiledCuda, spdnn::cuda::sparse_conv_tiled_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [B, C, H, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // records [nnz, 2]: code, value bits
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ptr [groups*ngt*Cg*KH + 1]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [O]
                                  .Ret<ffi::AnyBuffer>()         // y [B, O, OH, OW]
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("kernel_h")
                                  .Attr<int64_t>("kernel_w")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("strip")
                                  .Attr<int32_t>("activation"));
