// Shared helpers for the unit tests.
#pragma once

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "util/error.h"

namespace hymba::test {

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << "cannot open " << path;
  nlohmann::json j;
  if (f.good()) f >> j;
  return j;
}

// ||a - b||_2 / ||b||_2
inline double rel_l2(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - double(b[i])));
  return m;
}

// The message of the hymba::Error that f() throws (a marker if none is thrown).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const hymba::Error& e) {
    return e.what();
  }
  return "<no hymba::Error thrown>";
}

// Where ../shared and the test work directory are: the build's paths, unless
// the environment names others (test binaries run on another machine, e.g.
// the GPU tests on the device machine).
inline std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}
// Sets (value) or clears (nullptr) an environment variable for a scope,
// e.g. a backend switch read when the backend is made.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_.c_str(), old_.c_str(), 1);
    else unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_, old_;
  bool had_ = false;
};

inline std::string shared_dir() { return env_or("HYMBA_SHARED_DIR", HYMBA_SHARED_DIR); }
inline std::string work_dir() { return env_or("HYMBA_TEST_WORK", HYMBA_TEST_WORK); }

}  // namespace hymba::test
