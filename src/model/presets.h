// Model presets for `hymba init` (random weights in the exact HF layout) and
// the random-weight writer itself.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"
#include "util/dtype.h"

namespace hymba {

// "tiny", "125m", "350m" or "1.5b" (identical to the released Hymba-1.5B config).
HymbaConfig preset_config(const std::string& name);
std::vector<std::string> preset_names();

// Writes only dir/config.json (torch_dtype set from dtype).
void write_config(const HymbaConfig& config, DType dtype, const std::string& dir);

// Writes dir/config.json and dir/model.safetensors with seeded random weights
// (initialisation as the reference's from-scratch init: matrices N(0, 0.02)-like,
// norms 1, A_log = log(1..d_state), D = 1, meta tokens ~ unit scale).
void write_random_checkpoint(const HymbaConfig& config, DType dtype, uint64_t seed, const std::string& dir);

}  // namespace hymba
