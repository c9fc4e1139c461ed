// Backend selection by device name.
#include "backend/backend.h"
#include "util/error.h"

#ifdef HYMBA_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

namespace hymba {

std::vector<std::string> compiled_backends() {
#ifdef HYMBA_HAVE_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

std::string default_device() {
#ifdef HYMBA_HAVE_CUDA
  if (cuda_device_present()) return "cuda";
#endif
  return "cpu";
}

std::unique_ptr<Backend> make_backend(const std::string& device) {
  const std::string d = device == "auto" ? default_device() : device;
  if (d == "cpu") return make_cpu_backend();
  if (d == "cuda") {
#ifdef HYMBA_HAVE_CUDA
    check(cuda_device_present(), "--device cuda: no CUDA GPU is visible to this process");
    return make_cuda_backend();
#else
    fail("--device cuda: this build has no CUDA backend (nvcc was not found when it was configured)");
#endif
  }
  fail("unknown device '", device, "' (expected cpu, cuda or auto)");
}

Backend& host_backend() {
  static const std::unique_ptr<Backend> cpu = make_cpu_backend();
  return *cpu;
}

}  // namespace hymba
