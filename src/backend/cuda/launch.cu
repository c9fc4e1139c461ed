// Host side of launch.cuh: the PDL switch and the per-kernel check that a
// kernel's code has the griddepcontrol wait.
#include "backend/cuda/launch.cuh"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <map>
#include <utility>

namespace hymba::cuda {

namespace {

// -1 not read yet, 0 off, 1 on.
std::atomic<int> g_pdl{-1};

bool env_off(const char* name) {
  const char* e = std::getenv(name);
  return e && (std::strcmp(e, "0") == 0 || std::strcmp(e, "off") == 0 || std::strcmp(e, "false") == 0);
}

}  // namespace

bool pdl_enabled() {
  int v = g_pdl.load(std::memory_order_relaxed);
  if (v < 0) {
    int expected = -1;
    g_pdl.compare_exchange_strong(expected, env_off("HYMBA_PDL") || env_off("HYMBA_GEMV_PDL") ? 0 : 1);
    v = g_pdl.load(std::memory_order_relaxed);
  }
  return v == 1;
}

void set_pdl(bool on) { g_pdl.store(on ? 1 : 0, std::memory_order_relaxed); }

bool kernel_has_pdl(const void* k) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, bool> known;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = known.find({k, dev});
    if (it != known.end()) return it->second;
  }
  cudaFuncAttributes fa{};
  bool yes = false;
  if (cudaFuncGetAttributes(&fa, k) == cudaSuccess) yes = fa.ptxVersion >= 90;
  else (void)cudaGetLastError();
  std::lock_guard<std::mutex> lock(mu);
  known[{k, dev}] = yes;
  return yes;
}

}  // namespace hymba::cuda
