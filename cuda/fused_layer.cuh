// The fused sparse layer kernel shared by sparse_linear and SparseDNN:
// y = min(act(x @ W + b), clip) with W stored by output neuron in warp-sliced ELL
// (jax_spdnn.sparse.pack_sliced_ell): the s-th nonzero of output 32w + l is at
// slice_ptr[w] + 32 s + l, rows padded to the slice's longest with an index past
// every input.  A warp's weight loads are therefore coalesced.
//
// One block owns a tile of kRows feature rows and kThreads * kOuts output
// neurons (thread t owns outputs t, t + kThreads, ...).  The block stages the
// tile's features in shared memory in chunks of input columns, transposed so
// that the kRows values of one input column are contiguous: each weight a thread
// loads from global memory is applied to kRows rows from registers, reading
// them with 16-byte shared loads.  Sorted rows let every thread resume where
// it stopped when the next chunk arrives, so any n_in works with bounded shared
// memory.  Column vectors are XOR-swizzled so both the staging stores and the
// random column reads spread over the 32 banks.  Each output is summed in
// order by one thread: deterministic, no floating-point atomics.  Blocks of one
// row tile are adjacent in the grid so their input tile is read from DRAM once.
//
// For whole networks the kernel also reads its rows through an active-row list
// (src_rows), takes the row count from device memory (count, with a persistent
// grid striding over the work) and builds the next layer's list itself: the
// block that finishes a row tile appends the tile's surviving rows (no separate
// compaction kernel, no scan over dead rows).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/common.cuh"

namespace spdnn::cuda {

// Tuned defaults in one place.
constexpr int kThreads = 256;
constexpr int kRows = 8;                    // feature rows per block (weight reuse)
constexpr int kMaxSharedBytes = 64 * 1024;  // shared-memory budget per block
constexpr int kSlice = 32;                  // outputs per ELL slice (= ELL_SLICE in sparse.py)
// Resident blocks per SM the registers must allow: 3 for up to 32 accumulators
// per thread, 2 for more (4 double outputs).
template <int kOuts, typename A>
constexpr int kMinBlocks = kOuts * kRows * sizeof(A) > 128 ? 2 : 3;

// Shared-memory slot of the 16-byte vector holding rows [q*E, q*E + E) of staged
// column c.  XOR-ing the low three bits with the next three spreads both access
// patterns over the 8 bank quads: random columns (compute) and consecutive
// columns (staging).  A bijection within each aligned group of 8 vectors.
template <int Q>
__device__ __forceinline__ int vec_slot(int c, int q) {
  const int v = c * Q + q;
  return v ^ ((v >> 3) & 7);
}

template <typename T, typename A>
struct LayerArgs {
  const T* x;                // input rows [*, n_in]
  const A* values;           // ELL values [total]
  const A* bias;             // [n_out]
  const int32_t* slice_ptr;  // [n_slices + 1]
  const int32_t* indices;    // ELL indices [total]
  T* y;                      // packed output rows [rows, n_out]
  int64_t rows;              // rows (an upper bound when count is set)
  const int32_t* count;      // device-side row count, or nullptr for `rows`
  const int32_t* src_rows;   // input row of each packed row, or nullptr for identity
  // Fused compaction (whole networks; all nullptr for a single layer).  The block
  // that finishes a row tile last lists the tile's rows with a nonzero output:
  // slot = atomicAdd(active_out, 1), next_src[slot] = packed row, next_ids[slot] =
  // ids_in[packed row] (with drop off: slot = packed row, every row listed).  Row
  // order in the next list is arbitrary, results are not: each row is computed
  // alone, in a fixed order.  With several output groups per tile, the groups
  // meet through alive (OR of their marks) and done (groups finished per tile).
  int32_t* alive;            // [rows] zero on entry, left zero
  int32_t* done;             // [tiles] zero on entry, left zero
  const int32_t* ids_in;     // original id of each packed input row
  int32_t* next_src;         // next list: packed row of each surviving row
  int32_t* next_ids;         // next list: original id of each surviving row
  int32_t* active_out;       // count of rows with a nonzero output (zero on entry)
  bool drop;                 // list only rows with a nonzero output
  int n_in, n_out;
  bool relu;
  A clip;
};

template <typename T, typename A, int kOuts>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<kOuts, A>))
    fused_layer_kernel(const LayerArgs<T, A> args, int chunk, int n_groups) {
  const T* __restrict__ x = args.x;
  const A* __restrict__ values = args.values;
  const A* __restrict__ bias = args.bias;
  const int32_t* __restrict__ slice_ptr = args.slice_ptr;
  const int32_t* __restrict__ indices = args.indices;
  T* __restrict__ y = args.y;
  const int n_in = args.n_in, n_out = args.n_out;
  const bool relu = args.relu;
  const A clip = args.clip;
  using V = Vec16<A>;
  using VT = typename V::type;
  constexpr int E = V::n;      // accumulators per 16-byte vector
  constexpr int Q = kRows / E; // vectors per staged input column
  static_assert(kRows % E == 0, "kRows must fill whole 16-byte vectors");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const VT* xv = reinterpret_cast<const VT*>(smem_raw);
  __shared__ int row_live[kRows];
  __shared__ int last_group;

  // Rows to compute: a static count, or one a previous kernel left on the device
  // (then the grid is persistent and strides over the work).
  const int64_t rows = args.count ? static_cast<int64_t>(*args.count) : args.rows;
  const int64_t n_work = (rows + kRows - 1) / kRows * n_groups;
  for (int64_t item = blockIdx.x; item < n_work; item += gridDim.x) {
  const int64_t tile = item / n_groups;
  const int group = static_cast<int>(item - tile * n_groups);
  const int64_t row0 = tile * kRows;
  const int valid = static_cast<int>(min(static_cast<int64_t>(kRows), rows - row0));
  // Input row of each packed row: through the active-row list when there is one.
  int64_t src_row[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t k = row0 + min(r, valid - 1);
    src_row[r] = args.src_rows ? static_cast<int64_t>(__ldg(args.src_rows + k)) : k;
  }

  if (args.active_out) {
    if (threadIdx.x < kRows) row_live[threadIdx.x] = 0;
    __syncthreads();
  }

  int pos[kOuts], end[kOuts];
  A acc[kOuts][kRows];
#pragma unroll
  for (int o = 0; o < kOuts; ++o) {
    const int j = (group * kOuts + o) * kThreads + threadIdx.x;
    const int w = j / kSlice, lane = j % kSlice;
    pos[o] = j < n_out ? __ldg(slice_ptr + w) + lane : 0;
    end[o] = j < n_out ? __ldg(slice_ptr + w + 1) : 0;
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[o][r] = A(0);
  }

  for (int c0 = 0; c0 < n_in; c0 += chunk) {
    const int cn = min(chunk, n_in - c0);
    __syncthreads();  // everyone is done with the previous chunk
    // Each thread gathers E rows of one column (loads coalesced across the warp
    // along the column) and writes them as one conflict-free 16-byte vector.
    VT* xw = reinterpret_cast<VT*>(smem_raw);
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      for (int c = threadIdx.x; c < cn; c += kThreads) {
        A e[E];
#pragma unroll
        for (int k = 0; k < E; ++k) {
          const int r = q * E + k;
          e[k] = r < valid ? load_acc<A>(x + src_row[r] * n_in + c0 + c) : A(0);
        }
        xw[vec_slot<Q>(c, q)] = V::make(e);
      }
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
    if (cn == n_in) {
      // Whole rows are resident: only padding (index past every input) ends a
      // row early; four weights a step.
#pragma unroll
      for (int o = 0; o < kOuts; ++o) {
        int p = pos[o];
        const int e = end[o];
        for (; p + 3 * S < e; p += 4 * S) {
          const int i0 = __ldg(indices + p), i1 = __ldg(indices + p + S);
          const int i2 = __ldg(indices + p + 2 * S), i3 = __ldg(indices + p + 3 * S);
          if (i3 >= c1) break;  // padding sorts last: i0..i2 are real when i3 is
          const A v0 = __ldg(values + p), v1 = __ldg(values + p + S);
          const A v2 = __ldg(values + p + 2 * S), v3 = __ldg(values + p + 3 * S);
          apply(o, v0, i0);
          apply(o, v1, i1);
          apply(o, v2, i2);
          apply(o, v3, i3);
        }
        for (; p < e; p += S) {
          const int i = __ldg(indices + p);
          if (i >= c1) break;  // padding
          apply(o, __ldg(values + p), i);
        }
        pos[o] = p;
      }
    } else {
      // Rows continue past this chunk.  Walk all kOuts rows in step, two slots
      // each, so the independent weight loads overlap instead of forming one
      // long dependent chain; a row stops at its first input past the chunk.
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
    const int j = (group * kOuts + o) * kThreads + threadIdx.x;
    if (j >= n_out) continue;
    const A b = __ldg(bias + j);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < valid) {
        A out = acc[o][r] + b;
        if (relu && out < A(0)) out = A(0);  // comparisons keep NaN, like jnp.maximum
        if (out > clip) out = clip;
        // Liveness of the value as stored (half precision may round to zero).
        nonzero[r] |= store_from(y + (row0 + r) * static_cast<int64_t>(n_out) + j, out) != A(0);
      }
    }
  }
  if (args.active_out) {
    // Rows of this tile with a nonzero output in this group (same-value stores).
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (__any_sync(0xffffffffu, nonzero[r]) && (threadIdx.x % 32) == 0) row_live[r] = 1;
    }
    __syncthreads();
    bool last = true;
    if (n_groups > 1) {
      if (threadIdx.x < valid && row_live[threadIdx.x]) atomicOr(args.alive + row0 + threadIdx.x, 1);
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) last_group = atomicAdd(args.done + tile, 1) == n_groups - 1;
      __syncthreads();
      last = last_group;
    }
    if (last && threadIdx.x < valid) {
      const int64_t k = row0 + threadIdx.x;
      bool live = row_live[threadIdx.x];
      if (n_groups > 1) {
        __threadfence();
        live = atomicExch(args.alive + k, 0) != 0;
        if (threadIdx.x == 0) args.done[tile] = 0;
      }
      int64_t slot = k;
      if (live) {
        const int32_t s = atomicAdd(args.active_out, 1);
        if (args.drop) slot = s;
      }
      if (live || !args.drop) {
        args.next_src[slot] = static_cast<int32_t>(k);
        args.next_ids[slot] = args.ids_in[k];
      }
    }
    __syncthreads();  // row_live and last_group are reused by the next item
  }
  }  // work items
}

// Blocks of `kernel` that fit on the current device at once with `smem` bytes of
// dynamic shared memory (raising the kernel's limit above 48 KB when needed).
// Cached: a network launches kernels once per layer, and the attribute and
// occupancy queries would otherwise cost more than a small layer.  Keys take few
// values (a kernel, its shared-memory size, the device), so the cache stays tiny.
template <typename Kernel>
xla::ffi::Error resident_blocks(Kernel kernel, size_t smem, int* blocks, const char* what,
                                int threads = kThreads) {
  struct Launch { const void* kernel; size_t smem; int device; int blocks; };
  static std::mutex mu;
  static std::vector<Launch> cache;
  int device = 0;
  cudaGetDevice(&device);
  const void* key = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> lock(mu);
  size_t largest = kMaxSharedBytes;  // the largest size a cached launch of it uses
  for (const Launch& c : cache) {
    if (c.kernel == key && c.smem == smem && c.device == device) {
      *blocks = c.blocks;
      return xla::ffi::Error::Success();
    }
    if (c.kernel == key && c.device == device) largest = std::max(largest, c.smem);
  }
  if (smem > 48 * 1024) {
    // The limit is the kernel's, not the launch's: raise it to the largest size any launch
    // uses (setting this launch's size could lower it below a cached larger one).
    const int limit = static_cast<int>(std::max(smem, largest));
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
    if (err != cudaSuccess) {
      return xla::ffi::Error::Internal(std::string(what) + ": cudaFuncSetAttribute: " +
                                       cudaGetErrorString(err));
    }
  }
  int sms = 0, per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads,
                                                                  static_cast<int>(smem));
  if (err != cudaSuccess) {
    return xla::ffi::Error::Internal(std::string(what) + ": occupancy query: " +
                                     cudaGetErrorString(err));
  }
  *blocks = std::max(1, sms * per_sm);
  cache.push_back({key, smem, device, *blocks});
  return xla::ffi::Error::Success();
}

template <typename T, typename A, int kOuts>
xla::ffi::Error launch_outs(cudaStream_t stream, const LayerArgs<T, A>& args) {
  const int per_block = kThreads * kOuts;
  const int n_groups = (args.n_out + per_block - 1) / per_block;
  const int64_t n_work = (args.rows + kRows - 1) / kRows * n_groups;
  const int col_bytes = kRows * static_cast<int>(sizeof(A));
  // Chunks of whole groups of 8 columns keep the swizzle inside the buffer.
  const int chunk = std::max(1, std::min(args.n_in, kMaxSharedBytes / col_bytes / 8 * 8));
  const size_t smem = static_cast<size_t>((chunk + 7) / 8 * 8) * col_bytes;
  auto kernel = fused_layer_kernel<T, A, kOuts>;
  int resident = 0;
  if (auto err = resident_blocks(kernel, smem, &resident, "fused layer"); err.failure()) {
    return err;
  }
  int64_t n_blocks = n_work;
  if (args.count) {  // persistent grid: as many blocks as fit on the device at once
    n_blocks = std::min<int64_t>(n_work, resident);
  }
  if (n_blocks > 0x7fffffff) {
    return xla::ffi::Error::InvalidArgument("fused layer: batch too large for one launch");
  }
  if (n_blocks == 0) return xla::ffi::Error::Success();
  kernel<<<static_cast<unsigned>(n_blocks), kThreads, smem, stream>>>(args, chunk, n_groups);
  return last_launch_error("fused layer");
}

// Wider output groups share one staged tile among more outputs (less staging
// traffic when rows span several chunks) at the cost of registers.  Measured on
// H100 (benchmarks/RESULTS.md): 4 beats 2 everywhere and 8 (64 accumulators,
// 2 blocks/SM) loses to 4 even at N = 16384.  SPDNN_LINEAR_OUTS overrides the
// choice (1, 2 or 4) for tuning runs.
template <typename T, typename A>
xla::ffi::Error launch_layer(cudaStream_t stream, const LayerArgs<T, A>& args) {
  static const int forced = [] {
    const char* env = std::getenv("SPDNN_LINEAR_OUTS");
    return env ? std::atoi(env) : 0;
  }();
  int outs = forced;
  if (outs == 0) outs = args.n_out >= 4 * kThreads ? 4 : args.n_out >= 2 * kThreads ? 2 : 1;
  if (outs >= 4) return launch_outs<T, A, 4>(stream, args);
  if (outs >= 2) return launch_outs<T, A, 2>(stream, args);
  return launch_outs<T, A, 1>(stream, args);
}

}  // namespace spdnn::cuda
