// Error type used across hymba.cpp. Every user-facing failure (bad file, bad
// config, bad token id, ...) is reported by throwing hymba::Error with a
// message that names the offending thing; apps print it and exit non-zero.
#pragma once

#include <stdexcept>
#include <string>
#include <sstream>

namespace hymba {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void append_all(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append_all(os, rest...);
}
}  // namespace detail

// Builds a message from pieces: fail("tensor ", name, " has shape ", ...).
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  detail::append_all(os, args...);
  throw Error(os.str());
}

template <typename... Args>
void check(bool ok, const Args&... args) {
  if (!ok) fail(args...);
}

}  // namespace hymba
