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
  int64_t rows;              // upper bound of *count (sizes the grid)
  int n_in, n_out;
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

// Lists the marked rows in order, in one block: next_src[s] = k and next_ids[s] =
// ids_in[k] (k without ids_in) for the s-th k < m with alive[k] set (with drop off:
// every k, at slot k), where m = *count_in (rows without count_in).  Writes the
// number of marked rows to *active_out and the list's length to *list_count, and
// clears the marks.
constexpr int kCompactThreads = 1024;

__global__ void __launch_bounds__(kCompactThreads)
    compact_rows(const int32_t* count_in, int64_t rows, int32_t* __restrict__ alive,
                 const int32_t* __restrict__ ids_in, bool drop, int32_t* __restrict__ next_src,
                 int32_t* __restrict__ next_ids, int32_t* active_out, int32_t* list_count) {
  __shared__ int32_t warp_sums[kCompactThreads / 32];
  const int64_t m = count_in ? static_cast<int64_t>(*count_in) : rows;
  const int64_t per = (m + kCompactThreads - 1) / kCompactThreads;
  const int64_t begin = min(m, threadIdx.x * per), end = min(m, begin + per);
  int32_t local = 0;
  for (int64_t k = begin; k < end; ++k) local += alive[k] != 0;
  // Exclusive scan of the per-thread counts over the block.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int32_t incl = local;
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
  int32_t slot = incl - local + (warp > 0 ? warp_sums[warp - 1] : 0);
  const int32_t total = warp_sums[kCompactThreads / 32 - 1];
  for (int64_t k = begin; k < end; ++k) {
    const bool live = alive[k] != 0;
    if (live || !drop) {
      const int64_t s = drop ? slot : k;
      next_src[s] = static_cast<int32_t>(k);
      next_ids[s] = ids_in ? ids_in[k] : static_cast<int32_t>(k);
    }
    slot += live;
    alive[k] = 0;
  }
  if (threadIdx.x == 0) {
    *active_out = total;
    *list_count = drop ? total : static_cast<int32_t>(m);
  }
}

// alive[row] = 1 for the rows of row-major x with any nonzero feature (a warp per row).
template <typename T, typename A>
__global__ void mark_nonzero_rows(const T* __restrict__ x, int64_t rows, int n,
                                  int32_t* __restrict__ alive) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows;
       row += warps) {
    bool nz = false;
    for (int c = lane; c < n; c += 32) nz |= load_acc<A>(x + row * n + c) != A(0);
    if (__any_sync(0xffffffffu, nz) && lane == 0) alive[row] = 1;
  }
}

// Row-major rows src[k] of x -> row-interleaved packed rows k < *count of y (a tile
// column per thread: coalesced reads along the row, contiguous writes).
template <typename T, int kRows>
__global__ void interleave_rows(const T* __restrict__ x, const int32_t* __restrict__ src,
                                const int32_t* count, int n, T* __restrict__ y) {
  const int64_t m = *count;
  const int64_t total = (m + kRows - 1) / kRows * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t tile = e / n;
    const int c = static_cast<int>(e - tile * n);
    T v[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t k = tile * kRows + r;
      v[r] = k < m ? x[static_cast<int64_t>(src[k]) * n + c] : T(0);
    }
    T* d = y + interleaved<kRows>(tile * kRows, c, n);
#pragma unroll
    for (int r = 0; r < kRows; ++r) d[r] = v[r];
  }
}

// out[ids[k]] = row src[k] of the row-interleaved buf (row-major out), k < *count.
template <typename T, int kRows>
__global__ void deinterleave_rows(const T* __restrict__ buf, const int32_t* __restrict__ src,
                                  const int32_t* __restrict__ ids, const int32_t* count, int n,
                                  T* __restrict__ out) {
  const int64_t total = static_cast<int64_t>(*count) * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t k = e / n;
    const int c = static_cast<int>(e - k * n);
    out[static_cast<int64_t>(ids[k]) * n + c] = buf[interleaved<kRows>(src[k], c, n)];
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

}  // namespace spdnn::cuda
