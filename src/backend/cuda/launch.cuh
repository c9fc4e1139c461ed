// Programmatic Dependent Launch (PDL, sm_90+) for the decode-path kernels.
//
// A decode step is a few hundred short kernels back to back; launched with
// programmatic stream serialization, a kernel may start while the previous
// one is still finishing, so its launch latency (and any reads of immutable
// data: weights) overlaps the previous kernel's tail. The contract for a
// kernel launched with launch_pdl:
//  * before pdl_wait() it reads only memory that no earlier kernel of the
//    stream writes (weights, kernel parameters) and writes nothing;
//  * it calls pdl_wait() (on every path that touches other memory) before
//    reading activations or state, and before writing anything: the wait
//    returns once every earlier kernel has completed and its memory is
//    visible (at once when there is no PDL predecessor);
//  * pdl_launch_dependents() lets the next kernel start launching early; it
//    is only a hint, and the next kernel still waits for this one.
// Both device calls are no-ops before sm_90, where the host never asks for PDL.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "backend/cuda/common.cuh"

namespace hymba::cuda {

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The "memory" clobber keeps every later access after the wait.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether kernels are launched with PDL: on unless HYMBA_PDL=0 (or the older
// HYMBA_GEMV_PDL=0) in the environment, read once; set_pdl overrides it.
bool pdl_enabled();
void set_pdl(bool on);
// Whether kernel `k` (its code on the current device) was compiled for
// sm_90+, i.e. has the wait in it (cached per kernel and device).
bool kernel_has_pdl(const void* k);

// k<<<grid, block, smem, stream>>>(args...) with programmatic stream
// serialization when PDL is on and k has it; checks the launch.
template <typename... KArgs, typename... Args>
void launch_pdl(const char* name, void (*k)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  if (pdl_enabled() && kernel_has_pdl(reinterpret_cast<const void*>(k))) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    check_cuda(cudaLaunchKernelEx(&cfg, k, std::forward<Args>(args)...), name);
    return;
  }
  k<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  check_cuda(cudaGetLastError(), name);
}

}  // namespace hymba::cuda
