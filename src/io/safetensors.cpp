#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "util/error.h"

namespace hymba {

using nlohmann::json;
namespace fs = std::filesystem;

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

MappedFile::MappedFile(const std::string& path, bool huge_pages) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  check(fd >= 0, "cannot open '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("cannot stat '", path, "': ", std::strerror(errno));
  }
  size_ = size_t(st.st_size);
  if (size_ == 0) {
    ::close(fd);
    return;
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  check(p != MAP_FAILED, "cannot memory-map '", path, "': ", std::strerror(errno));
  data_ = static_cast<const uint8_t*>(p);
  mapped_ = size_;
  if (!huge_pages) return;
  // Copy into 2 MiB-aligned anonymous memory advised for huge pages. The
  // file's pages are released chunk by chunk as they are copied, so the
  // resident size never holds both copies.
  const size_t huge = size_t(2) << 20;
  const size_t len = (size_ + huge - 1) / huge * huge;
  void* a = ::mmap(nullptr, len + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  check(a != MAP_FAILED, "cannot allocate ", len, " bytes for '", path, "' in huge pages");
  uint8_t* base = static_cast<uint8_t*>(a);
  uint8_t* aligned = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(base) + huge - 1) / huge * huge);
  if (aligned > base) ::munmap(base, size_t(aligned - base));
  ::munmap(aligned + len, size_t(base + len + huge - (aligned + len)));
  ::madvise(aligned, len, MADV_HUGEPAGE);  // best effort: without THP this is a plain copy
  for (size_t off = 0; off < size_; off += (size_t(64) << 20)) {
    const size_t n = std::min(size_ - off, size_t(64) << 20);
    std::memcpy(aligned + off, data_ + off, n);
    ::madvise(const_cast<uint8_t*>(data_) + off, n, MADV_DONTNEED);
  }
  ::munmap(const_cast<uint8_t*>(data_), size_);
  ::mprotect(aligned, len, PROT_READ);
  data_ = aligned;
  mapped_ = len;
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), mapped_);
}

namespace {

DType dtype_from_safetensors(const std::string& s, const std::string& tensor, const std::string& file) {
  if (s == "F32") return DType::F32;
  if (s == "BF16") return DType::BF16;
  if (s == "F16") return DType::F16;
  fail(file, ": tensor '", tensor, "' has dtype ", s, ", which is not supported (F32, BF16, F16)");
}

const char* dtype_to_safetensors(DType t) { return dtype_name(t); }

}  // namespace

void SafetensorsCheckpoint::add_file(const std::string& path,
                                     const std::vector<std::string>* expected_names, bool huge_pages) {
  auto file = std::make_shared<MappedFile>(path, huge_pages);
  const size_t size = file->size();
  check(size >= 8, path, ": file is too short to be safetensors (", size, " bytes)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file->data(), 8);  // little-endian on every supported host
  check(header_len <= size - 8, path, ": header length ", header_len,
        " runs past the end of the file (", size, " bytes): truncated or not safetensors");
  check(header_len < (uint64_t(100) << 20), path, ": header length ", header_len, " is implausibly large");
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(file->data() + 8),
                         reinterpret_cast<const char*>(file->data() + 8 + header_len));
  } catch (const json::exception& e) {
    fail(path, ": the safetensors header is not valid JSON: ", e.what());
  }
  check(header.is_object(), path, ": the safetensors header is not a JSON object");
  const size_t data_begin = 8 + header_len;
  const size_t data_size = size - data_begin;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string& name = it.key();
    const json& e = it.value();
    check(e.is_object() && e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"),
          path, ": header entry for tensor '", name, "' lacks dtype/shape/data_offsets");
    TensorView t;
    t.name = name;
    try {
      t.dtype = dtype_from_safetensors(e["dtype"].get<std::string>(), name, path);
      t.shape = e["shape"].get<std::vector<int64_t>>();
      auto off = e["data_offsets"].get<std::vector<uint64_t>>();
      check(off.size() == 2, path, ": tensor '", name, "' data_offsets must have 2 entries");
      check(off[0] <= off[1] && off[1] <= data_size, path, ": tensor '", name, "' data_offsets [",
            off[0], ", ", off[1], ") run past the end of the data (", data_size,
            " bytes): the file is truncated or corrupt");
      for (int64_t d : t.shape) check(d >= 0, path, ": tensor '", name, "' has a negative dimension");
      check(uint64_t(t.numel()) * dtype_size(t.dtype) == off[1] - off[0], path, ": tensor '", name,
            "' has ", off[1] - off[0], " bytes but shape ", t.shape_str(), " of ", dtype_name(t.dtype),
            " needs ", uint64_t(t.numel()) * dtype_size(t.dtype));
      t.data = file->data() + data_begin + off[0];
    } catch (const json::exception& ex) {
      fail(path, ": malformed header entry for tensor '", name, "': ", ex.what());
    }
    check(!tensors_.count(name), path, ": tensor '", name, "' appears in more than one file");
    tensors_.emplace(name, std::move(t));
  }
  if (expected_names) {
    for (const auto& n : *expected_names)
      check(tensors_.count(n), path, ": the index says it holds tensor '", n, "' but it does not");
  }
  files_.push_back(std::move(file));
}

SafetensorsCheckpoint SafetensorsCheckpoint::open_file(const std::string& path, bool huge_pages) {
  SafetensorsCheckpoint ck;
  ck.add_file(path, nullptr, huge_pages);
  return ck;
}

SafetensorsCheckpoint SafetensorsCheckpoint::open_dir(const std::string& dir, bool huge_pages) {
  SafetensorsCheckpoint ck;
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) {
    ck.add_file(single.string(), nullptr, huge_pages);
    return ck;
  }
  check(fs::exists(index), "no weights in '", dir,
        "': expected model.safetensors or model.safetensors.index.json with its shards");
  json j;
  {
    std::ifstream f(index);
    check(f.good(), "cannot open '", index.string(), "'");
    try {
      f >> j;
    } catch (const json::exception& e) {
      fail("'", index.string(), "' is not valid JSON: ", e.what());
    }
  }
  check(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), "'", index.string(),
        "' has no 'weight_map' object");
  std::map<std::string, std::vector<std::string>> by_file;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    check(it.value().is_string(), "'", index.string(), "': weight_map entry for '", it.key(),
          "' is not a file name");
    const std::string file = it.value().get<std::string>();
    check(file.find('/') == std::string::npos && file.find("..") == std::string::npos, "'",
          index.string(), "': shard name '", file, "' must be a plain file name");
    by_file[file].push_back(it.key());
  }
  check(!by_file.empty(), "'", index.string(), "' lists no tensors");
  for (const auto& [file, names] : by_file) ck.add_file((fs::path(dir) / file).string(), &names, huge_pages);
  return ck;
}

const TensorView& SafetensorsCheckpoint::get(const std::string& name) const {
  auto it = tensors_.find(name);
  check(it != tensors_.end(), "checkpoint has no tensor '", name, "'");
  return it->second;
}

size_t SafetensorsCheckpoint::total_bytes() const {
  size_t n = 0;
  for (const auto& [_, t] : tensors_) n += size_t(t.numel()) * dtype_size(t.dtype);
  return n;
}

// ----------------------------------------------------------------- writer

void SafetensorsWriter::declare(const std::string& name, DType dtype, std::vector<int64_t> shape) {
  check(!file_, "SafetensorsWriter: declare() after begin()");
  size_t n = 1;
  for (int64_t d : shape) n *= size_t(d);
  size_t begin = entries_.empty() ? 0 : entries_.back().end;
  entries_.push_back({name, dtype, std::move(shape), begin, begin + n * dtype_size(dtype)});
}

void SafetensorsWriter::begin() {
  json h = json::object();
  for (const auto& e : entries_)
    h[e.name] = {{"dtype", dtype_to_safetensors(e.dtype)}, {"shape", e.shape},
                 {"data_offsets", {e.begin, e.end}}};
  h["__metadata__"] = {{"format", "pt"}};
  std::string s = h.dump();
  while ((s.size() + 8) % 8) s.push_back(' ');  // keep tensor data 8-byte aligned
  file_ = std::fopen(path_.c_str(), "wb");
  check(file_ != nullptr, "cannot create '", path_, "': ", std::strerror(errno));
  uint64_t len = s.size();
  check(std::fwrite(&len, 8, 1, file_) == 1 && std::fwrite(s.data(), 1, s.size(), file_) == s.size(),
        "write error on '", path_, "'");
}

void SafetensorsWriter::write(const std::string& name, const void* data, size_t bytes) {
  check(file_ && next_ < entries_.size(), "SafetensorsWriter: write() out of order");
  const Entry& e = entries_[next_];
  check(e.name == name, "SafetensorsWriter: expected tensor '", e.name, "', got '", name, "'");
  check(written_ + bytes <= e.end - e.begin, "SafetensorsWriter: too many bytes for '", name, "'");
  check(std::fwrite(data, 1, bytes, file_) == bytes, "write error on '", path_, "'");
  written_ += bytes;
  if (written_ == e.end - e.begin) {
    ++next_;
    written_ = 0;
  }
}

void SafetensorsWriter::finish() {
  check(file_ && next_ == entries_.size(), "SafetensorsWriter: not every tensor was written");
  check(std::fclose(file_) == 0, "write error on '", path_, "'");
  file_ = nullptr;
}

}  // namespace hymba
