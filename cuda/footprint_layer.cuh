// The footprint layer kernel of SparseDNN (the seed's design, generalized):
// y = min(relu(x @ W + b), clip) for the rows listed on the device, where a block
// stages only the input columns its outputs use.
//
// Packing (jax_spdnn.sparse.pack_footprint): the output neurons are reordered so
// that outputs with equal or similar input sets are adjacent, then cut into groups
// of kThreads * O (O outputs per thread).  Group g's footprint is the sorted list
// of distinct inputs its outputs use, fp_cols[fp_ptr[g] .. fp_ptr[g + 1]); the
// weights are warp-sliced ELL (as in fused_layer.cuh) in the reordered output
// order, each index being a slot of the group's footprint.  perm maps a reordered
// output back to its neuron: the kernel writes every output at its own column, so
// features keep the network's neuron order and no permutation survives a layer.
//
// Features are stored row-interleaved: row p, column c of a [rows, n] feature
// array sits at (p / R) * n * R + c * R + p % R, so one column of a tile of R
// consecutive rows is contiguous (R = 32 float rows: four 32-byte sectors, one
// 128-byte line).  A block gathers its footprint columns for its tile line by
// line; the outputs of a thread (one column, R rows) leave as 16-byte stores.
// Each weight a thread loads is applied to R rows held in registers.
//
// Rows are listed on the device: src[k] is the position in the input of packed
// row k (nullptr: k itself).  The layer writes its outputs packed (row k of the
// list at position k) and marks rows with a nonzero output; a one-block kernel
// (compact_rows) then lists the marked rows in order.  Keeping the order keeps
// consecutive surviving rows in consecutive positions, so a tile of the next
// layer spans one or two tiles of this one.  Every output is summed in order by
// one thread: deterministic, no floating-point atomics; the sum visits inputs in
// increasing order, as the layer kernel does, so both give identical results.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/fused_layer.cuh"

namespace spdnn::cuda {

// Rows per tile (R) and outputs per thread (O; a group is kThreads * O outputs) are
// template parameters: SPDNN_FP_ROWS picks R at run time (default 32), the packing's
// group size picks O (default 1: jax_spdnn.sparse.FOOTPRINT_GROUP = 256).
// Resident blocks per SM the registers must allow: 3 up to 32 accumulators, else 2.
template <int R, int O, typename A>
constexpr int kFpMinBlocks = O * R * sizeof(A) > 128 ? 2 : 3;

// Offset of (row p, column c) in an R-row-interleaved [*, n] feature array.
template <int R>
__device__ __forceinline__ int64_t interleaved(int64_t p, int c, int n) {
  return (p / R) * static_cast<int64_t>(n) * R + static_cast<int64_t>(c) * R + p % R;
}

// Rounds R accumulated values to the storage type in place and stores them,
// contiguous, with 16-byte stores (dst is 16-byte aligned).
template <typename T, typename A, int R>
__device__ __forceinline__ void store_rows(T* dst, A (&v)[R]) {
  static_assert(R * sizeof(T) % 16 == 0, "a tile column must fill 16-byte stores");
  union {
    T t[R];
    uint4 u[R * sizeof(T) / 16];
  } pack;
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = store_from(&pack.t[r], v[r]);
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int k = 0; k < R * static_cast<int>(sizeof(T)) / 16; ++k) d[k] = pack.u[k];
}

template <typename T, typename A>
struct FootprintArgs {
  const T* x;                // row-interleaved input [*, n_in]
  const A* values;           // ELL values [total], reordered outputs
  const A* bias;             // [n_out], neuron order
  const int32_t* slice_ptr;  // [n_slices + 1]
  const int32_t* indices;    // ELL footprint slots [total] (ELL_PAD_INDEX for padding)
  const int32_t* perm;       // [n_out] neuron of each reordered output
  const int32_t* fp_ptr;     // [n_groups + 1]
  const int32_t* fp_cols;    // input neuron of each footprint slot
  T* y;                      // row-interleaved output [*, n_out], packed rows
  const int32_t* count;      // listed rows (device)
  const int32_t* src;        // input position of each listed row, or nullptr for identity
  int32_t* alive;            // [rows] set to 1 for rows with a nonzero output
  int32_t* next_run;         // pipelined kernel: runs handed out so far (zero at launch)
  // Tensor-core form (footprint_mma_convert): gate[0] | gate[1] nonzero means the layer
  // runs on the FMA kernel, zero on the tensor-core kernel (each launched kernel returns
  // at once when it is not the one); mma: the per-group records.  Both null: no gate.
  const int32_t* gate;
  const unsigned char* mma;
  int64_t rows;              // upper bound of *count (sizes the grid)
  int n_in, n_out;
  int run_tiles = 8;         // pipelined kernel: most row tiles per run of one group
  int mma_run_tiles = 64;    // the same for its tensor-core form
  bool relu;
  A clip;
};

template <typename T, typename A, int kRows, int kOuts>
__global__ void __launch_bounds__(kThreads, (kFpMinBlocks<kRows, kOuts, A>))
    footprint_layer_kernel(const FootprintArgs<T, A> args, int chunk, int n_groups) {
  const T* __restrict__ x = args.x;
  const A* __restrict__ values = args.values;
  const int32_t* __restrict__ indices = args.indices;
  const int32_t* __restrict__ fp_cols = args.fp_cols;
  const int n_in = args.n_in, n_out = args.n_out;
  using V = Vec16<A>;
  using VT = typename V::type;
  constexpr int E = V::n;
  constexpr int Q = kRows / E;
  constexpr int kCols = kThreads / kRows;  // columns staged per pass of the block
  static_assert(kThreads % kRows == 0, "a block stages whole tile columns");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const VT* xv = reinterpret_cast<const VT*>(smem_raw);
  A* xs = reinterpret_cast<A*>(smem_raw);

  const int64_t rows = *args.count;
  const int64_t n_work = (rows + kRows - 1) / kRows * n_groups;
  // The row this thread stages: the same for every column it gathers.
  const int my_r = threadIdx.x % kRows;
  const int my_c = threadIdx.x / kRows;
  const int my_slot = my_r / E, my_k = my_r % E;
  for (int64_t item = blockIdx.x; item < n_work; item += gridDim.x) {
    const int64_t tile = item / n_groups;
    const int group = static_cast<int>(item - tile * n_groups);
    const int64_t row0 = tile * kRows;
    const int valid = static_cast<int>(min(static_cast<int64_t>(kRows), rows - row0));
    const T* my_x = nullptr;
    if (my_r < valid) {
      const int64_t p = args.src ? static_cast<int64_t>(__ldg(args.src + row0 + my_r)) : row0 + my_r;
      my_x = x + interleaved<kRows>(p, 0, n_in);
    }
    const int fp0 = __ldg(args.fp_ptr + group);
    const int fp_n = __ldg(args.fp_ptr + group + 1) - fp0;

    int pos[kOuts], end[kOuts];
    A acc[kOuts][kRows];
#pragma unroll
    for (int o = 0; o < kOuts; ++o) {
      const int j = (group * kOuts + o) * kThreads + threadIdx.x;
      const int w = j / kSlice, lane = j % kSlice;
      pos[o] = j < n_out ? __ldg(args.slice_ptr + w) + lane : 0;
      end[o] = j < n_out ? __ldg(args.slice_ptr + w + 1) : 0;
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[o][r] = A(0);
    }

    for (int c0 = 0; c0 < fp_n; c0 += chunk) {
      const int cn = min(chunk, fp_n - c0);
      __syncthreads();  // everyone is done with the previous chunk (or item)
      // kRows lanes gather one footprint column of the tile (contiguous), kCols
      // columns per pass; each value lands in its row's place of the column's
      // swizzled vectors.
      for (int c = my_c; c < cn; c += kCols) {
        const int col = __ldg(fp_cols + fp0 + c0 + c);
        const A v = my_x ? load_acc<A>(my_x + static_cast<int64_t>(col) * kRows) : A(0);
        xs[vec_slot<Q>(c, my_slot) * E + my_k] = v;
      }
      __syncthreads();
      const int c1 = c0 + cn;

      auto apply = [&](int o, A v, int i) {
        const int c = i - c0;
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          const VT f = xv[vec_slot<Q>(c, q)];
#pragma unroll
          for (int k = 0; k < E; ++k) acc[o][q * E + k] = fma(v, V::get(f, k), acc[o][q * E + k]);
        }
      };

      constexpr int S = kSlice;
      if (cn == fp_n) {
        // The whole footprint is resident: only padding ends a row early.
#pragma unroll
        for (int o = 0; o < kOuts; ++o) {
          int p = pos[o];
          const int e = end[o];
          for (; p + 3 * S < e; p += 4 * S) {
            const int i0 = __ldg(indices + p), i1 = __ldg(indices + p + S);
            const int i2 = __ldg(indices + p + 2 * S), i3 = __ldg(indices + p + 3 * S);
            if (i3 >= c1) break;  // padding sorts last
            const A v0 = __ldg(values + p), v1 = __ldg(values + p + S);
            const A v2 = __ldg(values + p + 2 * S), v3 = __ldg(values + p + 3 * S);
            apply(o, v0, i0);
            apply(o, v1, i1);
            apply(o, v2, i2);
            apply(o, v3, i3);
          }
          for (; p < e; p += S) {
            const int i = __ldg(indices + p);
            if (i >= c1) break;
            apply(o, __ldg(values + p), i);
          }
          pos[o] = p;
        }
      } else {
        // Rows continue past this chunk: walk the kOuts rows in step (see the layer kernel).
        bool live[kOuts];
#pragma unroll
        for (int o = 0; o < kOuts; ++o) live[o] = pos[o] < end[o];
        bool any = true;
        while (any) {
          int i0[kOuts], i1[kOuts];
          A v0[kOuts], v1[kOuts];
#pragma unroll
          for (int o = 0; o < kOuts; ++o) {
            i0[o] = i1[o] = c1;
            if (live[o]) {
              i0[o] = __ldg(indices + pos[o]);
              v0[o] = __ldg(values + pos[o]);
              if (pos[o] + S < end[o]) {
                i1[o] = __ldg(indices + pos[o] + S);
                v1[o] = __ldg(values + pos[o] + S);
              }
            }
          }
          any = false;
#pragma unroll
          for (int o = 0; o < kOuts; ++o) {
            if (i0[o] < c1) {
              apply(o, v0[o], i0[o]);
              pos[o] += S;
              if (i1[o] < c1) {
                apply(o, v1[o], i1[o]);
                pos[o] += S;
              }
            }
            live[o] = i1[o] < c1 && pos[o] < end[o];
            any |= live[o];
          }
        }
      }
    }

    bool nonzero[kRows] = {};
#pragma unroll
    for (int o = 0; o < kOuts; ++o) {
      const int jr = (group * kOuts + o) * kThreads + threadIdx.x;
      if (jr >= n_out) continue;
      const int j = __ldg(args.perm + jr);
      const A b = __ldg(args.bias + j);
      A out[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        A v = acc[o][r] + b;
        if (args.relu && v < A(0)) v = A(0);  // comparisons keep NaN, like jnp.maximum
        if (v > args.clip) v = args.clip;
        out[r] = r < valid ? v : A(0);
      }
      store_rows<T, A, kRows>(args.y + interleaved<kRows>(row0, j, n_out), out);  // rounds out to storage
#pragma unroll
      for (int r = 0; r < kRows; ++r) nonzero[r] |= out[r] != A(0);
    }
    // Rows with a nonzero output in this group (several groups may mark one row:
    // same-value stores).
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (__any_sync(0xffffffffu, nonzero[r]) && (threadIdx.x % 32) == 0 && r < valid) {
        args.alive[row0 + r] = 1;
      }
    }
  }  // work items
}

// Copies n 4-byte words global -> shared with the whole block (16-byte copies where
// both ends allow).
__device__ __forceinline__ void block_copy_words(void* dst, const void* src, int n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(src), b = reinterpret_cast<uintptr_t>(dst);
  if (a % 16 == 0 && b % 16 == 0) {
    const int n4 = n / 4;
    for (int k = threadIdx.x; k < n4; k += blockDim.x) {
      cp_async16(static_cast<int4*>(dst) + k, static_cast<const int4*>(src) + k);
    }
    for (int k = n4 * 4 + threadIdx.x; k < n; k += blockDim.x) {
      cp_async4(static_cast<int32_t*>(dst) + k, static_cast<const int32_t*>(src) + k, true);
    }
  } else {
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
      cp_async4(static_cast<int32_t*>(dst) + k, static_cast<const int32_t*>(src) + k, true);
    }
  }
}

// ---------------------------------------------------------------------------------------
// The tensor-core form of a footprint layer (float32 features, groups of kThreads
// outputs, 32-row tiles), made on the device from the footprint packing before the layer
// runs.  The weights of each unit of 16 consecutive (reordered) outputs are cut into
// dense 16 x 8 tiles, the 16 outputs by 8 footprint slots: the unit's distinct slots in
// order, 8 per tile, zeros where an output does not use a slot.  Where outputs share
// their inputs (units of equal or similar input sets, as the footprint order makes them
// adjacent) the tiles are dense and mma.sync (m16n8k8 with the weights as A and the
// features as B, TF32 in three passes: lo*hi + hi*lo + hi*hi, about float32's accuracy)
// does the work of 16 FMA instructions per weight in a few instructions per tile.  Where
// they do not, the tiles are mostly zeros, a group needs more tiles than shared memory
// holds, and the layer runs on the FMA kernel instead (the same launch sequence; the
// device decides, see gate).
//
// A zero in a tile multiplies a real feature, so a NaN or infinite feature would leak
// into the other outputs of its unit: the tensor-core form runs only where features
// are finite (a finite clip, x checked while its rows are marked, weights checked here).
//
// Per group a record of kMmaGroupBytes: the group's footprint columns in the order the
// tiles want them (cols [kMmaMaxCols]; slots renumbered by the first unit of 16 outputs
// that uses them, so a unit's slots are consecutive where it brings new ones), the
// first tile of each unit (tptr [17]; tptr[17] = 1 where a weight is not exact in TF32,
// else the x_hi * w_lo pass is skipped; padded to 20), then the tiles: 34 int4 each, two
// of header (int2 [4]: lane t's slots at positions t and t + 4) and one of weights per
// lane: lane 4 g + t holds its A fragment {W[t][g], W[t][g + 8], W[t + 4][g],
// W[t + 4][g + 8]} (W[position][output of the unit], float32; the kernel splits them).
constexpr int kMmaMaxCols = 512;  // footprint columns per group (one chunk)
constexpr int kMmaTileCap = 144;  // tiles per group (shared memory)
constexpr int kMmaUnit = 16;      // outputs per tile
constexpr int kMmaTileInt4 = 34;
constexpr int kMmaUnits = kThreads / kMmaUnit;  // units of 16 outputs per group
constexpr int kMmaPtrInts = 20;
constexpr int64_t kMmaGroupBytes =
    (kMmaMaxCols + kMmaPtrInts) * 4 + static_cast<int64_t>(kMmaTileCap) * kMmaTileInt4 * 16;
static_assert(kMmaGroupBytes % 16 == 0, "records keep int4 alignment");

// The bits of a float32 a TF32 value keeps (sign, exponent, 10 bits of mantissa).
constexpr uint32_t kTf32Mask = 0xffffe000u;

// Inclusive prefix sum of v over the lanes of a (full) warp.
__device__ __forceinline__ int warp_inclusive_sum(int v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int t = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += t;
  }
  return v;
}

// Position in a tile of the tile's rank-th slot: even ranks first, so that lanes t = 0..3
// read slots two apart (with a 36-float column pitch, consecutive slots at positions
// t and t + 1 would share a bank quad).
__device__ __forceinline__ int mma_position(int rank) { return (rank & 1) * 4 + (rank >> 1); }

// One block per group (kThreads threads, thread o walks output o's ELL row).  Sets
// gate[1] when the group does not fit the tensor-core form (footprint past kMmaMaxCols,
// more than kMmaTileCap tiles) or a weight is not finite.
__global__ void __launch_bounds__(kThreads)
    footprint_mma_convert(const int32_t* __restrict__ slice_ptr, const int32_t* __restrict__ indices,
                          const float* __restrict__ values, const int32_t* __restrict__ fp_ptr,
                          const int32_t* __restrict__ fp_cols, int n_out,
                          unsigned char* __restrict__ records, int32_t* gate) {
  constexpr int W = kMmaMaxCols / 32;  // bitmap words
  static_assert(kMmaUnits <= 32, "one lane per unit");
  __shared__ int first_use[kMmaMaxCols];
  __shared__ uint32_t bins[kMmaUnits][W];  // slots by first user; then each unit's union
  __shared__ int bin_start[kMmaUnits + 1];
  __shared__ int new_slot[kMmaMaxCols];
  __shared__ int tiles_of[kMmaUnits + 1];
  __shared__ int fail, has_lo;
  const int g = blockIdx.x, o = threadIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int fp0 = __ldg(fp_ptr + g), fp_n = __ldg(fp_ptr + g + 1) - fp0;
  if (fp_n > kMmaMaxCols) {
    if (o == 0) atomicOr(gate + 1, 1);
    return;
  }
  unsigned char* rec = records + static_cast<int64_t>(g) * kMmaGroupBytes;
  int32_t* cols = reinterpret_cast<int32_t*>(rec);
  int32_t* tptr = cols + kMmaMaxCols;
  int4* tiles = reinterpret_cast<int4*>(tptr + kMmaPtrInts);
  for (int s = o; s < kMmaMaxCols; s += kThreads) first_use[s] = kMmaUnits;
  for (int k = o; k < kMmaUnits * W; k += kThreads) (&bins[0][0])[k] = 0;
  if (o == 0) fail = has_lo = 0;
  __syncthreads();

  // This thread's ELL row (output o of the group).
  const int j = g * kThreads + o;
  const int S = kSlice;
  int p0 = 0, pe = 0;
  if (j < n_out) {
    p0 = __ldg(slice_ptr + j / S) + j % S;
    pe = __ldg(slice_ptr + j / S + 1);
  }
  const int unit = o / kMmaUnit, m = o % kMmaUnit;
  bool bad = false;
  for (int p = p0; p < pe; p += S) {
    const int s = __ldg(indices + p);
    if (s >= fp_n) break;  // padding sorts last
    bad |= !isfinite(__ldg(values + p));
    atomicMin(&first_use[s], unit);
  }
  if (bad) fail = 1;
  __syncthreads();
  // New slot order: by first user unit, then old slot.
  for (int s = o; s < fp_n; s += kThreads) {
    first_use[s] = min(first_use[s], kMmaUnits - 1);  // (every slot has a user)
    atomicOr(&bins[first_use[s]][s / 32], 1u << (s % 32));
  }
  __syncthreads();
  if (warp == 0) {
    int c = 0;
    for (int k = 0; lane < kMmaUnits && k < W; ++k) c += __popc(bins[lane][k]);
    const int incl = warp_inclusive_sum(c);
    if (lane < kMmaUnits) bin_start[lane] = incl - c;
    if (lane == kMmaUnits - 1) bin_start[kMmaUnits] = incl;
  }
  __syncthreads();
  for (int s = o; s < fp_n; s += kThreads) {
    const int b = first_use[s];
    int r = bin_start[b] + __popc(bins[b][s / 32] & ((1u << (s % 32)) - 1u));
    for (int k = 0; k < s / 32; ++k) r += __popc(bins[b][k]);
    new_slot[s] = r;
    cols[r] = __ldg(fp_cols + fp0 + s);
  }
  __syncthreads();
  // Each unit's union of new slots -> its tile count.
  for (int k = o; k < kMmaUnits * W; k += kThreads) (&bins[0][0])[k] = 0;
  __syncthreads();
  for (int p = p0; p < pe; p += S) {
    const int s = __ldg(indices + p);
    if (s >= fp_n) break;
    const int ns = new_slot[s];
    atomicOr(&bins[unit][ns / 32], 1u << (ns % 32));
  }
  __syncthreads();
  if (warp == 0) {
    int u = 0;
    for (int k = 0; lane < kMmaUnits && k < W; ++k) u += __popc(bins[lane][k]);
    const int t = (u + 7) / 8;
    const int incl = warp_inclusive_sum(t);
    if (lane < kMmaUnits) {
      tiles_of[lane] = incl - t;
      tptr[lane] = incl - t;
    }
    if (lane == kMmaUnits - 1) {
      tiles_of[kMmaUnits] = incl;
      tptr[kMmaUnits] = incl;
      if (incl > kMmaTileCap) fail = 1;
    }
  }
  __syncthreads();
  if (fail) {
    if (o == 0) atomicOr(gate + 1, 1);
    return;
  }
  // Zero the tiles; every header position defaults to the unit's first slot (a staged,
  // finite column: empty positions multiply it by zero).
  for (int b = warp; b < kMmaUnits; b += kThreads / 32) {
    int first = kMmaMaxCols;
    for (int k = W - 1; k >= 0; --k) {
      if (bins[b][k]) first = k * 32 + __ffs(bins[b][k]) - 1;
    }
    for (int e = lane; e < (tiles_of[b + 1] - tiles_of[b]) * kMmaTileInt4; e += 32) {
      const int k = e % kMmaTileInt4;
      tiles[tiles_of[b] * kMmaTileInt4 + e] =
          k < 2 ? make_int4(first, first, first, first) : make_int4(0, 0, 0, 0);
    }
  }
  __syncthreads();
  float* tf = reinterpret_cast<float*>(tiles);
  int* ti = reinterpret_cast<int*>(tiles);
  for (int p = p0; p < pe; p += S) {
    const int s = __ldg(indices + p);
    if (s >= fp_n) break;
    const int ns = new_slot[s];
    int r = __popc(bins[unit][ns / 32] & ((1u << (ns % 32)) - 1u));
    for (int k = 0; k < ns / 32; ++k) r += __popc(bins[unit][k]);
    const int tile = tiles_of[unit] + r / 8, pos = mma_position(r % 8);
    const int base = tile * kMmaTileInt4 * 4;
    ti[base + 2 * (pos % 4) + pos / 4] = ns;
    const float v = __ldg(values + p);
    // A fragment element: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4).
    tf[base + 8 + 4 * (4 * (m % 8) + pos % 4) + m / 8 + 2 * (pos / 4)] = v;
    if (__float_as_uint(v) & ~kTf32Mask) has_lo = 1;
  }
  __syncthreads();
  if (o == 0) tptr[kMmaUnits + 1] = has_lo;  // weights all exact in TF32: two passes
}

// max(a, b) and min(a, b), NaN where either is NaN (one instruction each on sm_80+).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float min_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// acc += A * B on one m16n8k8 TF32 tile.
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The pipelined footprint kernel (float or double features and accumulation, one
// output per thread): the same packing, layout and arithmetic as
// footprint_layer_kernel (results are bitwise equal), with the memory traffic taken
// off the compute path.  One block per SM; its shared memory holds
//  - the group's weights (indices and values, up to wcap entries): a block runs the
//    work items of one group for a run of up to 8 consecutive row tiles, so the
//    weights come in once per run, and the inner loop reads them from shared memory
//    instead of waiting on L2 (groups with more entries read them from global memory);
//  - two footprint buffers: while the block computes stage s (a row tile, a group and
//    a chunk of its footprint), stage s + 1's columns are in flight (cp.async).  A
//    staged column (kRows values) is padded by 16 bytes instead of swizzled: vector q
//    of column c sits at c * pitch + 16 q bytes, so the eight 16-byte loads of a
//    weight's column use immediate offsets and no address arithmetic, and columns
//    c and c + 1 start one bank quad apart (threads reading different columns spread
//    over the banks); and
//  - two small buffers of stage s + 2's footprint columns and source rows, so issuing
//    stage s + 1's copies waits on nothing.
// Runs are handed out in (tile block, group) order, the first one per block and then
// to whichever block asks next (an atomic counter): blocks finish together, and the
// blocks working at one time cover a few tile blocks and share their staged columns
// in L2.
// Elements of A per staged column in the pipelined kernel (16 bytes of padding).
template <typename A, int kRows>
constexpr int kPipePitch = kRows + 16 / static_cast<int>(sizeof(A));

template <typename A, int kRows>
struct PipeStage {
  int64_t run = -1, tile = 0, tile_end = 0;  // run: -1 none, -2 being handed out
  int group = 0, c0 = 0, fp0 = 0, fp_n = 0, slot = 0;
};

//
// H threads share an output (H = 2: 512 threads, each with half the tile's rows): twice
// the warps to hide the shared-memory and L2 latencies with, for a second read of each
// weight.
//
// kMma: the tensor-core form (float, 32-row tiles; see footprint_mma_convert): shared
// memory holds the group's tiles instead of its ELL weights (wcap tiles), columns are
// staged in the record's order, and warp w computes the units of 16 outputs w, w + 8 H,
// ... on the whole 32-row tile, as four m16n8k8 MMAs per tile and pass (the unit's 16
// outputs by 8 rows each).  Rows 4 n + j of the tile are the n-th column of n-block j,
// so a lane's B operands for one slot are one 16-byte load, its A operands (weights)
// one 16-byte load per tile and pass, and its outputs for one column 8 consecutive rows
// (two 16-byte stores).
template <typename A, int kRows, int H, bool kMma = false>
__global__ void __launch_bounds__(kThreads * H, 1)
    footprint_pipe_kernel(const FootprintArgs<A, A> args, int chunk, int wcap, int n_groups,
                          bool lean) {
  static_assert(!kMma || (std::is_same_v<A, float> && kRows == 32), "tensor-core form: float, 32 rows");
  if (args.gate) {
    const bool fma = (args.gate[0] | args.gate[1]) != 0;
    if (kMma == fma) return;  // the layer is the other kernel's
  }
  using V = Vec16<A>;
  using VT = typename V::type;
  using Stage = PipeStage<A, kRows>;
  constexpr int E = V::n;
  constexpr int Q = kRows / E;
  constexpr int QT = Q / H;      // 16-byte vectors of a staged column per thread
  constexpr int RT = kRows / H;  // rows per thread
  static_assert(Q % H == 0, "whole vectors per thread");
  constexpr int NT = kThreads * H;
  constexpr int kCols = NT / kRows;
  constexpr int kGroupSlices = kThreads / kSlice;
  constexpr int S = kSlice;
  static_assert(NT % kRows == 0 && kThreads % kSlice == 0, "whole columns and slices");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* wv = reinterpret_cast<A*>(smem_raw);                                       // [wcap]
  int32_t* wi = reinterpret_cast<int32_t*>(smem_raw + sizeof(A) * wcap);        // [wcap]
  const int4* tiles_s = reinterpret_cast<const int4*>(smem_raw);                // kMma: [wcap]
  constexpr int P = kPipePitch<A, kRows>;
  constexpr size_t kWeightBytes = kMma ? kMmaTileInt4 * 16 : sizeof(A) + 4;  // per wcap
  A* fbuf = reinterpret_cast<A*>(smem_raw + kWeightBytes * wcap);              // [2][chunk * P]
  int32_t* cbuf = reinterpret_cast<int32_t*>(fbuf + 2 * chunk * P);             // [2][chunk]
  int32_t* rbuf = cbuf + 2 * chunk;                                             // [2][kRows]
  int32_t* grab = rbuf + 2 * kRows;                                             // [2]

  const int64_t rows = *args.count;
  const int64_t n_tiles = (rows + kRows - 1) / kRows;
  if (n_tiles == 0) return;
  // Tiles per run: up to args.(mma_)run_tiles while every block still gets about four runs.
  const int64_t tb = max(int64_t{1}, min(static_cast<int64_t>(kMma ? args.mma_run_tiles : args.run_tiles),
                                         n_tiles * n_groups / (4 * gridDim.x)));
  const int64_t n_runs = (n_tiles + tb - 1) / tb * n_groups;
  if (blockIdx.x >= n_runs) return;
  const int n_slices = (args.n_out + S - 1) / S;

  auto start_run = [&](Stage& k, int64_t run) {
    k.run = run < n_runs ? run : -1;
    if (k.run < 0) return;
    const int64_t sb = run / n_groups;
    k.group = static_cast<int>(run - sb * n_groups);
    k.tile = sb * tb;
    k.tile_end = min(k.tile + tb, n_tiles);
    k.c0 = 0;
    k.fp0 = __ldg(args.fp_ptr + k.group);
    k.fp_n = __ldg(args.fp_ptr + k.group + 1) - k.fp0;
  };
  // The stage after k.  A new run is asked for by thread 0 into grab[slot]; resolve()
  // reads it after the next barrier.
  auto advance = [&](Stage& k, int slot) {
    if (k.run < 0) return;
    if (k.c0 + chunk < k.fp_n) {
      k.c0 += chunk;
    } else if (++k.tile < k.tile_end) {
      k.c0 = 0;
    } else {
      k.run = -2;
      k.slot = slot;
      if (threadIdx.x == 0) grab[slot] = atomicAdd(args.next_run, 1);
    }
  };
  auto resolve = [&](Stage& k) {
    if (k.run == -2) start_run(k, gridDim.x + static_cast<int64_t>(grab[k.slot]));
  };
  // Stage k's footprint columns and source rows -> buffer b (cp.async).
  auto issue_meta = [&](const Stage& k, int b) {
    if (k.run < 0) return;
    const int cn = min(chunk, k.fp_n - k.c0);
    const int32_t* cols =
        kMma ? reinterpret_cast<const int32_t*>(args.mma + k.group * kMmaGroupBytes)
             : args.fp_cols + k.fp0;
    for (int c = threadIdx.x; c < cn; c += NT) {
      cp_async4(cbuf + b * chunk + c, cols + k.c0 + c, true);
    }
    if (threadIdx.x < kRows) {
      const int64_t p = k.tile * kRows + threadIdx.x;
      if (args.src && p < rows) {
        cp_async4(rbuf + b * kRows + threadIdx.x, args.src + p, true);
      } else {
        rbuf[b * kRows + threadIdx.x] = p < rows ? static_cast<int32_t>(p) : -1;
      }
    }
  };
  // Stage k's footprint values -> feature buffer b (cp.async; its meta is in buffer b).
  // When the tile's source rows are one whole tile of the input (every row kept since
  // the last compaction, and always in the first layer), a staged column is one
  // contiguous run of kRows values: 16-byte copies (lean).  Otherwise one copy per value.
  // Column indices are read four at a time (one 16-byte shared load; a staged buffer's
  // list is 16-byte aligned and a multiple of 4 long): the lanes of a column quad read
  // them once and copy columns c4 .. c4 + 3 (those below cn).
  const int my_r = threadIdx.x % kRows, my_c = threadIdx.x / kRows;
  auto issue_features = [&](const Stage& k, int b) {
    if (k.run < 0) return;
    const int cn = min(chunk, k.fp_n - k.c0);
    const int32_t p_first = rbuf[b * kRows], p_last = rbuf[b * kRows + kRows - 1];
    const int32_t* cols = cbuf + b * chunk;
    if (lean && p_first >= 0 && p_first % kRows == 0 && p_last == p_first + kRows - 1) {
      // The list is increasing, so first and last a tile apart means every row between.
      // Q lanes copy a column (16 bytes each); lane group r of warp w copies the quads
      // 4 (w CW + r) + 4 CW NW i: each copy instruction of a warp moves CW whole columns.
      static_assert(32 % Q == 0, "whole columns per warp");
      constexpr int CW = 32 / Q, NW = NT / 32;
      const int lane_ = threadIdx.x % 32, r = lane_ / Q, v = lane_ % Q;
      const A* src = args.x + interleaved<kRows>(p_first, 0, args.n_in) + v * E;
      A* dst = fbuf + b * chunk * P + v * E;
      for (int c4 = 4 * ((threadIdx.x / 32) * CW + r); c4 < cn; c4 += 4 * CW * NW) {
        const int4 q = *reinterpret_cast<const int4*>(cols + c4);
        const int ci[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (c4 + e < cn) cp_async16(dst + (c4 + e) * P, src + static_cast<int64_t>(ci[e]) * kRows);
        }
      }
      return;
    }
    // Otherwise one copy per value: thread (my_c, my_r) copies row my_r of the quads
    // 4 my_c + 4 kCols i.
    const int32_t p = rbuf[b * kRows + my_r];
    const A* my_x = p >= 0 ? args.x + interleaved<kRows>(p, 0, args.n_in) : args.x;
    A* dst = fbuf + b * chunk * P + my_r;
    for (int c4 = 4 * my_c; c4 < cn; c4 += 4 * kCols) {
      const int4 q = *reinterpret_cast<const int4*>(cols + c4);
      const int ci[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (c4 + e < cn) {
          cp_async_elem<sizeof(A)>(dst + (c4 + e) * P, my_x + static_cast<int64_t>(ci[e]) * kRows, p >= 0);
        }
      }
    }
  };

  Stage cur, nxt, nxt2;
  start_run(cur, blockIdx.x);
  nxt = cur;
  advance(nxt, 0);
  __syncthreads();
  resolve(nxt);
  nxt2 = nxt;
  advance(nxt2, 1);
  __syncthreads();
  resolve(nxt2);
  issue_meta(cur, 0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  issue_meta(nxt, 1);
  issue_features(cur, 0);
  cp_async_commit();

  // Per group (loaded when a run starts): where the weights are, this thread's ELL row,
  // its neuron and bias.
  int loaded_group = -1;
  bool in_shared = false;
  int pos0 = 0, end0 = 0, neuron = -1;
  A bias = A(0);
  int pos = 0, end = 0;
  const int tx = threadIdx.x % kThreads, half = threadIdx.x / kThreads;
  A acc[RT];
  // kMma: this warp's units of 16 outputs (NU), their tiles, and per lane its two
  // outputs' columns (32 x neuron, or -1) and biases.
  constexpr int NU = kMma ? kMmaUnits / (NT / 32) : 1;
  int t_begin[NU], t_end[NU], mma_col[NU][2];
  bool has_lo = true;
  float mma_bias[NU][2];
  float macc[NU][4][4];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int s = 0; cur.run >= 0; ++s) {
    const int b = s & 1;
    __syncthreads();  // everyone is done with stage s - 1 (its buffers and the weights)
    resolve(nxt2);
    if (kMma && cur.c0 == 0 && cur.group != loaded_group) {
      const int32_t* tptr = reinterpret_cast<const int32_t*>(args.mma + cur.group * kMmaGroupBytes) +
                            kMmaMaxCols;
      const int4* tiles_g = reinterpret_cast<const int4*>(tptr + kMmaPtrInts);
      block_copy_words(const_cast<int4*>(tiles_s), tiles_g, __ldg(tptr + kMmaUnits) * kMmaTileInt4 * 4);
      cp_async_commit();
      has_lo = __ldg(tptr + kMmaUnits + 1) != 0;
#pragma unroll
      for (int i = 0; i < NU; ++i) {
        const int u = warp + i * (NT / 32);
        t_begin[i] = __ldg(tptr + u);
        t_end[i] = __ldg(tptr + u + 1);
#pragma unroll
        for (int c = 0; c < 2; ++c) {  // outputs g and g + 8 of the unit
          const int jr = cur.group * kThreads + u * kMmaUnit + lane / 4 + 8 * c;
          const int neuron_c = jr < args.n_out ? __ldg(args.perm + jr) : -1;
          mma_col[i][c] = neuron_c >= 0 ? neuron_c * kRows : -1;
          mma_bias[i][c] = neuron_c >= 0 ? __ldg(args.bias + neuron_c) : 0.f;
        }
      }
      loaded_group = cur.group;
    }
    if (!kMma && cur.c0 == 0 && cur.group != loaded_group) {
      const int w0 = cur.group * kGroupSlices;
      const int w1 = min(w0 + kGroupSlices, n_slices);
      const int64_t e0 = __ldg(args.slice_ptr + w0), e1 = __ldg(args.slice_ptr + w1);
      in_shared = e1 - e0 <= wcap;
      const int64_t w_base = in_shared ? e0 : 0;
      const int j = cur.group * kThreads + tx;
      neuron = -1;
      pos0 = end0 = 0;
      if (j < args.n_out) {
        pos0 = __ldg(args.slice_ptr + j / S) + j % S - static_cast<int>(w_base);
        end0 = __ldg(args.slice_ptr + j / S + 1) - static_cast<int>(w_base);
        neuron = __ldg(args.perm + j);
        bias = __ldg(args.bias + neuron);
      }
      if (in_shared) {
        block_copy_words(wv, args.values + e0, static_cast<int>((e1 - e0) * sizeof(A) / 4));
        block_copy_words(wi, args.indices + e0, static_cast<int>(e1 - e0));
        cp_async_commit();
      }
      loaded_group = cur.group;
    }
    cp_async_wait_all();
    __syncthreads();  // stage s's features, stage s + 1's meta and the weights are in
    issue_meta(nxt2, b);  // buffer b's meta (stage s) was used when stage s was issued
    issue_features(nxt, 1 - b);
    cp_async_commit();

    if constexpr (kMma) {
      // The stage is a whole item (footprints fit one chunk, see footprint_mma_convert).
      // Lane (g, t) = (lane / 4, lane % 4).  B operand of n-block j (8 of the tile's rows):
      // b0 = x[slot at t][row 4 g + j], b1 = x[slot at t + 4][row 4 g + j], so a lane's
      // B operands for one slot and all four n-blocks are one 16-byte load.  Its results
      // are outputs g and g + 8 of the unit at rows 8 t + j (c0, c2) and 8 t + 4 + j (c1, c3).
      const float* xl = fbuf + b * chunk * P + 4 * (lane / 4);
      const int t4 = lane % 4;
#pragma unroll
      for (int i = 0; i < NU; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int k = 0; k < 4; ++k) macc[i][j][k] = 0.f;
        }
      }
      // Unit i's tiles; x = hi + lo with hi the top 11 bits of x (exact in TF32; lo is
      // exact in float32, and the tensor cores take its top 11 bits), and the weights
      // the same way.  lo_pass: the w_lo * x_hi pass (weights not exact in TF32).
      auto unit_tiles = [&](int i, auto lo_pass) {
        for (int tt = t_begin[i]; tt < t_end[i]; ++tt) {
          const int4* tile = tiles_s + tt * kMmaTileInt4;
          const int2 h = reinterpret_cast<const int2*>(tile)[t4];
          const float4 x0 = *reinterpret_cast<const float4*>(xl + h.x * P);
          const float4 x1 = *reinterpret_cast<const float4*>(xl + h.y * P);
          const float4 w = reinterpret_cast<const float4*>(tile)[2 + lane];
          const float wv[4] = {w.x, w.y, w.z, w.w};
          uint32_t wh[4], wl[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            wh[k] = __float_as_uint(wv[k]) & kTf32Mask;
            wl[k] = decltype(lo_pass)::value ? __float_as_uint(wv[k] - __uint_as_float(wh[k])) : 0u;
          }
          const float xa[4] = {x0.x, x0.y, x0.z, x0.w}, xb[4] = {x1.x, x1.y, x1.z, x1.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t h0 = __float_as_uint(xa[j]) & kTf32Mask;
            const uint32_t h1 = __float_as_uint(xb[j]) & kTf32Mask;
            const uint32_t l0 = __float_as_uint(xa[j] - __uint_as_float(h0));
            const uint32_t l1 = __float_as_uint(xb[j] - __uint_as_float(h1));
            mma_tf32(macc[i][j], wh, l0, l1);  // small terms first
            if constexpr (decltype(lo_pass)::value) mma_tf32(macc[i][j], wl, h0, h1);
            mma_tf32(macc[i][j], wh, h0, h1);
          }
        }
      };
#pragma unroll
      for (int i = 0; i < NU; ++i) {
        if (has_lo) {
          unit_tiles(i, std::true_type{});
        } else {
          unit_tiles(i, std::false_type{});
        }
      }
      // Bias, ReLU, clamp.  The tile's outputs start at ytile (one 64-bit product per
      // stage); an output column is mma_col further.  max.NaN/min.NaN keep NaN, as the
      // comparisons of the FMA kernel (and jnp.maximum) do.  Row r has a nonzero output
      // where the OR of its outputs' bits, sign aside, is nonzero.
      const int64_t row0 = cur.tile * kRows;
      const int valid = static_cast<int>(min(static_cast<int64_t>(kRows), rows - row0));
      const int r8 = 8 * t4;
      float* ytile = args.y + cur.tile * static_cast<int64_t>(args.n_out) * kRows + r8;
      const float lower = args.relu ? 0.f : -INFINITY, clip = args.clip;
      uint32_t ors[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
      // full: all 32 rows valid (every tile but the last), no row test.
      auto finish = [&](auto full) {
#pragma unroll
        for (int i = 0; i < NU; ++i) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (mma_col[i][c] < 0) continue;
            float out[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) {
              const float a = macc[i][r % 4][2 * c + r / 4] + mma_bias[i][c];
              const float v = min_nan(max_nan(a, lower), clip);
              out[r] = decltype(full)::value || r8 + r < valid ? v : 0.f;
              ors[r] |= __float_as_uint(out[r]);
            }
            float4* dst = reinterpret_cast<float4*>(ytile + mma_col[i][c]);
            dst[0] = make_float4(out[0], out[1], out[2], out[3]);
            dst[1] = make_float4(out[4], out[5], out[6], out[7]);
          }
        }
      };
      if (valid == kRows) {
        finish(std::true_type{});
      } else {
        finish(std::false_type{});
      }
      uint32_t bits = 0;
#pragma unroll
      for (int r = 0; r < 8; ++r) bits |= (ors[r] << 1) != 0u ? 1u << r : 0u;
      bits <<= r8;
      bits = __reduce_or_sync(0xffffffffu, bits);
      if (lane < valid && ((bits >> lane) & 1u)) args.alive[row0 + lane] = 1;
      cur = nxt;
      nxt = nxt2;
      advance(nxt2, 0);
      continue;
    }

    if (cur.c0 == 0) {
      pos = pos0;
      end = end0;
#pragma unroll
      for (int r = 0; r < RT; ++r) acc[r] = A(0);
    }
    const int c0 = cur.c0, c1 = c0 + min(chunk, cur.fp_n - cur.c0);
    // Slot i's column at xb + (i - c0) * P; this thread's rows start at vector half * QT.
    const A* xb = fbuf + b * chunk * P + half * QT * E;
    auto apply = [&](A v, int i) {
      const VT* col = reinterpret_cast<const VT*>(xb + (i - c0) * P);
#pragma unroll
      for (int q = 0; q < QT; ++q) {
        const VT f = col[q];
#pragma unroll
        for (int k = 0; k < E; ++k) acc[q * E + k] = fma(v, V::get(f, k), acc[q * E + k]);
      }
    };
    // The entries of this thread's output with slots in [c0, c1), in order (padding
    // slots sort last).
    auto walk = [&](const int32_t* idx, const A* val) {
      int p = pos;
      for (; p + 3 * S < end; p += 4 * S) {
        const int i0 = idx[p], i1 = idx[p + S], i2 = idx[p + 2 * S], i3 = idx[p + 3 * S];
        if (i3 >= c1) break;
        const A v0 = val[p], v1 = val[p + S], v2 = val[p + 2 * S], v3 = val[p + 3 * S];
        apply(v0, i0);
        apply(v1, i1);
        apply(v2, i2);
        apply(v3, i3);
      }
      for (; p < end; p += S) {
        const int i = idx[p];
        if (i >= c1) break;
        apply(val[p], i);
      }
      pos = p;
    };
    if (in_shared) {
      // As walk, with the next four slots read one step ahead (reads past the row stay
      // inside the weight buffer and are not used), so the feature loads need not wait
      // for them.
      int p = pos;
      int i[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) i[k] = wi[min(p + k * S, wcap - 1)];
      while (p + 3 * S < end && i[3] < c1) {
        int n[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) n[k] = wi[min(p + (4 + k) * S, wcap - 1)];
        const A v0 = wv[p], v1 = wv[p + S], v2 = wv[p + 2 * S], v3 = wv[p + 3 * S];
        apply(v0, i[0]);
        apply(v1, i[1]);
        apply(v2, i[2]);
        apply(v3, i[3]);
#pragma unroll
        for (int k = 0; k < 4; ++k) i[k] = n[k];
        p += 4 * S;
      }
      pos = p;
      walk(wi, wv);  // the last entries of this chunk, one at a time
    } else {
      walk(args.indices, args.values);
    }

    if (c1 == cur.fp_n) {  // the item's last chunk: bias, ReLU, clamp, store, marks
      const int64_t row0 = cur.tile * kRows + half * RT;  // this thread's first row
      const int valid = static_cast<int>(min(static_cast<int64_t>(RT), rows - row0));
      bool nonzero[RT] = {};
      if (neuron >= 0) {
        A out[RT];
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          A v = acc[r] + bias;
          if (args.relu && v < A(0)) v = A(0);
          if (v > args.clip) v = args.clip;
          out[r] = r < valid ? v : A(0);
          nonzero[r] = out[r] != A(0);
        }
        store_rows<A, A, RT>(
            args.y + interleaved<kRows>(cur.tile * kRows, neuron, args.n_out) + half * RT, out);
      }
      if (lean) {  // the warp's rows with a nonzero output: one reduction, one store
        uint32_t bits = 0;
#pragma unroll
        for (int r = 0; r < RT; ++r) bits |= nonzero[r] ? (1u << r) : 0u;
        bits = __reduce_or_sync(0xffffffffu, bits);
        const int lane = threadIdx.x % 32;
        if (lane < RT && lane < valid && ((bits >> lane) & 1u)) args.alive[row0 + lane] = 1;
      } else {
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          if (__any_sync(0xffffffffu, nonzero[r]) && (threadIdx.x % 32) == 0 && r < valid) {
            args.alive[row0 + r] = 1;
          }
        }
      }
    }
    cur = nxt;
    nxt = nxt2;
    advance(nxt2, 0);
  }
  cp_async_wait_all();
}

// Lists the marked rows in order: next_src[s] = k and next_ids[s] = ids_in[k] (k
// without ids_in) for the s-th k < m with alive[k] set (with drop off: every k, at slot
// k), where m = *count_in (rows without count_in).  Writes the number of marked rows
// to *active_out and the list's length to *list_count, and clears the marks (and
// *reset).
//
// Several blocks, each on a contiguous segment of whole tiles of kCompactTile marks
// (four per thread, 16-byte loads): a block counts its marks, publishes the count,
// adds up the counts of the segments before its own, then lists its rows tile by tile
// with a block-wide scan.  Blocks are numbered by a ticket taken when they start, so
// every segment a block waits for belongs to a block already running.  The grid is
// sized on the host for `rows` (at most kCompactMaxBlocks); blocks past *count_in find
// empty segments and leave at once.  `epoch` numbers the launches of one call from 1
// (scratch zeroed before the first): the tickets of launch e are (e - 1) * grid ..
// e * grid - 1 and its published counts carry flag e, so nothing is reset in between.
constexpr int kCompactThreads = 1024;
constexpr int kCompactTile = 4 * kCompactThreads;
constexpr int kCompactMaxBlocks = 128;
// Integers of scratch compact_rows needs (zeroed before the first launch of a call):
// the ticket counter, one spare, then per-block counts and flags.
constexpr int kCompactScratch = 2 + 2 * kCompactMaxBlocks;

inline unsigned compact_grid(int64_t rows) {
  const int64_t tiles = (rows + kCompactTile - 1) / kCompactTile;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(tiles, kCompactMaxBlocks)));
}

// Exclusive prefix of v over the block (blockDim.x == kCompactThreads); *total = sum.
__device__ __forceinline__ int32_t block_exclusive_sum(int32_t v, int32_t* warp_sums,
                                                       int32_t* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int32_t incl = v;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int32_t t = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += t;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int32_t w = warp_sums[lane];
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int32_t t = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += t;
    }
    warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int32_t out = incl - v + (warp > 0 ? warp_sums[warp - 1] : 0);
  *total = warp_sums[kCompactThreads / 32 - 1];
  __syncthreads();  // warp_sums may be reused
  return out;
}

// The four marks at k .. k + 3 (k a multiple of 4), zero past end.
__device__ __forceinline__ int4 load_marks(const int32_t* alive, int64_t k, int64_t end) {
  if (k + 4 <= end) return *reinterpret_cast<const int4*>(alive + k);
  int4 a = make_int4(0, 0, 0, 0);
  if (k < end) a.x = alive[k];
  if (k + 1 < end) a.y = alive[k + 1];
  if (k + 2 < end) a.z = alive[k + 2];
  return a;
}

__global__ void __launch_bounds__(kCompactThreads)
    compact_rows(const int32_t* count_in, int64_t rows, int32_t* __restrict__ alive,
                 const int32_t* __restrict__ ids_in, bool drop, int32_t* __restrict__ next_src,
                 int32_t* __restrict__ next_ids, int32_t* active_out, int32_t* list_count,
                 int32_t* reset, int32_t* scratch, int32_t epoch) {
  __shared__ int32_t warp_sums[kCompactThreads / 32];
  __shared__ int32_t shared_int[2];
  int32_t* ticket = scratch;
  volatile int32_t* seg_count = scratch + 2;
  volatile int32_t* seg_flag = scratch + 2 + kCompactMaxBlocks;
  if (threadIdx.x == 0) {
    shared_int[0] = atomicAdd(ticket, 1) - (epoch - 1) * static_cast<int32_t>(gridDim.x);
  }
  __syncthreads();
  const int b = shared_int[0];
  const int64_t m = count_in ? static_cast<int64_t>(*count_in) : rows;
  const int64_t tiles = (m + kCompactTile - 1) / kCompactTile;
  const int64_t per = (tiles + gridDim.x - 1) / gridDim.x * kCompactTile;
  const int64_t begin = min(m, b * per), end = min(m, begin + per);
  // The last block with rows writes the totals (block 0 when there are none).
  const int64_t n_used = per > 0 ? (m + per - 1) / per : 1;
  if (b >= n_used) return;

  int32_t local = 0;
  for (int64_t k = begin + 4 * threadIdx.x; k < end; k += kCompactTile) {
    const int4 a = load_marks(alive, k, end);
    local += (a.x != 0) + (a.y != 0) + (a.z != 0) + (a.w != 0);
  }
  int32_t mine = 0;
  block_exclusive_sum(local, warp_sums, &mine);
  if (threadIdx.x == 0 && b + 1 < n_used) {  // a later segment waits for it
    seg_count[b] = mine;
    __threadfence();
    seg_flag[b] = epoch;
  }
  if (threadIdx.x < 32) {  // the rows listed by the segments before this one
    int32_t before = 0;
    for (int s = threadIdx.x; s < b; s += 32) {
      while (seg_flag[s] != epoch) {
      }
      __threadfence();
      before += seg_count[s];
    }
#pragma unroll
    for (int d = 16; d > 0; d /= 2) before += __shfl_xor_sync(0xffffffffu, before, d);
    if (threadIdx.x == 0) shared_int[1] = before;
  }
  __syncthreads();
  int32_t slot = shared_int[1];

  for (int64_t k0 = begin; k0 < end; k0 += kCompactTile) {
    const int64_t k = k0 + 4 * threadIdx.x;
    const int4 a = load_marks(alive, k, end);
    const int32_t live[4] = {a.x != 0, a.y != 0, a.z != 0, a.w != 0};
    int32_t tile_total = 0;
    int32_t s = slot + block_exclusive_sum(live[0] + live[1] + live[2] + live[3], warp_sums,
                                           &tile_total);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (k + j < end) {
        if (live[j] || !drop) {
          const int64_t at = drop ? s : k + j;
          next_src[at] = static_cast<int32_t>(k + j);
          next_ids[at] = ids_in ? ids_in[k + j] : static_cast<int32_t>(k + j);
        }
        s += live[j];
      }
    }
    if (k + 4 <= end) {
      *reinterpret_cast<int4*>(alive + k) = make_int4(0, 0, 0, 0);
    } else {
      for (int j = 0; j < 4 && k + j < end; ++j) alive[k + j] = 0;
    }
    slot += tile_total;
  }
  if (threadIdx.x == 0 && b == n_used - 1) {  // its segment ends at m: slot = total
    *active_out = slot;
    *list_count = drop ? slot : static_cast<int32_t>(m);
    if (reset) *reset = 0;  // the next layer's work counter
  }
}

// alive[row] = 1 for the rows of row-major x with any nonzero feature (a warp per row).
// With bad (optional): *bad = 1 when x holds a NaN or an infinity.
template <typename T, typename A>
__global__ void mark_nonzero_rows(const T* __restrict__ x, int64_t rows, int n,
                                  int32_t* __restrict__ alive, int32_t* bad = nullptr) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  bool nonfinite = false;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows;
       row += warps) {
    bool nz = false;
    for (int c = lane; c < n; c += 32) {
      const A v = load_acc<A>(x + row * n + c);
      nz |= v != A(0);
      nonfinite |= !isfinite(v);
    }
    if (__any_sync(0xffffffffu, nz) && lane == 0) alive[row] = 1;
  }
  if (bad && nonfinite) *bad = 1;
}

// Threads per block of the two kernels below (a 32 x 33 tile of doubles per warp
// stays within the static shared-memory limit).
constexpr int kMoveThreads = 128;

// Row-major rows src[k] of x -> row-interleaved packed rows k < *count of y.  A
// warp moves a tile of kRows rows by 32 columns through shared memory: it reads
// each row's 32 columns as one coalesced segment and writes the tile's 32 columns,
// which are contiguous in the interleaved layout (kRows * 32 elements), coalesced.
template <typename T, int kRows>
__global__ void __launch_bounds__(kMoveThreads)
    interleave_rows(const T* __restrict__ x, const int32_t* __restrict__ src,
                    const int32_t* count, int n, T* __restrict__ y) {
  __shared__ T tiles[kMoveThreads / 32][kRows][33];
  auto& sm = tiles[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  const int64_t m = *count;
  const int col_blocks = (n + 31) / 32;
  const int64_t units = (m + kRows - 1) / kRows * col_blocks;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t u = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; u < units;
       u += warps) {
    const int64_t tile = u / col_blocks;
    const int c0 = static_cast<int>(u - tile * col_blocks) * 32;
    const int c = c0 + lane;
#pragma unroll 8
    for (int r = 0; r < kRows; ++r) {
      const int64_t k = tile * kRows + r;
      sm[r][lane] = k < m && c < n ? x[static_cast<int64_t>(src[k]) * n + c] : T(0);
    }
    __syncwarp();
    T* d = y + interleaved<kRows>(tile * kRows, c0, n);
    const int width = min(32, n - c0);
#pragma unroll 8
    for (int j = 0; j < kRows; ++j) {
      const int e = lane + 32 * j;  // element (column e / kRows, row e % kRows) of the block
      if (e / kRows < width) d[e] = sm[e % kRows][e / kRows];
    }
    __syncwarp();
  }
}

// Whether a stored feature is nonzero (half and bfloat16 widen exactly to float).
template <typename T>
__device__ __forceinline__ bool nonzero_value(T v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return v != T(0);
  } else {
    return static_cast<float>(v) != 0.f;
  }
}

// out[ids[k]] = row src[k] of the row-interleaved buf (row-major out), k < *count, and
// nonzero[ids[k]] = true where that row has a nonzero feature (nonzero: optional).  A
// warp moves 32 listed rows by 32 columns through shared memory: coalesced reads
// along the interleaved tile columns, coalesced writes along the output rows.
template <typename T, int kRows>
__global__ void __launch_bounds__(kMoveThreads)
    deinterleave_rows(const T* __restrict__ buf, const int32_t* __restrict__ src,
                      const int32_t* __restrict__ ids, const int32_t* count, int n,
                      T* __restrict__ out, bool* __restrict__ nonzero = nullptr) {
  __shared__ T tiles[kMoveThreads / 32][32][33];
  auto& sm = tiles[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  const int64_t m = *count;
  const int col_blocks = (n + 31) / 32;
  const int64_t units = (m + 31) / 32 * col_blocks;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t u = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; u < units;
       u += warps) {
    const int64_t k0 = u / col_blocks * 32;
    const int c0 = static_cast<int>(u - u / col_blocks * col_blocks) * 32;
    const int width = min(32, n - c0);
    const bool mine = k0 + lane < m;
    const int64_t p = mine ? src[k0 + lane] : 0;
#pragma unroll 8
    for (int j = 0; j < 32; ++j) {
      if (mine && j < width) sm[lane][j] = buf[interleaved<kRows>(p, c0 + j, n)];
    }
    __syncwarp();
    for (int r = 0; r < 32 && k0 + r < m; ++r) {
      const int64_t id = ids[k0 + r];
      if (lane < width) out[id * n + c0 + lane] = sm[r][lane];
      if (nonzero) {  // rows with a nonzero feature (the array was zeroed; only 1s written)
        const bool nz = lane < width && nonzero_value(sm[r][lane]);
        if (__any_sync(0xffffffffu, nz) && lane == 0) nonzero[id] = true;
      }
    }
    __syncwarp();
  }
}

template <typename T, typename A, int kRows, int kOuts>
xla::ffi::Error launch_footprint_layer(cudaStream_t stream, const FootprintArgs<T, A>& args) {
  constexpr int group = kThreads * kOuts;
  const int n_groups = (args.n_out + group - 1) / group;
  const int64_t n_work = (args.rows + kRows - 1) / kRows * n_groups;
  const int col_bytes = kRows * static_cast<int>(sizeof(A));
  const int chunk = std::max(8, kMaxSharedBytes / col_bytes / 8 * 8);
  const size_t smem = static_cast<size_t>(chunk) * col_bytes;
  auto kernel = footprint_layer_kernel<T, A, kRows, kOuts>;
  int resident = 0;
  if (auto err = resident_blocks(kernel, smem, &resident, "footprint layer"); err.failure()) {
    return err;
  }
  const int64_t n_blocks = std::min<int64_t>(n_work, resident);
  if (n_blocks == 0) return xla::ffi::Error::Success();
  kernel<<<static_cast<unsigned>(n_blocks), kThreads, smem, stream>>>(args, chunk, n_groups);
  return last_launch_error("footprint layer");
}

// The pipelined kernel's shared-memory plan for the device's per-block opt-in limit:
// weights (up to 8192 entries: 256 outputs of 32 nonzeros), then two footprint
// buffers as large as the rest allows.  Fails when fewer than 64 columns fit.
struct PipePlan {
  int wcap = 0, chunk = 0;
  size_t smem = 0;
};
template <typename A, int kRows, bool kMma = false>
PipePlan pipe_plan(int optin_bytes) {
  PipePlan plan;
  const int per_col = 2 * (kPipePitch<A, kRows> * static_cast<int>(sizeof(A)) + 4);
  const int fixed = 2 * kRows * 4 + 16;
  if constexpr (kMma) {  // the group's tiles, then footprints of one chunk
    plan.wcap = kMmaTileCap;
    plan.chunk = kMmaMaxCols;
    plan.smem = static_cast<size_t>(kMmaTileCap) * kMmaTileInt4 * 16 +
                static_cast<size_t>(plan.chunk) * per_col + fixed;
    if (plan.smem > static_cast<size_t>(optin_bytes)) return PipePlan{};
    return plan;
  }
  plan.wcap = 8192;
  const int rest = optin_bytes - plan.wcap * static_cast<int>(sizeof(A) + 4) - fixed;
  plan.chunk = rest / per_col / 8 * 8;
  if (plan.chunk < 64) return PipePlan{};
  plan.smem = static_cast<size_t>(plan.wcap) * (sizeof(A) + 4) +
              static_cast<size_t>(plan.chunk) * per_col + fixed;
  return plan;
}

// Launches the pipelined kernel; *launched is false (and nothing is launched) where
// the device's shared memory is too small for it.
template <typename A, int kRows, int H, bool kMma = false>
xla::ffi::Error launch_footprint_pipe(cudaStream_t stream, const FootprintArgs<A, A>& args,
                                      bool lean, bool* launched) {
  *launched = false;
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const PipePlan plan = pipe_plan<A, kRows, kMma>(optin);
  if (plan.smem == 0) return xla::ffi::Error::Success();
  const int n_groups = (args.n_out + kThreads - 1) / kThreads;
  auto kernel = footprint_pipe_kernel<A, kRows, H, kMma>;
  int resident = 0;
  if (auto err = resident_blocks(kernel, plan.smem, &resident, "footprint layer", kThreads * H);
      err.failure()) {
    return err;
  }
  const int64_t n_blocks =
      std::min<int64_t>((args.rows + kRows - 1) / kRows * n_groups, resident);
  *launched = true;
  if (n_blocks == 0) return xla::ffi::Error::Success();
  kernel<<<static_cast<unsigned>(n_blocks), kThreads * H, plan.smem, stream>>>(
      args, plan.chunk, plan.wcap, n_groups, lean);
  return last_launch_error("footprint layer");
}

// Whether the tensor-core form fits the device's shared memory.
inline bool mma_fits(int device) {
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return pipe_plan<float, 32, true>(optin).smem > 0;
}

// One layer in the tensor-core form where the device finds it applies, else on the FMA
// pipelined kernel: converts the layer's footprint packing into records (gate[1] set
// where a group does not fit), then launches both kernels; each returns at once unless
// the gate says it is the one.  gate[0] (sticky) is set where x was not finite.
template <int H>
xla::ffi::Error launch_footprint_mma(cudaStream_t stream, FootprintArgs<float, float> args,
                                     unsigned char* records, int32_t* gate, bool lean) {
  const int n_groups = (args.n_out + kThreads - 1) / kThreads;
  cudaMemsetAsync(gate + 1, 0, sizeof(int32_t), stream);
  footprint_mma_convert<<<n_groups, kThreads, 0, stream>>>(
      args.slice_ptr, args.indices, args.values, args.fp_ptr, args.fp_cols, args.n_out, records,
      gate);
  if (auto err = last_launch_error("footprint layer (tensor-core form)"); err.failure()) return err;
  args.gate = gate;
  args.mma = records;
  bool launched = false;
  if (auto err = launch_footprint_pipe<float, 32, H, true>(stream, args, lean, &launched);
      err.failure() || !launched) {
    return err.failure() ? err
                         : xla::ffi::Error::Internal("sparse_dnn: tensor-core kernel does not fit");
  }
  return launch_footprint_pipe<float, 32, H, false>(stream, args, lean, &launched);
}

}  // namespace spdnn::cuda
