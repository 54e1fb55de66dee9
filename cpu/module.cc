// nanobind module exposing the CPU FFI handlers as PyCapsules; jax_spdnn/_native.py
// registers each with jax.ffi.register_ffi_target(platform="cpu").
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* SpdnnSparseLinearCpu(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* SpdnnSparseDnnCpu(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* SpdnnSparseConvCpu(XLA_FFI_CallFrame* call_frame);

namespace nb = nanobind;

template <typename Fn>
static nb::capsule encapsulate(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

NB_MODULE(_spdnn_cpu, m) {
  m.def("registrations", [] {
    nb::dict d;
    d["spdnn_sparse_linear_csr"] = encapsulate(SpdnnSparseLinearCpu);
    d["spdnn_sparse_dnn_csr"] = encapsulate(SpdnnSparseDnnCpu);
    d["spdnn_sparse_conv_direct"] = encapsulate(SpdnnSparseConvCpu);
    return d;
  });
}
