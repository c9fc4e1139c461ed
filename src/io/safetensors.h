// Memory-mapped safetensors reader (single file or sharded with an index),
// and a streaming writer. Tensors are served as views into the mapping: the
// weights are never copied or widened.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "util/dtype.h"

namespace hymba {

struct TensorView {
  std::string name;
  const void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  int64_t numel() const;
  std::string shape_str() const;
};

// One read-only memory mapping of a file.
class MappedFile {
 public:
  // huge_pages: copy the file into anonymous memory with transparent huge
  // pages (fewer TLB misses when streaming weights; costs one copy at load
  // and needs THP in "madvise" or "always" mode) instead of mapping it.
  explicit MappedFile(const std::string& path, bool huge_pages = false);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t mapped_ = 0;  // length of the mapping at data_
};

// All tensors of a checkpoint: model.safetensors, or the shards listed by
// model.safetensors.index.json.
class SafetensorsCheckpoint {
 public:
  // dir: a model directory; throws hymba::Error naming the file on any
  // problem (missing, truncated, bad header, offsets out of range, ...).
  static SafetensorsCheckpoint open_dir(const std::string& dir, bool huge_pages = false);
  static SafetensorsCheckpoint open_file(const std::string& path, bool huge_pages = false);

  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;  // throws naming the tensor
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  size_t total_bytes() const;  // bytes of tensor data

 private:
  void add_file(const std::string& path, const std::vector<std::string>* expected_names, bool huge_pages);
  std::vector<std::shared_ptr<MappedFile>> files_;
  std::map<std::string, TensorView> tensors_;
};

// Writes a safetensors file tensor by tensor without holding it in memory:
// declare every tensor first, then write their bytes in the same order.
class SafetensorsWriter {
 public:
  explicit SafetensorsWriter(std::string path) : path_(std::move(path)) {}
  void declare(const std::string& name, DType dtype, std::vector<int64_t> shape);
  // Opens the file and writes the header; then call write() for each tensor in order.
  void begin();
  void write(const std::string& name, const void* data, size_t bytes);
  void finish();

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    size_t begin, end;
  };
  std::string path_;
  std::vector<Entry> entries_;
  size_t next_ = 0;
  size_t written_ = 0;
  std::FILE* file_ = nullptr;
};

}  // namespace hymba
