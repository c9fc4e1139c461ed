// The CUDA backend: the op contract (backend/ops.h) on one NVIDIA GPU, with
// the same semantics as the CPU kernels (backend/cpu/kernels.h). Built into
// the library hymba_cuda when CMake finds nvcc; registry.cpp includes this
// header under HYMBA_HAVE_CUDA.
#pragma once

#include <memory>

#include "backend/backend.h"

namespace hymba {

// A backend on the current CUDA device (device 0 unless the process chose
// another), with one stream for all its work. Throws hymba::Error when no
// device is usable.
std::unique_ptr<Backend> make_cuda_backend();

// Whether a CUDA device is visible and its driver usable. Never throws: a
// machine without a GPU or driver answers false.
bool cuda_device_present();

// The current device's compute capability as 10 major + minor (90 for an
// H100), 0 without a usable device. Never throws.
int cuda_compute_capability();

}  // namespace hymba
