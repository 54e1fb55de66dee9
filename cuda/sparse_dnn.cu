// CUDA kernels of SparseDNN: a whole network of L square sparse layers in one FFI
// call, Y <- min(relu(Y W_l + b_l), clip), with dead rows dropped on the device.
//
// Per layer the handler enqueues one kernel and never synchronizes with the host:
// the fused layer kernel (cuda/fused_layer.cuh) reads the active rows through a
// list, writes its outputs packed, and builds the next list itself (the block
// that finishes a row tile appends its surviving rows with an atomic counter,
// which is also the layer's active count).  The order of rows within a list
// depends on timing; the results do not, because every row is computed alone
// in a fixed order and finally scattered back to its original position.  The
// layer kernel runs a persistent grid that reads the row count from device
// memory, so no launch depends on host-side knowledge of how many rows survive.

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>

#include <cuda_pipeline.h>

#include "cuda/common.cuh"
#include "cuda/footprint_layer.cuh"
#include "cuda/fused_layer.cuh"
#include "cuda/stationary_layers.cuh"

namespace ffi = xla::ffi;

namespace spdnn::cuda {
namespace {

// The first list: rows of x with any nonzero feature (one warp per row); with
// drop off, every row in order and *count = rows.
template <typename T, typename A>
__global__ void list_nonzero_rows(const T* __restrict__ x, int64_t rows, int n, bool drop,
                                  int32_t* __restrict__ src, int32_t* __restrict__ ids,
                                  int32_t* __restrict__ count) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  if (!drop && blockIdx.x == 0 && threadIdx.x == 0) *count = static_cast<int32_t>(rows);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows;
       row += warps) {
    bool nz = false;
    for (int c = lane; c < n; c += 32) nz |= load_acc<A>(x + row * n + c) != A(0);
    const bool any = __any_sync(0xffffffffu, nz);
    if (lane == 0 && (any || !drop)) {
      const int64_t slot = drop ? atomicAdd(count, 1) : row;
      src[slot] = static_cast<int32_t>(row);
      ids[slot] = static_cast<int32_t>(row);
    }
  }
}

// y[ids[k]] = buf[src[k]] (buf[k] without src) for the *count surviving rows.
template <typename T>
__global__ void scatter_rows(const T* __restrict__ buf, const int32_t* __restrict__ src,
                             const int32_t* __restrict__ ids, const int32_t* __restrict__ count,
                             int n, T* __restrict__ y) {
  const int64_t total = static_cast<int64_t>(*count) * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t k = e / n, j = e - k * n;
    const int64_t from = src ? static_cast<int64_t>(src[k]) : k;
    y[static_cast<int64_t>(ids[k]) * n + j] = buf[from * n + j];
  }
}

template <typename T, typename A>
ffi::Error run_network(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                       ffi::AnyBuffer bias, const int32_t* slice_ptr, const int32_t* indices,
                       ffi::Result<ffi::AnyBuffer> y, int32_t* active, ffi::Result<ffi::AnyBuffer> work,
                       int32_t* iwork, int64_t rows, int n, int64_t n_layers, double clip,
                       bool drop, ffi::Span<const int64_t> sp_off, ffi::Span<const int64_t> ell_off) {
  constexpr ffi::DataType acc = sizeof(A) == 8 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (values.element_type() != acc || bias.element_type() != acc) {
    return ffi::Error::InvalidArgument(
        "sparse_dnn: values and bias must have the accumulation dtype of x");
  }
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  T* yp = reinterpret_cast<T*>(y->untyped_data());
  T* feat = reinterpret_cast<T*>(work->untyped_data());
  const A* vp = reinterpret_cast<const A*>(values.untyped_data());
  const A* bp = reinterpret_cast<const A*>(bias.untyped_data());
  // Integer workspace: alive and done (zero between kernels), two row lists of
  // packed positions and original ids (double-buffered), the first count.
  int32_t* alive = iwork;
  int32_t* done = iwork + rows;
  int32_t* src[2] = {iwork + 2 * rows, iwork + 3 * rows};
  int32_t* ids[2] = {iwork + 4 * rows, iwork + 5 * rows};
  int32_t* count0 = iwork + 6 * rows;
  cudaMemsetAsync(iwork, 0, sizeof(int32_t) * 2 * rows, stream);
  cudaMemsetAsync(count0, 0, sizeof(int32_t) * 2, stream);
  cudaMemsetAsync(active, 0, sizeof(int32_t) * n_layers, stream);

  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const unsigned grid = static_cast<unsigned>(std::max(1, sms * 8));

  list_nonzero_rows<T, A><<<grid, 256, 0, stream>>>(xp, rows, n, drop, src[0], ids[0], count0);
  if (auto err = last_launch_error("sparse_dnn: first row list"); err.failure()) return err;

  const T* in = xp;
  const int32_t* count = count0;
  int cur = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    LayerArgs<T, A> args{};
    args.x = in;
    args.values = vp + ell_off[l];
    args.bias = bp + l * n;
    args.slice_ptr = slice_ptr + sp_off[l];
    args.indices = indices + ell_off[l];
    args.y = feat + (l % 2) * rows * n;
    args.rows = rows;
    args.count = count;
    args.src_rows = src[cur];
    args.alive = alive;
    args.done = done;
    args.ids_in = ids[cur];
    args.next_src = src[1 - cur];
    args.next_ids = ids[1 - cur];
    args.active_out = active + l;
    args.drop = drop;
    args.n_in = n;
    args.n_out = n;
    args.relu = true;
    args.clip = static_cast<A>(clip);
    if (auto err = launch_layer<T, A>(stream, args); err.failure()) return err;
    in = args.y;
    if (drop) count = active + l;
    cur = 1 - cur;
  }
  cudaMemsetAsync(yp, 0, sizeof(T) * rows * n, stream);
  scatter_rows<T><<<grid, 256, 0, stream>>>(in, src[cur], ids[cur], count, n, yp);
  return last_launch_error("sparse_dnn: scatter");
}

ffi::Error sparse_dnn_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                           ffi::AnyBuffer bias, ffi::Buffer<ffi::S32> slice_ptr,
                           ffi::Buffer<ffi::S32> indices, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::Buffer<ffi::S32>> active,
                           ffi::Result<ffi::AnyBuffer> work,
                           ffi::Result<ffi::Buffer<ffi::S32>> iwork, double clip, bool drop_dead,
                           ffi::Span<const int64_t> sp_off, ffi::Span<const int64_t> ell_off) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("sparse_dnn: x must be [batch, n]");
  const int64_t rows = xd[0], n = xd[1];
  const int64_t n_layers = static_cast<int64_t>(active->element_count());
  const int64_t n_slices = (n + kSlice - 1) / kSlice;
  if (n > 0x7fffffff || rows >= 0x7fffffff) {
    return ffi::Error::InvalidArgument("sparse_dnn: batch and n must be below 2^31");
  }
  if (static_cast<int64_t>(sp_off.size()) != n_layers ||
      static_cast<int64_t>(ell_off.size()) != n_layers + 1 ||
      static_cast<int64_t>(bias.element_count()) != n_layers * n ||
      static_cast<int64_t>(slice_ptr.element_count()) != n_layers * (n_slices + 1) ||
      static_cast<int64_t>(indices.element_count()) != ell_off[n_layers] ||
      static_cast<int64_t>(values.element_count()) != ell_off[n_layers] ||
      static_cast<int64_t>(work->element_count()) != 2 * rows * n ||
      static_cast<int64_t>(iwork->element_count()) != 6 * rows + 2) {
    return ffi::Error::InvalidArgument("sparse_dnn: inconsistent buffer sizes for L and n");
  }
  if (x.element_type() != y->element_type() || x.element_type() != work->element_type()) {
    return ffi::Error::InvalidArgument("sparse_dnn: x, y and the workspace must share a dtype");
  }
  if (rows == 0 || n_layers == 0) {
    cudaMemsetAsync(active->typed_data(), 0, sizeof(int32_t) * n_layers, stream);
    return last_launch_error("sparse_dnn");
  }
  const HostTiming report{"sparse_dnn", n_layers};
  const int ni = static_cast<int>(n);
  int32_t* ap = active->typed_data();
  int32_t* ip = iwork->typed_data();
  const int32_t* sp = slice_ptr.typed_data();
  const int32_t* ix = indices.typed_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return run_network<float, float>(stream, x, values, bias, sp, ix, y, ap, work, ip, rows, ni,
                                       n_layers, clip, drop_dead, sp_off, ell_off);
    case ffi::DataType::F64:
      return run_network<double, double>(stream, x, values, bias, sp, ix, y, ap, work, ip, rows,
                                         ni, n_layers, clip, drop_dead, sp_off, ell_off);
    case ffi::DataType::BF16:
      return run_network<__nv_bfloat16, float>(stream, x, values, bias, sp, ix, y, ap, work, ip,
                                               rows, ni, n_layers, clip, drop_dead, sp_off, ell_off);
    case ffi::DataType::F16:
      return run_network<__half, float>(stream, x, values, bias, sp, ix, y, ap, work, ip, rows, ni,
                                        n_layers, clip, drop_dead, sp_off, ell_off);
    default:
      return ffi::Error::InvalidArgument("sparse_dnn: unsupported feature dtype");
  }
}


// ---------------------------------------------------------------------------------------
// The resident kernel: several layers per launch, features kept in shared memory.
//
// Rows are independent through the whole network, so a block that owns a tile of R rows
// can run any number of consecutive layers on them without meeting other blocks: the
// tile's features stay in shared memory, only the weights (read by every block, so
// served from L2) stream in.  One row per lane: a warp splits into G = 32 / R lane
// groups that work on one output neuron together, group g taking the nonzeros whose
// input i has i % G == g (jax_spdnn.sparse.pack_bank_split).  Input i of row r lives at
// word i * R + (s ^ r) with s = (i / G) % R, so at every step the 32 lanes read 32
// distinct banks; one 16-byte load gives a group two (offset, weight) steps.  The G
// partial sums meet through XOR shuffles (the same sum on every lane of the row);
// group g keeps outputs j with j % G == g in registers until the whole block is done
// with the layer's inputs, then overwrites them in place (bias, ReLU, clamp, rounded to
// the storage type).  Rows are summed in a fixed order: deterministic, no atomics on
// values.  Liveness per row is counted per layer (one atomic per tile and layer);
// when every row of a tile died the block skips the rest of the segment.  At the end of
// a segment the surviving rows are written packed to global memory with their ids.
// A persistent grid strides over the tiles of the row count left on the device.
constexpr int kResThreads = 1024;
constexpr int kResWarps = kResThreads / 32;

template <typename T>
struct ResidentArgs {
  const T* x;              // segment input rows
  const int32_t* src;      // input row of each listed row, or nullptr for identity
  const int32_t* ids_in;   // original id of each listed row
  const int32_t* count;    // listed rows (device)
  T* y;                    // segment output rows, packed
  int32_t* ids_out;        // original id of each output row
  int32_t* count_out;      // surviving rows (zero on entry); nullptr without drop
  int32_t* active;         // [L] rows alive after each layer (zero on entry)
  const int4* entries;     // {offset, weight bits} pairs, all layers
  const int32_t* col_ptr;  // [L - lbase, n + 1] first step of each output (absolute)
  int lbase;               // first layer of col_ptr
  const float* bias;       // [L, n]
  int n, l0, l1;
  float clip;
  bool drop;
};

template <int G>
__device__ __forceinline__ int bank_word(int c) {
  constexpr int R = 32 / G;
  return c * R + (c / G) % R;
}

template <typename T> __device__ __forceinline__ float round_to(float v) { return v; }
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ float round_to<__half>(float v) {
  return __half2float(__float2half_rn(v));
}

template <typename T, int G>
__global__ void __launch_bounds__(kResThreads, 1) resident_layers(const ResidentArgs<T> a) {
  constexpr int R = 32 / G;
  const int n = a.n;
  const int words = (n + G) * R;  // n inputs, then G zero inputs
  extern __shared__ float smem[];
  float* const buf0 = smem;        // ping-pong feature buffers
  float* const buf1 = smem + words;
  // Per layer parity: col_ptr [n + 1] and bias [n], copied in asynchronously (cp.async)
  // one layer ahead, so the column walk never waits on global memory for them.
  int* const cp_s = reinterpret_cast<int*>(smem + 2 * words);  // [2][n + 1]
  float* const bias_s = smem + 2 * words + 2 * (n + 1);        // [2][n]
  __shared__ int row_live[2][R];
  __shared__ int all_dead;
  __shared__ int64_t slot[R];
  __shared__ int4 wbuf[kResWarps][32];  // each warp's current chunk of weights
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / R, r = lane % R;
  const int C = (n + kResWarps - 1) / kResWarps;  // outputs per warp, all groups on each
  const int j0 = min(n, warp * C), j1 = min(n, j0 + C);
  const int64_t rows = *a.count;
  auto fetch = [&](int l) {
    const int32_t* cp = a.col_ptr + static_cast<int64_t>(l - a.lbase) * (n + 1);
    const float* bl = a.bias + static_cast<int64_t>(l) * n;
    int* cd = cp_s + (l & 1) * (n + 1);
    float* bd = bias_s + (l & 1) * n;
    for (int t = threadIdx.x; t <= n; t += kResThreads) {
      __pipeline_memcpy_async(cd + t, cp + t, sizeof(int));
      if (t < n) __pipeline_memcpy_async(bd + t, bl + t, sizeof(float));
    }
    __pipeline_commit();
  };

  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * R; row0 < rows;
       row0 += static_cast<int64_t>(gridDim.x) * R) {
    const int valid = static_cast<int>(min(static_cast<int64_t>(R), rows - row0));
    fetch(a.l0);
    for (int rr = 0; rr < R; ++rr) {  // stage: coalesced loads, conflict-free stores
      const T* xr = nullptr;
      if (rr < valid) {
        const int64_t k = row0 + rr;
        xr = a.x + (a.src ? static_cast<int64_t>(__ldg(a.src + k)) : k) * n;
      }
      for (int c = threadIdx.x; c < n + G; c += kResThreads) {
        const int w = bank_word<G>(c) ^ rr;
        buf0[w] = xr && c < n ? load_acc<float>(xr + c) : 0.f;
        if (c >= n) buf1[w] = 0.f;  // the zero inputs of the other buffer
      }
    }
    __pipeline_wait_prior(0);
    if (threadIdx.x < 2 * R) (&row_live[0][0])[threadIdx.x] = 0;
    if (threadIdx.x == 0) all_dead = 0;
    __syncthreads();

    int l = a.l0;
    for (; l < a.l1; ++l) {
      const float* in = (l - a.l0) % 2 ? buf1 : buf0;
      float* out = (l - a.l0) % 2 ? buf0 : buf1;
      if (l + 1 < a.l1) fetch(l + 1);
      const int* cps = cp_s + (l & 1) * (n + 1);
      const float* bias_l = bias_s + (l & 1) * n;
      bool nz = false;
      if (j0 < j1) {
        // The warp's columns are one contiguous stream of (offset, weight) pairs.  The
        // warp loads it in coalesced 512-byte chunks (one 16-byte vector per lane), one
        // chunk ahead in registers, and parks the current chunk in shared memory, where
        // each lane group reads its pairs back as broadcasts: the loads overlap the
        // compute instead of each step waiting on L2.
        constexpr int kSteps = 32 / G;  // pair steps per chunk
        const int q0 = cps[j0] >> 1, total = (cps[j1] >> 1) - q0;
        const int vecs = total * G;
        const int4* es = a.entries + static_cast<int64_t>(q0) * G;
        const int4 zero = make_int4(0, 0, 0, 0);
        int4* const wb = wbuf[warp];
        __syncwarp();
        wb[lane] = lane < vecs ? __ldg(es + lane) : zero;
        int4 ahead = 32 + lane < vecs ? __ldg(es + 32 + lane) : zero;
        __syncwarp();
        int j = j0, end = (cps[j0 + 1] >> 1) - q0;
        float acc0 = 0.f, acc1 = 0.f;
        auto finish = [&]() {  // column j is complete (possibly empty)
          float v = acc0 + acc1;
#pragma unroll
          for (int m = R; m < 32; m *= 2) v += __shfl_xor_sync(~0u, v, m);
          v += bias_l[j];
          if (v < 0.f) v = 0.f;  // comparisons keep NaN, like jnp.maximum
          if (v > a.clip) v = a.clip;
          v = round_to<T>(v);  // liveness and next inputs as stored
          if (g == 0) {
            out[bank_word<G>(j) ^ r] = v;
            nz |= v != 0.f;
          }
          acc0 = acc1 = 0.f;
          ++j;
          end = (cps[j + 1 <= n ? j + 1 : n] >> 1) - q0;
        };
        for (int q = 0, chunk = 0; q < total; ++chunk) {
#pragma unroll 4
          for (int k = 0; k < kSteps; ++k) {
            if (q == total) break;
            while (q == end) finish();
            const int4 v = wb[k * G + g];
            acc0 = fmaf(__int_as_float(v.y), in[v.x ^ r], acc0);
            acc1 = fmaf(__int_as_float(v.w), in[v.z ^ r], acc1);
            ++q;
          }
          __syncwarp();
          wb[lane] = ahead;
          const int next = (chunk + 2) * 32 + lane;
          ahead = next < vecs ? __ldg(es + next) : zero;
          __syncwarp();
        }
        while (j < j1) finish();
      }
      if (nz && r < valid) row_live[l & 1][r] = 1;
      __pipeline_wait_prior(0);  // the next layer's col_ptr and bias have landed
      __syncthreads();
      if (warp == 0) {
        const unsigned live = __ballot_sync(~0u, lane < R && row_live[l & 1][lane % R]);
        if (lane == 0) {
          if (live) atomicAdd(a.active + l, __popc(live));
          all_dead = a.drop && !live;
        }
        if (lane < R) row_live[(l + 1) & 1][lane] = 0;
      }
      __syncthreads();
      if (all_dead) break;  // the rest of the segment is zeros for this tile
    }

    if (!all_dead) {
      const float* fin = (a.l1 - a.l0) % 2 ? buf1 : buf0;
      if (threadIdx.x < R) {
        const int rr = threadIdx.x;
        int64_t s = -1;
        if (rr < valid) {
          if (!a.drop) {
            s = row0 + rr;
          } else if (row_live[(a.l1 - 1) & 1][rr]) {
            s = atomicAdd(a.count_out, 1);
          }
        }
        slot[rr] = s;
        if (s >= 0) a.ids_out[s] = a.ids_in[row0 + rr];
      }
      __syncthreads();
      for (int rr = 0; rr < R; ++rr) {
        const int64_t s = slot[rr];
        if (s < 0) continue;
        T* yr = a.y + s * n;
        for (int c = threadIdx.x; c < n; c += kResThreads) store_from(yr + c, fin[bank_word<G>(c) ^ rr]);
      }
    }
    __syncthreads();  // buffers and slot are reused by the next tile
  }
}

template <typename T, int G>
ffi::Error launch_resident(cudaStream_t stream, const ResidentArgs<T>& a, int64_t max_rows) {
  constexpr int R = 32 / G;
  const size_t smem = (2 * static_cast<size_t>(a.n + G) * R + 2 * (2 * a.n + 1)) * sizeof(float);
  auto kernel = resident_layers<T, G>;
  // Per device (the attribute is per context): the largest dynamic shared memory
  // allowed so far, and the occupancy at the last size asked for.
  struct State { size_t smem_set = 48 * 1024; size_t occ_smem = 0; int per_sm = 0; };
  static std::mutex mu;
  static State states[64];
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (device < 0 || device >= 64) return ffi::Error::Internal("sparse_dnn: device id out of range");
  int per_sm = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    State& st = states[device];
    if (smem > st.smem_set) {
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
      if (err != cudaSuccess) {
        return ffi::Error::Internal(std::string("sparse_dnn: cudaFuncSetAttribute: ") +
                                    cudaGetErrorString(err));
      }
      st.smem_set = smem;
    }
    if (st.occ_smem != smem) {
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&st.per_sm, kernel, kResThreads, smem);
      st.occ_smem = smem;
    }
    per_sm = st.per_sm;
  }
  if (per_sm < 1) return ffi::Error::Internal("sparse_dnn: resident kernel does not fit an SM");
  const int64_t tiles = (max_rows + R - 1) / R;
  const int64_t grid = std::min<int64_t>(tiles, static_cast<int64_t>(sms) * per_sm);
  if (grid == 0) return ffi::Error::Success();
  kernel<<<static_cast<unsigned>(grid), kResThreads, smem, stream>>>(a);
  return last_launch_error("sparse_dnn: resident layers");
}

template <typename T>
ffi::Error launch_resident_g(cudaStream_t stream, int groups, const ResidentArgs<T>& a,
                             int64_t max_rows) {
  switch (groups) {
    case 1: return launch_resident<T, 1>(stream, a, max_rows);
    case 2: return launch_resident<T, 2>(stream, a, max_rows);
    case 4: return launch_resident<T, 4>(stream, a, max_rows);
    case 8: return launch_resident<T, 8>(stream, a, max_rows);
    default: return ffi::Error::InvalidArgument("sparse_dnn: groups must be 1, 2, 4 or 8");
  }
}

// The hybrid schedule: the first `head` layers one per launch with the layer kernel
// (fused_layer.cuh: it compacts the many rows that die early, and is the faster kernel
// while rows are many), then segments of several layers with the resident kernel.
template <typename T>
ffi::Error run_hybrid(cudaStream_t stream, const T* xp, const float* bias, T* yp, int32_t* active,
                      T* feat, int32_t* iwork, int64_t rows, int n, int64_t n_layers, double clip,
                      bool drop, const float* ell_values, const int32_t* slice_ptr,
                      const int32_t* ell_indices, ffi::Span<const int64_t> sp_off,
                      ffi::Span<const int64_t> ell_off, const int4* entries,
                      const int32_t* col_ptr, int groups, ffi::Span<const int64_t> ends) {
  const int64_t head = static_cast<int64_t>(sp_off.size());
  // Integer workspace: alive and done marks (layer kernel; zero between kernels), two
  // row lists (packed positions and original ids), the first count, one count per
  // launch after it.
  int32_t* alive = iwork;
  int32_t* done = iwork + rows;
  int32_t* src[2] = {iwork + 2 * rows, iwork + 3 * rows};
  int32_t* ids[2] = {iwork + 4 * rows, iwork + 5 * rows};
  int32_t* counts = iwork + 6 * rows;  // [n_layers + 1]
  cudaMemsetAsync(iwork, 0, sizeof(int32_t) * 2 * rows, stream);
  cudaMemsetAsync(counts, 0, sizeof(int32_t) * (n_layers + 1), stream);
  cudaMemsetAsync(active, 0, sizeof(int32_t) * n_layers, stream);
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const unsigned grid = static_cast<unsigned>(std::max(1, sms * 8));
  list_nonzero_rows<T, float><<<grid, 256, 0, stream>>>(xp, rows, n, drop, src[0], ids[0], counts);
  if (auto err = last_launch_error("sparse_dnn: first row list"); err.failure()) return err;

  const T* in = xp;
  const int32_t* in_src = src[0];  // nullptr: rows are packed in list order
  const int32_t* count = counts;
  int cur = 0, buf = 0;
  for (int64_t l = 0; l < head; ++l) {
    LayerArgs<T, float> args{};
    args.x = in;
    args.values = ell_values + ell_off[l];
    args.bias = bias + l * n;
    args.slice_ptr = slice_ptr + sp_off[l];
    args.indices = ell_indices + ell_off[l];
    args.y = feat + buf * rows * n;
    args.rows = rows;
    args.count = count;
    args.src_rows = in_src;
    args.alive = alive;
    args.done = done;
    args.ids_in = ids[cur];
    args.next_src = src[1 - cur];
    args.next_ids = ids[1 - cur];
    args.active_out = active + l;
    args.drop = drop;
    args.n_in = n;
    args.n_out = n;
    args.relu = true;
    args.clip = static_cast<float>(clip);
    if (auto err = launch_layer<T, float>(stream, args); err.failure()) return err;
    in = args.y;
    in_src = src[1 - cur];
    if (drop) count = active + l;
    cur = 1 - cur;
    buf = 1 - buf;
  }

  ResidentArgs<T> a{};
  a.active = active;
  a.entries = entries;
  a.col_ptr = col_ptr;
  a.lbase = static_cast<int>(head);
  a.bias = bias;
  a.n = n;
  a.clip = static_cast<float>(clip);
  a.drop = drop;
  int64_t l0 = head;
  for (size_t k = 0; k < ends.size(); ++k) {
    a.x = in;
    a.src = in_src;
    a.count = count;
    a.ids_in = ids[cur];
    a.ids_out = ids[1 - cur];
    a.y = feat + buf * rows * n;
    a.count_out = drop ? counts + 1 + k : nullptr;
    a.l0 = static_cast<int>(l0);
    a.l1 = static_cast<int>(ends[k]);
    if (auto err = launch_resident_g<T>(stream, groups, a, rows); err.failure()) return err;
    in = a.y;
    in_src = nullptr;
    if (drop) count = a.count_out;
    cur = 1 - cur;
    buf = 1 - buf;
    l0 = ends[k];
  }
  cudaMemsetAsync(yp, 0, sizeof(T) * rows * n, stream);
  scatter_rows<T><<<grid, 256, 0, stream>>>(in, in_src, ids[cur], count, n, yp);
  return last_launch_error("sparse_dnn: scatter");
}

ffi::Error sparse_dnn_resident_impl(
    cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> bias,
    ffi::Buffer<ffi::F32> ell_values, ffi::Buffer<ffi::S32> slice_ptr,
    ffi::Buffer<ffi::S32> ell_indices, ffi::Buffer<ffi::S32> entries,
    ffi::Buffer<ffi::S32> col_ptr, ffi::Result<ffi::AnyBuffer> y,
    ffi::Result<ffi::Buffer<ffi::S32>> active, ffi::Result<ffi::AnyBuffer> work,
    ffi::Result<ffi::Buffer<ffi::S32>> iwork, double clip, bool drop_dead, int64_t groups,
    ffi::Span<const int64_t> sp_off, ffi::Span<const int64_t> ell_off,
    ffi::Span<const int64_t> ends) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("sparse_dnn: x must be [batch, n]");
  const int64_t rows = xd[0], n = xd[1];
  const int64_t n_layers = static_cast<int64_t>(active->element_count());
  const int64_t head = static_cast<int64_t>(sp_off.size());
  const int64_t n_slices = (n + kSlice - 1) / kSlice;
  if (n > 0x7fffffff || rows >= 0x7fffffff) {
    return ffi::Error::InvalidArgument("sparse_dnn: batch and n must be below 2^31");
  }
  if (groups != 1 && groups != 2 && groups != 4 && groups != 8) {
    return ffi::Error::InvalidArgument("sparse_dnn: groups must be 1, 2, 4 or 8");
  }
  if (n > 512 * groups) {
    return ffi::Error::InvalidArgument("sparse_dnn: n too large for the resident kernel's groups");
  }
  bool ends_ok = head <= n_layers && (ends.size() > 0 ? ends[ends.size() - 1] == n_layers
                                                      : head == n_layers);
  for (size_t k = 0; k < ends.size(); ++k) {
    ends_ok = ends_ok && ends[k] > (k ? ends[k - 1] : head);
  }
  if (!ends_ok) {
    return ffi::Error::InvalidArgument("sparse_dnn: segment ends must increase from the head to L");
  }
  const int64_t tail = n_layers - head;
  if (static_cast<int64_t>(bias.element_count()) != n_layers * n ||
      static_cast<int64_t>(ell_off.size()) != head + 1 ||
      static_cast<int64_t>(slice_ptr.element_count()) != head * (n_slices + 1) ||
      static_cast<int64_t>(ell_indices.element_count()) != ell_off[head] ||
      static_cast<int64_t>(ell_values.element_count()) != ell_off[head] ||
      static_cast<int64_t>(col_ptr.element_count()) != tail * (n + 1) ||
      entries.element_count() % 4 != 0 ||
      static_cast<int64_t>(work->element_count()) != 2 * rows * n ||
      static_cast<int64_t>(iwork->element_count()) != 6 * rows + n_layers + 1) {
    return ffi::Error::InvalidArgument("sparse_dnn: inconsistent buffer sizes for L and n");
  }
  if (x.element_type() != y->element_type() || x.element_type() != work->element_type()) {
    return ffi::Error::InvalidArgument("sparse_dnn: x, y and the workspace must share a dtype");
  }
  if (rows == 0 || n_layers == 0) {
    cudaMemsetAsync(active->typed_data(), 0, sizeof(int32_t) * n_layers, stream);
    if (rows > 0) {
      cudaMemcpyAsync(y->untyped_data(), x.untyped_data(), x.size_bytes(),
                      cudaMemcpyDeviceToDevice, stream);
    }
    return last_launch_error("sparse_dnn");
  }
  const auto* ep = reinterpret_cast<const int4*>(entries.typed_data());
  const int ni = static_cast<int>(n);
  const int g = static_cast<int>(groups);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return run_hybrid<T>(stream, reinterpret_cast<const T*>(x.untyped_data()), bias.typed_data(),
                         reinterpret_cast<T*>(y->untyped_data()), active->typed_data(),
                         reinterpret_cast<T*>(work->untyped_data()), iwork->typed_data(), rows, ni,
                         n_layers, clip, drop_dead, ell_values.typed_data(),
                         slice_ptr.typed_data(), ell_indices.typed_data(), sp_off, ell_off, ep,
                         col_ptr.typed_data(), g, ends);
  };
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return run(static_cast<float*>(nullptr));
    case ffi::DataType::BF16:
      return run(static_cast<__nv_bfloat16*>(nullptr));
    case ffi::DataType::F16:
      return run(static_cast<__half*>(nullptr));
    default:
      return ffi::Error::InvalidArgument(
          "sparse_dnn: the resident kernel takes float32, bfloat16 or float16 features");
  }
}


// ---------------------------------------------------------------------------------------
// The footprint path (cuda/footprint_layer.cuh): features row-interleaved in the two
// work buffers, rows listed in order by compact_rows after every layer.
// Two threads per output in the pipelined footprint kernel from this many neurons on,
// for float (double keeps one: its 128-register budget would spill), unless
// SPDNN_FP_SPLIT says.  H100, same process: 16384-120 145 vs 155 ms, 4096-120 33.3 ms
// both ways, 1024-120 9.9 vs 9.0 ms.
constexpr int kFpSplitMinN = 8192;
// The tensor-core form of the footprint layers from this many neurons on (float32).
constexpr int kFpMmaMinN = 8192;
// The stationary kernel takes 32-row tiles while the listed rows make at least this many
// such tiles per SM (and 16-row tiles below).  H100, 1024-120 (~1870 rows from layer 10
// on), ms per call: 32-row tiles from 4000 rows on 3.29, from 8448 on 3.34, never 3.51,
// always 3.78.
constexpr int64_t kStatTallTiles = 1;

template <typename T, typename A, int R, int O>
ffi::Error run_footprint(cudaStream_t stream, const T* x, const A* values, const A* bias,
                         const int32_t* slice_ptr, const int32_t* indices, const int32_t* perm,
                         const int32_t* fp_ptr, const int32_t* fp_cols, T* y, int32_t* active,
                         bool* nonzero, T* work, int32_t* iwork, int64_t rows, int n, int64_t n_layers,
                         double clip, bool drop, ffi::Span<const int64_t> sp_off,
                         ffi::Span<const int64_t> ell_off, ffi::Span<const int64_t> fp_off,
                         const StatNetArgs& tail, int64_t tail0,
                         ffi::Span<const int64_t> tail_ends, int64_t tail_slots,
                         int tail_units, bool has_fp) {
  const int64_t rows32 = (rows + 31) / 32 * 32;  // the workspace fits any tile height
  const int n_groups = (n + kThreads * O - 1) / (kThreads * O);
  T* buf[2] = {work, work + rows32 * n};
  // Integer workspace: marks (zero between kernels), two row lists of positions and
  // original ids, list lengths (ping-pong), a scratch count, the pipelined kernel's
  // work counter and compact_rows' scratch.
  int32_t* alive = iwork;
  int32_t* src[2] = {iwork + rows, iwork + 2 * rows};
  int32_t* ids[2] = {iwork + 3 * rows, iwork + 4 * rows};
  int32_t* counts = iwork + 5 * rows;
  int32_t* compact_scratch = counts + 4;
  const unsigned compact_blocks = compact_grid(rows);
  cudaMemsetAsync(alive, 0, sizeof(int32_t) * rows, stream);
  cudaMemsetAsync(counts, 0, sizeof(int32_t) * (4 + kCompactScratch), stream);
  cudaMemsetAsync(active, 0, sizeof(int32_t) * n_layers, stream);
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const unsigned grid = static_cast<unsigned>(std::max(1, sms * 8));

  // The tail (layers tail0 .. L - 1) runs on the stationary network kernel in launches
  // ending at tail_ends, where it applies: float32 storage and tiles that fit in shared
  // memory (otherwise the footprint kernel runs every layer: the same results).
  bool use_tail = false;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    use_tail = tail_ends.size() > 0 && tail0 < n_layers && tail.values != nullptr &&
               stat_net_fits(n, stat_net_rows(tail_slots), device);
  }
  const int64_t head = use_tail ? tail0 : n_layers;
  if (!has_fp && head > 0) {
    return ffi::Error::InvalidArgument(
        "sparse_dnn: the stationary kernel's tile does not fit this device's shared memory, "
        "and the call has no footprint operands to fall back on");
  }
  // When the tail starts at layer 0 its first launch reads the listed rows of x itself
  // (no interleave pass).  The rows are still marked and listed first: a chunk of a
  // streamed network starts with every row, most of them dead (computing them all through
  // the first launch cost more than the marks save).  SPDNN_STAT_DIRECT=0 interleaves
  // first (read at every call, for tests and A/B timing).
  const char* direct_env = std::getenv("SPDNN_STAT_DIRECT");
  const bool direct = use_tail && head == 0 && !(direct_env && std::string(direct_env) == "0");

  // The first list: rows of x with a nonzero feature (with drop off: every row), in
  // order, interleaved into buf[0] (unless the first launch reads x).
  // The pipelined kernel (weights and footprints in shared memory, copies in flight
  // while computing) for float and double storage; SPDNN_FP_PIPE=0 takes the plain one
  // (read at every call, for tests and tuning).
  const char* pipe_env = std::getenv("SPDNN_FP_PIPE");
  const bool pipe = !(pipe_env && std::string(pipe_env) == "0");
  // Its tensor-core form (launch_footprint_mma) for float32 from kFpMmaMinN neurons on,
  // with a finite clip (features are then finite where x is; x is checked below).
  // SPDNN_FP_MMA=0|1 turns it off, or on at any width (read at every call, for tests and
  // A/B timing).  Its records live in memory allocated on the stream.
  bool mma = false;
  unsigned char* mma_mem = nullptr;
  int32_t* mma_gate = nullptr;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float> && R == 32 && O == 1) {
    const char* mma_env = std::getenv("SPDNN_FP_MMA");
    const bool want = mma_env ? std::string(mma_env) == "1" : n >= kFpMmaMinN;
    if (want && pipe && has_fp && std::isfinite(clip) && head > 0 && mma_fits(device)) {
      const size_t bytes = 16 + static_cast<size_t>(n_groups) * kMmaGroupBytes;
      if (cudaMallocAsync(reinterpret_cast<void**>(&mma_mem), bytes, stream) == cudaSuccess) {
        mma = true;
        mma_gate = reinterpret_cast<int32_t*>(mma_mem);
        cudaMemsetAsync(mma_gate, 0, 16, stream);
      } else {
        cudaGetLastError();  // no memory for it: the FMA kernel runs every layer
      }
    }
  }
  struct FreeOnExit {
    unsigned char* p;
    cudaStream_t s;
    ~FreeOnExit() {
      if (p) cudaFreeAsync(p, s);
    }
  } mma_free{mma_mem, stream};
  if (drop || mma) {
    mark_nonzero_rows<T, A><<<grid, 256, 0, stream>>>(x, rows, n, alive, mma ? mma_gate : nullptr);
  }
  compact_rows<<<compact_blocks, kCompactThreads, 0, stream>>>(
      nullptr, rows, alive, nullptr, drop, src[0], ids[0], counts + 2, counts, nullptr,
      compact_scratch, 1);
  if (!direct) {
    interleave_rows<T, R><<<grid, kMoveThreads, 0, stream>>>(x, src[0], counts, n, buf[0]);
  }
  if (auto err = last_launch_error("sparse_dnn: first row list"); err.failure()) return err;

  // SPDNN_FP_SPLIT=1 or 2: threads per output of the pipelined kernel (2: 512-thread
  // blocks, each thread half the rows).
  const char* split_env = std::getenv("SPDNN_FP_SPLIT");
  // SPDNN_FP_LEAN=0: the pipelined kernel's first form of staging and row marks (one
  // copy per staged value, one vote per row), for tests and A/B timing.
  const char* lean_env = std::getenv("SPDNN_FP_LEAN");
  const bool lean = !(lean_env && std::string(lean_env) == "0");
  const int split = split_env ? (std::string(split_env) == "1" ? 1 : 2)
                              : (sizeof(A) == 4 && n >= kFpSplitMinN ? 2 : 1);
  // SPDNN_STAT_PREFETCH=0: no L1 prefetch of the tail's weights (read at every call, for
  // A/B timing).
  const char* prefetch_env = std::getenv("SPDNN_STAT_PREFETCH");
  const bool stat_prefetch = !(prefetch_env && std::string(prefetch_env) == "0");
  // 32-row tiles while at least this many rows are listed (where they fit; -1: never).
  // SPDNN_STAT_TALL=<rows>|off overrides (read at every call, for tests and A/B timing).
  int64_t tall_rows = -1;
  if (use_tail && stat_net_tall<R>(tail_slots, n, device)) {
    const char* tall_env = std::getenv("SPDNN_STAT_TALL");
    if (!tall_env) {
      tall_rows = kStatTallTiles * 32 * static_cast<int64_t>(sms);
    } else if (std::string(tall_env) != "off") {
      tall_rows = std::max<int64_t>(0, std::atoll(tall_env));
    }
  }
  // SPDNN_FP_RUN_TILES: the most row tiles the pipelined kernel runs per group before the
  // next group (read at every call, for A/B timing).  The tensor-core form loads a
  // group's tiles (~70 KB) when a run starts and waits for them, so it takes long runs:
  // H200, 65536-120, s per call: 8 tiles 0.437, 16 0.427, 32 0.420, 64 0.415 (1, 2 and 4
  // were slower still).  The kernel caps a run so that every block gets about four.
  // The FMA kernel (also where a layer falls back from the form) keeps runs of 8.
  int run_tiles = 8, mma_run_tiles = 64;
  if (const char* env = std::getenv("SPDNN_FP_RUN_TILES")) {
    run_tiles = mma_run_tiles = std::max(1, std::atoi(env));
  }
  const int32_t* list = nullptr;  // buf[0] holds the listed rows in order
  int cur = 0;     // the row list (src[cur], ids[cur]) and the buffer holding its rows
  int b = 0;       // buf[b]: the current rows
  int c = 0;       // counts[c]: the current list's length
  int32_t epoch = 1;
  auto compact = [&](int64_t last_layer) {
    compact_rows<<<compact_blocks, kCompactThreads, 0, stream>>>(
        counts + c, rows, alive, ids[cur], drop, src[1 - cur], ids[1 - cur],
        active + last_layer, counts + 1 - c, counts + 3, compact_scratch, ++epoch);
    cur = 1 - cur;
    c = 1 - c;
    list = src[cur];
  };
  for (int64_t l = 0; l < head; ++l) {
    FootprintArgs<T, A> args{};
    args.x = buf[b];
    args.values = values + ell_off[l];
    args.bias = bias + l * n;
    args.slice_ptr = slice_ptr + sp_off[l];
    args.indices = indices + ell_off[l];
    args.perm = perm + l * n;
    args.fp_ptr = fp_ptr + l * (n_groups + 1);
    args.fp_cols = fp_cols + fp_off[l];
    args.y = buf[1 - b];
    args.count = counts + c;
    args.src = list;
    args.alive = alive;
    args.next_run = counts + 3;  // zeroed above, then by each compaction
    args.rows = rows;
    args.n_in = n;
    args.n_out = n;
    args.relu = true;
    args.clip = static_cast<A>(clip);
    args.run_tiles = run_tiles;
    args.mma_run_tiles = mma_run_tiles;
    bool launched = false;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float> && R == 32 && O == 1) {
      if (mma) {
        auto err = split == 2 ? launch_footprint_mma<2>(stream, args, mma_mem + 16, mma_gate, lean)
                              : launch_footprint_mma<1>(stream, args, mma_mem + 16, mma_gate, lean);
        if (err.failure()) return err;
        launched = true;
      }
    }
    if constexpr (std::is_same_v<T, A> && O == 1) {
      if (pipe && !launched) {
        auto err = split == 2 ? launch_footprint_pipe<A, R, 2>(stream, args, lean, &launched)
                              : launch_footprint_pipe<A, R, 1>(stream, args, lean, &launched);
        if (err.failure()) return err;
      }
    }
    if (!launched) {
      if (auto err = launch_footprint_layer<T, A, R, O>(stream, args); err.failure()) return err;
    }
    b = 1 - b;
    compact(l);
  }
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    int64_t first = head;
    for (int64_t end : tail_ends) {
      if (!use_tail || end <= first) continue;
      StatNetArgs a = tail;
      a.x = buf[b];
      a.y = buf[1 - b];
      a.src = list;
      a.row_major = direct && first == 0;
      if (a.row_major) {  // the listed rows of x
        a.x = x;
        a.src = src[0];
      }
      a.count = counts + c;
      a.alive = alive;
      a.active = active;
      a.bias = bias;
      a.first = static_cast<int>(first);
      a.last = static_cast<int>(std::min(end, n_layers));
      a.tail0 = static_cast<int>(tail0);
      a.n = n;
      a.clip = static_cast<float>(clip);
      a.drop = drop;
      a.prefetch = stat_prefetch;
      if (auto err = launch_stat_net<R>(stream, a, rows, tail_slots, tail_units, tall_rows);
          err.failure()) {
        return err;
      }
      b = 1 - b;
      compact(a.last - 1);
      first = a.last;
    }
  }
  // With drop off every row is listed and written; otherwise the dropped rows are zero.
  // nonzero: the rows with a nonzero final feature, found while moving them.
  if (drop) cudaMemsetAsync(y, 0, sizeof(T) * rows * n, stream);
  cudaMemsetAsync(nonzero, 0, rows, stream);
  deinterleave_rows<T, R><<<grid, kMoveThreads, 0, stream>>>(buf[b], list, ids[cur],
                                                 counts + c, n, y, nonzero);
  return last_launch_error("sparse_dnn: footprint layers");
}

ffi::Error sparse_dnn_fp_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                              ffi::AnyBuffer bias, ffi::Buffer<ffi::S32> slice_ptr,
                              ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> perm,
                              ffi::Buffer<ffi::S32> fp_ptr, ffi::Buffer<ffi::S32> fp_cols,
                              ffi::Buffer<ffi::F32> t_values, ffi::Buffer<ffi::U16> t_indices,
                              ffi::Buffer<ffi::S32> t_group_ptr, ffi::Buffer<ffi::S32> t_perm,
                              ffi::Result<ffi::AnyBuffer> y,
                              ffi::Result<ffi::Buffer<ffi::S32>> active,
                              ffi::Result<ffi::Buffer<ffi::PRED>> nonzero,
                              ffi::Result<ffi::AnyBuffer> work,
                              ffi::Result<ffi::Buffer<ffi::S32>> iwork, double clip,
                              bool drop_dead, int64_t group, ffi::Span<const int64_t> sp_off,
                              ffi::Span<const int64_t> ell_off, ffi::Span<const int64_t> fp_off,
                              int64_t tail0, ffi::Span<const int64_t> tail_ends,
                              int64_t tail_units) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("sparse_dnn: x must be [batch, n]");
  const int64_t rows = xd[0], n = xd[1];
  const int64_t n_layers = static_cast<int64_t>(active->element_count());
  const int64_t n_slices = (n + kSlice - 1) / kSlice;
  if (group != kThreads && group != 2 * kThreads) {
    return ffi::Error::InvalidArgument("sparse_dnn: footprint groups must be 256 or 512 outputs");
  }
  const int64_t n_groups = (n + group - 1) / group;
  const int64_t rows32 = (rows + 31) / 32 * 32;
  // Feature rows per tile: each weight loaded is applied to that many rows.  On H100 32 rows
  // (groups of 256 outputs) beat 16 rows (512 outputs) by 10% at 16384-120 and 65536-120,
  // and 16 beat 8 by 17-33%; SPDNN_FP_ROWS=16 for tuning.
  static const int fp_rows = [] {
    const char* env = std::getenv("SPDNN_FP_ROWS");
    return env && std::atoi(env) == 16 ? 16 : 32;
  }();
  if (n > 0x7fffffff || rows >= 0x7fffffff) {
    return ffi::Error::InvalidArgument("sparse_dnn: batch and n must be below 2^31");
  }
  // Without footprint operands (every one empty, offsets too) the stationary kernel must
  // run every layer: a streamed chunk made on the device then skips their packing.
  const bool has_fp = !(sp_off.size() == 0 && ell_off.size() == 0 && fp_off.size() == 0 &&
                        values.element_count() == 0 && slice_ptr.element_count() == 0 &&
                        indices.element_count() == 0 && perm.element_count() == 0 &&
                        fp_ptr.element_count() == 0 && fp_cols.element_count() == 0);
  if (!has_fp && !(tail_ends.size() > 0 && tail0 == 0)) {
    return ffi::Error::InvalidArgument(
        "sparse_dnn: footprint operands are required unless the stationary tail starts at "
        "layer 0");
  }
  const bool fp_sizes_ok =
      !has_fp ||
      (static_cast<int64_t>(sp_off.size()) == n_layers &&
       static_cast<int64_t>(ell_off.size()) == n_layers + 1 &&
       static_cast<int64_t>(fp_off.size()) == n_layers + 1 &&
       static_cast<int64_t>(slice_ptr.element_count()) == n_layers * (n_slices + 1) &&
       static_cast<int64_t>(indices.element_count()) == ell_off[n_layers] &&
       static_cast<int64_t>(values.element_count()) == ell_off[n_layers] &&
       static_cast<int64_t>(perm.element_count()) == n_layers * n &&
       static_cast<int64_t>(fp_ptr.element_count()) == n_layers * (n_groups + 1) &&
       static_cast<int64_t>(fp_cols.element_count()) >= fp_off[n_layers]);
  if (!fp_sizes_ok || static_cast<int64_t>(bias.element_count()) != n_layers * n ||
      static_cast<int64_t>(work->element_count()) != 2 * rows32 * n ||
      static_cast<int64_t>(nonzero->element_count()) != rows ||
      static_cast<int64_t>(iwork->element_count()) != 5 * rows + 4 + kCompactScratch) {
    return ffi::Error::InvalidArgument("sparse_dnn: inconsistent buffer sizes for L and n");
  }
  if (x.element_type() != y->element_type() || x.element_type() != work->element_type()) {
    return ffi::Error::InvalidArgument("sparse_dnn: x, y and the workspace must share a dtype");
  }
  // The stationary tail: layers tail0 .. L - 1 in launches ending at tail_ends (none: no
  // tail), with their weights in the stationary layout.
  StatNetArgs tail{};
  int64_t tail_slots = 0;
  if (tail_ends.size() > 0) {
    const int64_t n_tail = n_layers - tail0;
    tail_slots = n_tail > 0 ? static_cast<int64_t>(t_perm.element_count()) / n_tail : 0;
    bool ok = tail0 >= 0 && n_tail > 0 && n <= 65534 && tail_ends.back() == n_layers &&
              tail_ends.front() > tail0 &&
              (tail_slots == 1024 || tail_slots == 2048 || tail_slots == 4096) &&
              tail_slots >= n && tail_slots * n_tail == static_cast<int64_t>(t_perm.element_count()) &&
              (tail_units == 1 || tail_units == 2 || (tail_units == 4 && tail_slots <= 2048)) &&
              static_cast<int64_t>(t_group_ptr.element_count()) == n_tail * (tail_slots / 32 + 1) &&
              t_values.element_count() == t_indices.element_count() * tail_units &&
              t_values.element_count() % 128 == 0;
    for (size_t k = 1; ok && k < tail_ends.size(); ++k) ok = tail_ends[k] > tail_ends[k - 1];
    if (!ok) {
      return ffi::Error::InvalidArgument(
          "sparse_dnn: inconsistent stationary tail (tail_start, tail_ends or its operands)");
    }
    tail.values = t_values.typed_data();
    tail.indices = t_indices.typed_data();
    tail.group_ptr = t_group_ptr.typed_data();
    tail.perm = t_perm.typed_data();
  }
  if (n_layers == 0) return ffi::Error::InvalidArgument("sparse_dnn: needs at least one layer");
  if (rows == 0) {
    cudaMemsetAsync(active->typed_data(), 0, sizeof(int32_t) * n_layers, stream);
    return last_launch_error("sparse_dnn");
  }
  const HostTiming report{"sparse_dnn footprint", n_layers};
  auto run = [&](auto* tag, auto* acc_tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = std::remove_pointer_t<decltype(acc_tag)>;
    constexpr ffi::DataType acc = sizeof(A) == 8 ? ffi::DataType::F64 : ffi::DataType::F32;
    if (values.element_type() != acc || bias.element_type() != acc) {
      return ffi::Error::InvalidArgument(
          "sparse_dnn: values and bias must have the accumulation dtype of x");
    }
    auto go = [&](auto rows_tag, auto outs_tag) {
      return run_footprint<T, A, decltype(rows_tag)::value, decltype(outs_tag)::value>(
        stream, reinterpret_cast<const T*>(x.untyped_data()),
        reinterpret_cast<const A*>(values.untyped_data()),
        reinterpret_cast<const A*>(bias.untyped_data()), slice_ptr.typed_data(),
        indices.typed_data(), perm.typed_data(), fp_ptr.typed_data(), fp_cols.typed_data(),
        reinterpret_cast<T*>(y->untyped_data()), active->typed_data(), nonzero->typed_data(),
        reinterpret_cast<T*>(work->untyped_data()), iwork->typed_data(), rows,
        static_cast<int>(n), n_layers, clip, drop_dead, sp_off, ell_off, fp_off, tail, tail0,
        tail_ends, tail_slots, static_cast<int>(tail_units), has_fp);
    };
    using R16 = std::integral_constant<int, 16>;
    using R32 = std::integral_constant<int, 32>;
    using O1 = std::integral_constant<int, 1>;
    using O2 = std::integral_constant<int, 2>;
    if (group == kThreads) return fp_rows == 32 ? go(R32{}, O1{}) : go(R16{}, O1{});
    return fp_rows == 32 ? go(R32{}, O2{}) : go(R16{}, O2{});
  };
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return run(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
    case ffi::DataType::F64:
      return run(static_cast<double*>(nullptr), static_cast<double*>(nullptr));
    case ffi::DataType::BF16:
      return run(static_cast<__nv_bfloat16*>(nullptr), static_cast<float*>(nullptr));
    case ffi::DataType::F16:
      return run(static_cast<__half*>(nullptr), static_cast<float*>(nullptr));
    default:
      return ffi::Error::InvalidArgument("sparse_dnn: unsupported feature dtype");
  }
}

}  // namespace
}  // namespace spdnn::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseDnnCuda, spdnn::cuda::sparse_dnn_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [batch, n]
                                  .Arg<ffi::AnyBuffer>()         // values, all layers, ELL order
                                  .Arg<ffi::AnyBuffer>()         // bias [L, n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slice_ptr, all layers
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ELL indices, all layers
                                  .Ret<ffi::AnyBuffer>()         // y [batch, n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // active rows after each layer [L]
                                  .Ret<ffi::AnyBuffer>()         // workspace [2, batch, n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // workspace [6 batch + 2]
                                  .Attr<double>("clip")
                                  .Attr<bool>("drop_dead")
                                  .Attr<ffi::Span<const int64_t>>("slice_offsets")  // [L]
                                  .Attr<ffi::Span<const int64_t>>("ell_offsets"));  // [L + 1]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseDnnResidentCuda, spdnn::cuda::sparse_dnn_resident_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [batch, n]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [L, n]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ELL values, head layers
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slice_ptr, head layers
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ELL indices, head layers
                                  .Arg<ffi::Buffer<ffi::S32>>()  // entries {offset, weight bits}
                                  .Arg<ffi::Buffer<ffi::S32>>()  // col_ptr [L - head, n + 1]
                                  .Ret<ffi::AnyBuffer>()         // y [batch, n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // active rows after each layer [L]
                                  .Ret<ffi::AnyBuffer>()         // workspace [2, batch, n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // workspace [6 batch + L + 1]
                                  .Attr<double>("clip")
                                  .Attr<bool>("drop_dead")
                                  .Attr<int64_t>("groups")
                                  .Attr<ffi::Span<const int64_t>>("slice_offsets")  // [head]
                                  .Attr<ffi::Span<const int64_t>>("ell_offsets")    // [head + 1]
                                  .Attr<ffi::Span<const int64_t>>("segment_ends"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseDnnFootprintCuda, spdnn::cuda::sparse_dnn_fp_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [batch, n]
                                  .Arg<ffi::AnyBuffer>()         // values, all layers, ELL order
                                  .Arg<ffi::AnyBuffer>()         // bias [L, n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slice_ptr, all layers
                                  .Arg<ffi::Buffer<ffi::S32>>()  // footprint slots, ELL order
                                  .Arg<ffi::Buffer<ffi::S32>>()  // perm [L, n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // fp_ptr [L, groups + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // fp_cols, all layers
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tail: stationary values
                                  .Arg<ffi::Buffer<ffi::U16>>()  // tail: input per slot
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tail: group_ptr [L - t0, w + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tail: perm [L - t0, slots]
                                  .Ret<ffi::AnyBuffer>()         // y [batch, n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // active rows after each layer [L]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // rows nonzero at the end [batch]
                                  .Ret<ffi::AnyBuffer>()         // workspace [2, batch32, n]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // workspace [5 batch + 4]
                                  .Attr<double>("clip")
                                  .Attr<bool>("drop_dead")
                                  .Attr<int64_t>("group")  // outputs per footprint group
                                  .Attr<ffi::Span<const int64_t>>("slice_offsets")  // [L]
                                  .Attr<ffi::Span<const int64_t>>("ell_offsets")    // [L + 1]
                                  .Attr<ffi::Span<const int64_t>>("fp_offsets")    // [L + 1]
                                  .Attr<int64_t>("tail_start")
                                  .Attr<ffi::Span<const int64_t>>("tail_ends")
                                  .Attr<int64_t>("tail_units"));
