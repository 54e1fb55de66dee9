// CUDA kernel of sparse_linear: y = min(act(x @ W + b), clip) with W stored by
// output neuron in warp-sliced ELL (jax_spdnn.sparse.pack_sliced_ell): the s-th
// nonzero of output 32w + l is at slice_ptr[w] + 32 s + l, rows padded to the
// slice's longest with an index past every input.  A warp's weight loads are
// therefore coalesced.
//
// One block owns a tile of kRows feature rows and kThreads * kOuts output
// neurons (thread t owns outputs t, t + kThreads, ...).  The block stages the
// tile's features in shared memory in chunks of input columns, transposed so
// that the kRows values of one input column are contiguous: each weight a thread
// loads from global memory is applied to kRows rows from registers, reading
// them with 16-byte shared loads.  Sorted rows let every thread resume where
// it stopped when the next chunk arrives, so any n_in works with bounded shared
// memory.  Column vectors are XOR-swizzled so random columns spread over the 32
// banks.  Each output is summed in CSR order by one thread: deterministic, no
// atomics.  Blocks of one row tile are adjacent in the grid so their shared
// input tile is read from DRAM once and from L2 afterwards.

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "cuda/common.cuh"

namespace ffi = xla::ffi;

namespace spdnn::cuda {
namespace {

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

template <typename T, typename A, int kOuts>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<kOuts, A>))
    sparse_linear_kernel(const T* __restrict__ x, const A* __restrict__ values,
                         const A* __restrict__ bias, const int32_t* __restrict__ slice_ptr,
                         const int32_t* __restrict__ indices, T* __restrict__ y, int64_t rows,
                         int n_in, int n_out, int chunk, int n_groups, bool relu, A clip) {
  using V = Vec16<A>;
  using VT = typename V::type;
  constexpr int E = V::n;      // accumulators per 16-byte vector
  constexpr int Q = kRows / E; // vectors per staged input column
  static_assert(kRows % E == 0, "kRows must fill whole 16-byte vectors");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const VT* xv = reinterpret_cast<const VT*>(smem_raw);

  const int64_t tile = blockIdx.x / n_groups;
  const int group = blockIdx.x - static_cast<int>(tile * n_groups);
  const int64_t row0 = tile * kRows;
  const int valid = static_cast<int>(min(static_cast<int64_t>(kRows), rows - row0));

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
          e[k] = r < valid ? load_acc<A>(x + (row0 + r) * static_cast<int64_t>(n_in) + c0 + c) : A(0);
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
        store_from(y + (row0 + r) * static_cast<int64_t>(n_out) + j, out);
      }
    }
  }
}

template <typename T, typename A, int kOuts>
ffi::Error launch(cudaStream_t stream, const T* x, const A* values, const A* bias,
                  const int32_t* slice_ptr, const int32_t* indices, T* y, int64_t rows, int n_in,
                  int n_out, bool relu, double clip) {
  const int per_block = kThreads * kOuts;
  const int n_groups = (n_out + per_block - 1) / per_block;
  const int64_t n_tiles = (rows + kRows - 1) / kRows;
  const int64_t n_blocks = n_tiles * n_groups;
  if (n_blocks > 0x7fffffff) {
    return ffi::Error::InvalidArgument("sparse_linear: batch too large for one launch");
  }
  const int col_bytes = kRows * static_cast<int>(sizeof(A));
  // Chunks of whole groups of 8 columns keep the swizzle inside the buffer.
  const int chunk = std::max(1, std::min(n_in, kMaxSharedBytes / col_bytes / 8 * 8));
  const size_t smem = static_cast<size_t>((chunk + 7) / 8 * 8) * col_bytes;
  auto kernel = sparse_linear_kernel<T, A, kOuts>;
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) {
      return ffi::Error::Internal(std::string("sparse_linear: cudaFuncSetAttribute: ") +
                                  cudaGetErrorString(err));
    }
  }
  kernel<<<static_cast<unsigned>(n_blocks), kThreads, smem, stream>>>(
      x, values, bias, slice_ptr, indices, y, rows, n_in, n_out, chunk, n_groups, relu,
      static_cast<A>(clip));
  return last_launch_error("sparse_linear");
}

template <typename T, typename A>
ffi::Error dispatch(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                    ffi::AnyBuffer bias, const int32_t* slice_ptr, const int32_t* indices,
                    ffi::Result<ffi::AnyBuffer> y, int64_t rows, int n_in, int n_out, bool relu,
                    double clip) {
  constexpr ffi::DataType acc = sizeof(A) == 8 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (values.element_type() != acc || bias.element_type() != acc) {
    return ffi::Error::InvalidArgument(
        "sparse_linear: values and bias must have the accumulation dtype of x");
  }
  auto* xp = reinterpret_cast<const T*>(x.untyped_data());
  auto* vp = reinterpret_cast<const A*>(values.untyped_data());
  auto* bp = reinterpret_cast<const A*>(bias.untyped_data());
  auto* yp = reinterpret_cast<T*>(y->untyped_data());
  // Wider output groups share one staged tile among more outputs; doubles keep
  // fewer accumulators to stay within registers.
  // Wider output groups share one staged tile among more outputs (less staging
  // traffic when rows span several chunks) at the cost of registers.  Measured
  // on H100 (benchmarks/RESULTS.md): 4 beats 2 everywhere and 8 (64
  // accumulators, 2 blocks/SM) loses to 4 even at N = 16384.
  // SPDNN_LINEAR_OUTS overrides the choice (1, 2 or 4) for tuning runs.
  static const int forced = [] {
    const char* env = std::getenv("SPDNN_LINEAR_OUTS");
    return env ? std::atoi(env) : 0;
  }();
  int outs = forced;
  if (outs == 0) outs = n_out >= 4 * kThreads ? 4 : n_out >= 2 * kThreads ? 2 : 1;
  if (outs >= 4) {
    return launch<T, A, 4>(stream, xp, vp, bp, slice_ptr, indices, yp, rows, n_in, n_out, relu, clip);
  }
  if (outs >= 2) {
    return launch<T, A, 2>(stream, xp, vp, bp, slice_ptr, indices, yp, rows, n_in, n_out, relu, clip);
  }
  return launch<T, A, 1>(stream, xp, vp, bp, slice_ptr, indices, yp, rows, n_in, n_out, relu, clip);
}

ffi::Error sparse_linear_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                              ffi::AnyBuffer bias, ffi::Buffer<ffi::S32> slice_ptr,
                              ffi::Buffer<ffi::S32> indices, ffi::Result<ffi::AnyBuffer> y,
                              int32_t activation, double clip) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() < 1 || yd.size() != xd.size()) {
    return ffi::Error::InvalidArgument("sparse_linear: x and y must have the same rank >= 1");
  }
  const int64_t n_in = xd.back();
  const int64_t n_out = yd.back();
  if (n_in > 0x7fffffff || n_out > 0x7fffffff) {
    return ffi::Error::InvalidArgument("sparse_linear: n_in and n_out must be below 2^31");
  }
  const int64_t rows = n_out > 0 ? static_cast<int64_t>(y->element_count()) / n_out : 0;
  const int64_t n_slices = (n_out + kSlice - 1) / kSlice;
  if (slice_ptr.element_count() != static_cast<size_t>(n_slices + 1) ||
      bias.element_count() != static_cast<size_t>(n_out) ||
      values.element_count() != indices.element_count() ||
      indices.element_count() % kSlice != 0) {
    return ffi::Error::InvalidArgument(
        "sparse_linear: inconsistent sizes of slice_ptr/bias/values/indices for the ELL layout");
  }
  if (x.element_type() != y->element_type()) {
    return ffi::Error::InvalidArgument("sparse_linear: x and y must have the same dtype");
  }
  if (rows == 0 || n_out == 0) return ffi::Error::Success();
  const bool relu = activation == 1;
  const int32_t* ip = slice_ptr.typed_data();
  const int32_t* ix = indices.typed_data();
  const int ni = static_cast<int>(n_in), no = static_cast<int>(n_out);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return dispatch<float, float>(stream, x, values, bias, ip, ix, y, rows, ni, no, relu, clip);
    case ffi::DataType::F64:
      return dispatch<double, double>(stream, x, values, bias, ip, ix, y, rows, ni, no, relu, clip);
    case ffi::DataType::BF16:
      return dispatch<__nv_bfloat16, float>(stream, x, values, bias, ip, ix, y, rows, ni, no, relu,
                                            clip);
    case ffi::DataType::F16:
      return dispatch<__half, float>(stream, x, values, bias, ip, ix, y, rows, ni, no, relu, clip);
    default:
      return ffi::Error::InvalidArgument("sparse_linear: unsupported feature dtype");
  }
}

}  // namespace
}  // namespace spdnn::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpdnnSparseLinearCuda, spdnn::cuda::sparse_linear_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [..., n_in]
                                  .Arg<ffi::AnyBuffer>()         // values [total] (f32 | f64), ELL order
                                  .Arg<ffi::AnyBuffer>()         // bias [n_out]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slice_ptr [n_slices + 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [total], sliced ELL
                                  .Ret<ffi::AnyBuffer>()         // y [..., n_out]
                                  .Attr<int32_t>("activation")   // 0 none, 1 relu
                                  .Attr<double>("clip"));        // +inf for no clip
