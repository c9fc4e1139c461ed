// A Backend decorator that times every op (wall clock, synchronous on the
// CPU) and prints a table: where the forward pass spends its time.
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"

namespace hymba {

std::unique_ptr<Backend> make_profiling_backend(std::unique_ptr<Backend> inner);
// The table of a profiling backend (empty string for any other backend).
std::string profile_report(const Backend& b);
// Clears the counters of a profiling backend (no-op for any other backend).
void profile_reset(Backend& b);

}  // namespace hymba
