// Instruction-set selection for the CPU matmul (the kernel itself is declared
// in backend/cpu/kernels.h). One binary carries every path; the best one the
// CPU supports is chosen at first use, unless the environment variable
// HYMBA_CPU_ISA (read once) or set_matmul_isa() says otherwise.
//
// Paths: "portable"       plain C++ (any CPU),
//        "avx2"           AVX2 + FMA + F16C,
//        "avx512"         AVX-512 F/BW/VL/DQ, using AVX512_BF16 (vdpbf16ps)
//                         for bf16 weights when the CPU has it,
//        "avx512-nobf16"  AVX-512 without the BF16 extension (what "avx512"
//                         becomes on a CPU that lacks it; selectable so tests
//                         can cover it everywhere).
#pragma once

#include <string>
#include <vector>

namespace hymba::cpu {

// Name of the path matmul uses now (one of the names above).
const char* matmul_isa();

// Selects a path by name; nullptr, "" or "auto" picks the best available.
// Throws hymba::Error for an unknown name or one this CPU cannot run.
// Not meant to be called while another thread is inside matmul.
void set_matmul_isa(const char* name);

// Whether this CPU can run the named path.
bool matmul_isa_supported(const char* name);

// Every path this CPU can run, portable first.
std::vector<std::string> matmul_isas_available();

}  // namespace hymba::cpu
