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
//   - outputs with equal input sets form units of K = 1, 2 or 4 (packed by
//     jax_spdnn.sparse.pack_shared_sets, outputs in footprint order): a unit's K threads
//     each hold R / K of the tile's rows and the sums of all K outputs for them, so a
//     16-byte load of four rows of one input feeds 4 K multiply-adds (shared memory,
//     not the FMA units, bounds this kernel: K = 4 cuts its traffic by four); each
//     thread takes OPT unit slots of a layer (OPT * 1024 slots cover it); the weights
//     come from L2, four steps per K 16-byte loads of values and one 8-byte load of
//     16-bit inputs, each weight applied to R / K rows;
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
  bool prefetch;   // prefetch each warp's weights two groups ahead into L1
  bool row_major;  // x is the caller's row-major [rows, n] (src: rows of it), not interleaved
  // The launch runs only when the listed rows number at least min_rows and fewer than
  // max_rows (read on the device): two launches of different tile heights, one of which
  // leaves at once, pick the height by the row count without a host round trip.
  int64_t min_rows;
  int64_t max_rows;
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

template <int RB, int R, int OPT, int K>
__global__ void __launch_bounds__(kStatNetThreads, 1) stationary_layers(const StatNetArgs a) {
  static_assert(R % (4 * K) == 0 && RB % R == 0, "tiles of whole 16-byte row groups");
  constexpr int P = R + 4;
  constexpr int RK = R / K;  // rows per thread
  constexpr int UW = 32 / K;  // units per warp
  extern __shared__ float4 smem4[];
  float* feat = reinterpret_cast<float*>(smem4);
  __shared__ uint32_t tile_bits[2];
  const int n = a.n, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int j = lane / K, part = lane % K;  // unit in the warp's slice, part of the rows
  constexpr int n_slices = OPT * kStatNetThreads / 32;
  const int64_t m = *a.count;
  if (m < a.min_rows || m >= a.max_rows) return;  // the other tile height runs these rows
  const int64_t tiles = (m + R - 1) / R;
  const int r_own = tid % R;  // the row this thread stages and writes back
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t j0 = t * R;
    const int valid = static_cast<int>(min(static_cast<int64_t>(R), m - j0));
    if (a.row_major) {
      // Rows of the caller's x: a warp reads 8 consecutive features (one 32-byte sector)
      // of 4 rows; lane (r, c) writes word c * P + r, and 8 consecutive c times P = R + 4
      // (P / 4 odd) plus r = 0..3 cover the 32 banks once.
      const int rr = lane % 4, cc = lane / 4;
      for (int item = warp; (item / (R / 4)) * 8 <= n; item += kStatNetThreads / 32) {
        const int r = (item % (R / 4)) * 4 + rr;
        const int c = (item / (R / 4)) * 8 + cc;
        if (c > n) continue;
        float v = 0.f;
        if (c < n && r < valid) {
          const int64_t p = a.src ? a.src[j0 + r] : j0 + r;
          v = a.x[p * n + c];
        }
        feat[c * P + r] = v;
      }
    } else {
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
      float acc[OPT][K][RK];
      int neuron[OPT][K];
#pragma unroll
      for (int o = 0; o < OPT; ++o) {
        const int w = o * 32 + warp;  // the warp's slice
        const int unit = w * UW + j;
#pragma unroll
        for (int k = 0; k < K; ++k) {
#pragma unroll
          for (int r = 0; r < RK; ++r) acc[o][k][r] = 0.f;
          neuron[o][k] = __ldg(a.perm + static_cast<int64_t>(tl) * OPT * kStatNetThreads +
                               unit * K + k);
        }
        const int g0 = __ldg(gp + w), g1 = __ldg(gp + w + 1);
        auto apply = [&](const float* v, uint32_t i) {  // v: this step's K values
          const float4* col = reinterpret_cast<const float4*>(feat + i * P + part * RK);
#pragma unroll
          for (int q = 0; q < RK / 4; ++q) {
            const float4 f = col[q];
#pragma unroll
            for (int k = 0; k < K; ++k) {
              acc[o][k][4 * q] = fmaf(v[k], f.x, acc[o][k][4 * q]);
              acc[o][k][4 * q + 1] = fmaf(v[k], f.y, acc[o][k][4 * q + 1]);
              acc[o][k][4 * q + 2] = fmaf(v[k], f.z, acc[o][k][4 * q + 2]);
              acc[o][k][4 * q + 3] = fmaf(v[k], f.w, acc[o][k][4 * q + 3]);
            }
          }
        };
        // Group g: the unit's 4 K values at float4 g * 32 + j * K .., its four inputs at
        // uint2 g * UW + j.
        const float4* vp = reinterpret_cast<const float4*>(a.values) + j * K;
        const uint2* ip = reinterpret_cast<const uint2*>(a.indices) + j;
        if (a.prefetch) {  // the first two groups towards L1 (nothing held in registers)
          if (g0 < g1) prefetch_l1(vp + static_cast<int64_t>(g0) * 32, ip + g0 * UW);
          if (g0 + 1 < g1) prefetch_l1(vp + static_cast<int64_t>(g0 + 1) * 32, ip + (g0 + 1) * UW);
        }
#pragma unroll 1
        for (int g = g0; g < g1; ++g) {
          if (a.prefetch && g + 2 < g1) {  // two groups ahead
            prefetch_l1(vp + static_cast<int64_t>(g + 2) * 32, ip + static_cast<int64_t>(g + 2) * UW);
          }
          float v[4 * K];
#pragma unroll
          for (int q = 0; q < K; ++q) {
            const float4 f = __ldg(vp + static_cast<int64_t>(g) * 32 + q);
            v[4 * q] = f.x;
            v[4 * q + 1] = f.y;
            v[4 * q + 2] = f.z;
            v[4 * q + 3] = f.w;
          }
          const uint2 ii = __ldg(ip + static_cast<int64_t>(g) * UW);
          apply(v, ii.x & 0xffffu);
          apply(v + K, ii.x >> 16);
          apply(v + 2 * K, ii.y & 0xffffu);
          apply(v + 3 * K, ii.y >> 16);
        }
      }
      __syncthreads();  // every thread is done reading this layer's inputs
      uint32_t bits = 0;
#pragma unroll
      for (int o = 0; o < OPT; ++o) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (neuron[o][k] < 0) continue;
          const float b = __ldg(a.bias + static_cast<int64_t>(l) * n + neuron[o][k]);
          float out[RK];
#pragma unroll
          for (int r = 0; r < RK; ++r) {
            float v = acc[o][k][r] + b;
            if (v < 0.f) v = 0.f;
            if (v > a.clip) v = a.clip;
            out[r] = part * RK + r < valid ? v : 0.f;
            bits |= out[r] != 0.f ? (1u << (part * RK + r)) : 0u;
          }
          float4* col = reinterpret_cast<float4*>(feat + neuron[o][k] * P + part * RK);
#pragma unroll
          for (int q = 0; q < RK / 4; ++q) {
            col[q] = make_float4(out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3]);
          }
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

// Tile height for `slots` unit slots per layer (1024 threads times OPT): 16 rows up to
// two slots per thread, 8 with four (the sums stay within 32 registers per thread).
inline int stat_net_rows(int64_t slots) { return slots <= 2048 ? 16 : 8; }

// Shared-memory bytes of a tile of r rows of width n.
inline size_t stat_net_bytes(int n, int r) {
  return r == 32 ? stat_net_smem<32>(n) : r == 16 ? stat_net_smem<16>(n) : stat_net_smem<8>(n);
}

// Whether the stationary network kernel runs width n with tiles of r rows on this
// device: r rows of n + 1 columns must fit the per-block shared-memory limit.
inline bool stat_net_fits(int n, int r, int device) {
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return stat_net_bytes(n, r) + 64 <= static_cast<size_t>(optin);
}

template <int RB, int R, int OPT, int K>
xla::ffi::Error launch_stat_net_t(cudaStream_t stream, const StatNetArgs& a, int64_t rows) {
  auto kernel = stationary_layers<RB, R, OPT, K>;
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

// Whether a launch with `slots` unit slots may use tiles of 32 rows (one slot per
// thread: the sums of 32 rows take the 32 registers two slots of 16 rows take).
template <int RB>
inline bool stat_net_tall(int64_t slots, int n, int device) {
  return RB % 32 == 0 && slots == 1024 && stat_net_fits(n, 32, device);
}

// Launches layers [a.first, a.last) on the listed rows (at most `rows`): `slots` unit
// slots per layer (1024, 2048 or 4096), units of `units` outputs (1, 2 or 4; 4 only with
// 16-row tiles).  The handler checked both.  With `tall_rows` >= 0 (where
// stat_net_tall holds) a launch of 32-row tiles runs when at least tall_rows rows are
// listed and the usual height otherwise: each weight loaded from L2 then feeds 32 rows,
// which pays while the rows fill the device twice over.
template <int RB>
xla::ffi::Error launch_stat_net(cudaStream_t stream, StatNetArgs a, int64_t rows, int64_t slots,
                                int units, int64_t tall_rows = -1) {
  a.min_rows = 0;
  a.max_rows = INT64_MAX;
  if constexpr (RB % 32 == 0) {
    if (tall_rows >= 0 && slots == 1024) {
      StatNetArgs t = a;
      t.min_rows = tall_rows;
      a.max_rows = tall_rows;
      xla::ffi::Error err = units == 4   ? launch_stat_net_t<RB, 32, 1, 4>(stream, t, rows)
                            : units == 2 ? launch_stat_net_t<RB, 32, 1, 2>(stream, t, rows)
                                         : launch_stat_net_t<RB, 32, 1, 1>(stream, t, rows);
      if (err.failure() || tall_rows == 0) return err;
    }
  }
  if (slots == 1024) {
    if (units == 4) return launch_stat_net_t<RB, 16, 1, 4>(stream, a, rows);
    if (units == 2) return launch_stat_net_t<RB, 16, 1, 2>(stream, a, rows);
    return launch_stat_net_t<RB, 16, 1, 1>(stream, a, rows);
  }
  if (slots == 2048) {
    if (units == 4) return launch_stat_net_t<RB, 16, 2, 4>(stream, a, rows);
    if (units == 2) return launch_stat_net_t<RB, 16, 2, 2>(stream, a, rows);
    return launch_stat_net_t<RB, 16, 2, 1>(stream, a, rows);
  }
  if (units == 2) return launch_stat_net_t<RB, 8, 4, 2>(stream, a, rows);
  return launch_stat_net_t<RB, 8, 4, 1>(stream, a, rows);
}

}  // namespace spdnn::cuda
