// nanobind module exposing the CUDA FFI handlers as PyCapsules; jax_spdnn/_native.py
// registers each with jax.ffi.register_ffi_target(platform="CUDA").
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* SpdnnSparseLinearCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* SpdnnSparseLinearStationaryCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* SpdnnSparseDnnCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* SpdnnSparseDnnResidentCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* SpdnnSparseDnnFootprintCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* SpdnnSparseConvCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* SpdnnSparseConvTiledCuda(XLA_FFI_CallFrame* call_frame);

namespace nb = nanobind;

template <typename Fn>
static nb::capsule encapsulate(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

NB_MODULE(_spdnn_cuda, m) {
  m.def("registrations", [] {
    nb::dict d;
    d["spdnn_sparse_linear_ell"] = encapsulate(SpdnnSparseLinearCuda);
    d["spdnn_sparse_linear_stationary"] = encapsulate(SpdnnSparseLinearStationaryCuda);
    d["spdnn_sparse_dnn_ell"] = encapsulate(SpdnnSparseDnnCuda);
    d["spdnn_sparse_dnn_resident"] = encapsulate(SpdnnSparseDnnResidentCuda);
    d["spdnn_sparse_dnn_footprint"] = encapsulate(SpdnnSparseDnnFootprintCuda);
    d["spdnn_sparse_conv_direct"] = encapsulate(SpdnnSparseConvCuda);
    d["spdnn_sparse_conv_tiled"] = encapsulate(SpdnnSparseConvTiledCuda);
    return d;
  });
}
