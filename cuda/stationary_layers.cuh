// The stationary-rows network kernel of SparseDNN: several consecutive layers per
// launch on a tile of feature rows kept in shared memory, for the network's tail.
//
// After the first layers of a Graph Challenge network only a few thousand rows are
// left (1024-120: ~1900 of 60000 after layer 10), and a layer of the footprint kernel
// costs ~23 us plus a ~6 us compaction for work that moves ~8 MB: the launches are too
// small to fill the device and each pays the pipeline's start-up.  Rows are
// independent through the whole network, so a block that owns a tile of R rows can run
// many layers on it without meeting another block:
//
//   - the tile's R whole rows (n + 1 columns: column n stays zero for padding slots)
//     sit in shared memory, input i of row r at word i * P + r with P = R + 4: a
//     16-byte load gives four rows of one input, and lanes whose inputs differ modulo 8
//     hit different bank quads (P / 4 is odd);
//   - each thread owns OPT outputs of the layer (one per 1024 outputs) and keeps their
//     R sums in registers; the weights come from L2 in the stationary layout of
//     `sparse_linear` (jax_spdnn.sparse.pack_stationary with the outputs in footprint
//     order, so outputs with equal input sets share a warp and their loads broadcast):
//     four steps per 16-byte load of values and 8-byte load of 16-bit input indices,
//     each weight applied to R rows;
//   - the outputs are written back into the tile in place once every thread has
//     finished the layer (they are held in registers across the barrier), so one
//     buffer suffices;
//   - per layer one atomic per tile counts the rows with a nonzero output (the
//     network's active counts); with dead rows dropped, a tile whose rows all died
//     stops early.
//
// The launch reads its rows through the footprint path's list (positions in a
// row-interleaved buffer, count on the device) and writes them packed, as a footprint
// layer does, marking rows with a nonzero output in its last layer; compact_rows then
// lists them.  Every output sums its inputs in increasing order with fma, starting
// from zero, then adds the bias, applies ReLU and the clamp: the footprint kernel's
// arithmetic, so results are bit for bit the same (padding slots add 0 * 0, which
// leaves a sum that started at +0 unchanged).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/footprint_layer.cuh"
#include "cuda/fused_layer.cuh"

namespace spdnn::cuda {

constexpr int kStatNetThreads = 1024;

struct StatNetArgs {
  const float* x;            // row-interleaved input buffer (packed positions)
  float* y;                  // row-interleaved output buffer, rows written packed
  const int32_t* src;        // input position of listed row j (nullptr: j)
  const int32_t* count;      // listed rows (device)
  int32_t* alive;            // [rows] set to 1 for rows nonzero after the last layer
  int32_t* active;           // [L] rows with a nonzero output after each layer (added to)
  const float* values;       // stationary slots of the tail layers, all layers
  const uint16_t* indices;   // input of each slot (n for padding)
  const int32_t* group_ptr;  // [tail layers, n_slices + 1] first group of four steps
  const int32_t* perm;       // [tail layers, n] neuron of each reordered output
  const float* bias;         // [L, n]
  int first, last;           // layers of this launch (network numbering)
  int tail0;                 // network number of the first layer of the tail operands
  int n;
  float clip;
  bool drop;
  bool prefetch;  // prefetch each warp's weights two groups ahead into L1
};

// Asks for the 16 bytes of values and 8 bytes of indices of a lane's group in L1.
__device__ __forceinline__ void prefetch_l1(const float4* v, const uint2* i) {
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(v));
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(i));
}

// Shared-memory bytes of a tile of R rows of width n (plus the zero column).
template <int R>
constexpr size_t stat_net_smem(int n) {
  return static_cast<size_t>(n + 1) * (R + 4) * sizeof(float);
}

template <int RB, int R, int OPT>
__global__ void __launch_bounds__(kStatNetThreads, 1) stationary_layers(const StatNetArgs a) {
  static_assert(R % 4 == 0 && RB % R == 0, "tiles of whole 16-byte row groups");
  constexpr int P = R + 4;
  constexpr int Q = R / 4;
  extern __shared__ float4 smem4[];
  float* feat = reinterpret_cast<float*>(smem4);
  __shared__ uint32_t tile_bits[2];
  const int n = a.n, tid = threadIdx.x, lane = tid % 32;
  const int n_slices = (n + 31) / 32;
  const int64_t m = *a.count;
  const int64_t tiles = (m + R - 1) / R;
  const int r_own = tid % R;  // the row this thread stages and writes back
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t j0 = t * R;
    const int valid = static_cast<int>(min(static_cast<int64_t>(R), m - j0));
    {
      const int64_t p = r_own < valid ? (a.src ? a.src[j0 + r_own] : j0 + r_own) : 0;
      for (int c = tid / R; c <= n; c += kStatNetThreads / R) {
        float v = 0.f;
        if (c < n && r_own < valid) v = a.x[interleaved<RB>(p, c, n)];
        feat[c * P + r_own] = v;
      }
    }
    if (tid == 0) tile_bits[a.first & 1] = 0;
    __syncthreads();
    uint32_t mask = 0;
    for (int l = a.first; l < a.last; ++l) {
      const int tl = l - a.tail0;
      const int32_t* gp = a.group_ptr + static_cast<int64_t>(tl) * (n_slices + 1);
      float acc[OPT][R];
      int neuron[OPT];
#pragma unroll
      for (int k = 0; k < OPT; ++k) {
#pragma unroll
        for (int r = 0; r < R; ++r) acc[k][r] = 0.f;
        const int o = k * kStatNetThreads + tid;
        neuron[k] = o < n ? __ldg(a.perm + static_cast<int64_t>(tl) * n + o) : -1;
        const int w = o / 32;  // the warp's slice: uniform
        if (w >= n_slices) continue;
        const int g0 = __ldg(gp + w), g1 = __ldg(gp + w + 1);
        auto apply = [&](float v, uint32_t i) {
          const float4* col = reinterpret_cast<const float4*>(feat + i * P);
#pragma unroll
          for (int q = 0; q < Q; ++q) {
            const float4 f = col[q];
            acc[k][4 * q] = fmaf(v, f.x, acc[k][4 * q]);
            acc[k][4 * q + 1] = fmaf(v, f.y, acc[k][4 * q + 1]);
            acc[k][4 * q + 2] = fmaf(v, f.z, acc[k][4 * q + 2]);
            acc[k][4 * q + 3] = fmaf(v, f.w, acc[k][4 * q + 3]);
          }
        };
        const float4* vp = reinterpret_cast<const float4*>(a.values) + lane;
        const uint2* ip = reinterpret_cast<const uint2*>(a.indices) + lane;
        if (a.prefetch) {  // the first two groups towards L1 (nothing held in registers)
          if (g0 < g1) prefetch_l1(vp + static_cast<int64_t>(g0) * 32, ip + g0 * 32);
          if (g0 + 1 < g1) prefetch_l1(vp + static_cast<int64_t>(g0 + 1) * 32, ip + (g0 + 1) * 32);
        }
#pragma unroll 1
        for (int g = g0; g < g1; ++g) {
          if (a.prefetch && g + 2 < g1) {  // two groups ahead
            prefetch_l1(vp + static_cast<int64_t>(g + 2) * 32, ip + static_cast<int64_t>(g + 2) * 32);
          }
          const float4 v = __ldg(vp + static_cast<int64_t>(g) * 32);
          const uint2 ii = __ldg(ip + static_cast<int64_t>(g) * 32);
          apply(v.x, ii.x & 0xffffu);
          apply(v.y, ii.x >> 16);
          apply(v.z, ii.y & 0xffffu);
          apply(v.w, ii.y >> 16);
        }
      }
      __syncthreads();  // every thread is done reading this layer's inputs
      uint32_t bits = 0;
#pragma unroll
      for (int k = 0; k < OPT; ++k) {
        if (neuron[k] < 0) continue;
        const float b = __ldg(a.bias + static_cast<int64_t>(l) * n + neuron[k]);
        float out[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float v = acc[k][r] + b;
          if (v < 0.f) v = 0.f;
          if (v > a.clip) v = a.clip;
          out[r] = r < valid ? v : 0.f;
          bits |= out[r] != 0.f ? (1u << r) : 0u;
        }
        float4* col = reinterpret_cast<float4*>(feat + neuron[k] * P);
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          col[q] = make_float4(out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3]);
        }
      }
      bits = __reduce_or_sync(0xffffffffu, bits);
      if (lane == 0 && bits) atomicOr(&tile_bits[l & 1], bits);
      __syncthreads();  // the outputs and the tile's marks are in
      mask = tile_bits[l & 1];
      if (tid == 0) {
        tile_bits[(l + 1) & 1] = 0;  // next layer's (all threads read this one above)
        if (mask) atomicAdd(a.active + l, __popc(mask));
      }
      if (a.drop && mask == 0) break;  // every row of the tile died: zero from here on
    }
    // Write the tile back, packed, and mark its rows nonzero after the last layer.
    if (r_own < valid) {
      for (int c = tid / R; c < n; c += kStatNetThreads / R) {
        a.y[interleaved<RB>(j0 + r_own, c, n)] = feat[c * P + r_own];
      }
    }
    if (tid < valid && ((mask >> tid) & 1u)) a.alive[j0 + tid] = 1;
    __syncthreads();  // the tile is free for the next one
  }
}

// Whether the stationary network kernel runs width n on this device: R rows of n + 1
// columns must fit the per-block shared-memory limit.
inline bool stat_net_fits(int n, int r, int device) {
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const size_t need = r == 16 ? stat_net_smem<16>(n) : stat_net_smem<8>(n);
  return n <= 4096 && need + 64 <= static_cast<size_t>(optin);
}

// Tile height for width n: 16 rows up to 2048 outputs, 8 up to 4096 (the sums of OPT
// outputs per thread stay within 32 registers).
inline int stat_net_rows(int n) { return n <= 2048 ? 16 : 8; }

template <int RB, int R, int OPT>
xla::ffi::Error launch_stat_net_t(cudaStream_t stream, const StatNetArgs& a, int64_t rows) {
  auto kernel = stationary_layers<RB, R, OPT>;
  const size_t smem = stat_net_smem<R>(a.n);
  int resident = 0;
  if (auto err = resident_blocks(kernel, smem, &resident, "stationary layers", kStatNetThreads);
      err.failure()) {
    return err;
  }
  const int64_t tiles = (rows + R - 1) / R;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(tiles, resident));
  kernel<<<static_cast<unsigned>(grid), kStatNetThreads, smem, stream>>>(a);
  return last_launch_error("sparse_dnn: stationary layers");
}

// Launches layers [a.first, a.last) on the listed rows (at most `rows`).
template <int RB>
xla::ffi::Error launch_stat_net(cudaStream_t stream, const StatNetArgs& a, int64_t rows) {
  if (a.n <= 1024) return launch_stat_net_t<RB, 16, 1>(stream, a, rows);
  if (a.n <= 2048) return launch_stat_net_t<RB, 16, 2>(stream, a, rows);
  return launch_stat_net_t<RB, 8, 4>(stream, a, rows);
}

}  // namespace spdnn::cuda
