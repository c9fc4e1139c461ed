// Small helpers shared by the `hymba` subcommands.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hymba::cli {

// "1,2,3" -> {1,2,3}; throws hymba::Error naming the bad entry.
std::vector<int32_t> parse_ids(const std::string& s);
std::string join_ids(const std::vector<int32_t>& ids);
std::string read_file(const std::string& path);
// Peak resident set size of this process in bytes.
int64_t peak_rss_bytes();
std::string human_bytes(int64_t b);

}  // namespace hymba::cli
