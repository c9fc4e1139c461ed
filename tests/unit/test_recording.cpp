// The model's recording of single-token decode (CUDA graphs on the GPU),
// checked on the CPU: a test backend records ops as closures with their
// arguments fixed (what a graph does: same pointers, memory read at replay)
// and refuses, while recording, every op a recording must not hold (host
// inputs, step-dependent arguments). Decoding through it must give exactly
// what the plain CPU backend gives, with most of each step replayed.
#include <functional>
#include <memory>
#include <vector>

#include "model/hymba_model.h"
#include "test_util.h"

namespace hymba {
namespace {

class RecordingCpu final : public Backend {
 public:
  explicit RecordingCpu(std::unique_ptr<Backend> inner) : in_(std::move(inner)) {}
  int recordings_made = 0, replays = 0;
  bool fail_recording = false;  // end_recording throws (a capture that broke)

  std::string name() const override { return in_->name(); }
  void* allocate(size_t b) override { return in_->allocate(b); }
  void release(void* p) noexcept override { in_->release(p); }
  void upload(void* d, const void* s, size_t b) override { refuse("upload"), in_->upload(d, s, b); }
  void download(void* d, const void* s, size_t b) override { refuse("download"), in_->download(d, s, b); }
  void copy(void* d, const void* s, size_t b) override { refuse("copy"), in_->copy(d, s, b); }
  void fill_zero(void* d, size_t b) override { refuse("fill_zero"), in_->fill_zero(d, b); }
  const void* resident(const void* h, size_t b) override { return in_->resident(h, b); }

  bool can_record() const override { return true; }
  void begin_recording() override {
    check(!recording_, "nested recording");
    recording_ = true;
    current_.clear();
  }
  int end_recording() override {
    check(recording_, "end_recording without begin");
    recording_ = false;
    if (fail_recording) fail("capture failed (simulated)");
    recs_.push_back(std::move(current_));
    ++recordings_made;
    return int(recs_.size()) - 1;
  }
  void replay(int id) override {
    check(!recording_ && id >= 0 && id < int(recs_.size()), "bad replay ", id);
    ++replays;
    for (auto& op : recs_[size_t(id)]) op();
  }
  void drop_recordings() override { recs_.clear(); }

  // Recordable ops: stored with their arguments while recording.
  void matmul(const MatrixView& W, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
              bool acc) override {
    run([=, this] { in_->matmul(W, x, n, ldx, y, ldy, acc); });
  }
  void rmsnorm(const float* x, int64_t n, int64_t d, int64_t ldx, const float* w, float eps, float* y,
               int64_t ldy) override {
    run([=, this] { in_->rmsnorm(x, n, d, ldx, w, eps, y, ldy); });
  }
  void rope(float* x, int64_t n, int64_t ldx, int h, int hd, const float* c, const float* s) override {
    run([=, this] { in_->rope(x, n, ldx, h, hd, c, s); });
  }
  void causal_conv_silu(const float* x, int64_t n, int64_t ldx, int64_t ch, const float* w, const float* b, int k,
                        float* st, float* y, int64_t ldy) override {
    run([=, this] { in_->causal_conv_silu(x, n, ldx, ch, w, b, k, st, y, ldy); });
  }
  void selective_scan(const ScanArgs& a) override {
    run([=, this] { in_->selective_scan(a); });
  }
  void silu_mul(const float* g, int64_t ldg, const float* u, int64_t ldu, int64_t n, int64_t d, float* o,
                int64_t ldo) override {
    run([=, this] { in_->silu_mul(g, ldg, u, ldu, n, d, o, ldo); });
  }
  void average_into(float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d) override {
    run([=, this] { in_->average_into(a, lda, b, ldb, n, d); });
  }
  void round_to(DType dt, float* x, int64_t n, int64_t d, int64_t ldx) override {
    run([=, this] { in_->round_to(dt, x, n, d, ldx); });
  }
  void store_rows(const float* s, int64_t lds, int64_t n, int64_t d, DType dt, void* dst, int64_t ldd) override {
    run([=, this] { in_->store_rows(s, lds, n, d, dt, dst, ldd); });
  }
  // Not recordable: their arguments change every step or come from the host.
  void rope_tables(int64_t p, int64_t n, const float* f, int h, float* c, float* s) override {
    refuse("rope_tables"), in_->rope_tables(p, n, f, h, c, s);
  }
  void attention(const AttentionArgs& a) override { refuse("attention"), in_->attention(a); }
  void embed_rows(const MatrixView& t, const int32_t* ids, int64_t n, float* o, int64_t ldo) override {
    refuse("embed_rows"), in_->embed_rows(t, ids, n, o, ldo);
  }
  void attention_batch(const AttentionArgs* a, int n) override { refuse("attention_batch"), in_->attention_batch(a, n); }
  void causal_conv_silu_batch(const ConvArgs* a, int n) override {
    refuse("causal_conv_silu_batch"), in_->causal_conv_silu_batch(a, n);
  }
  void selective_scan_batch(const ScanArgs* a, int n) override {
    refuse("selective_scan_batch"), in_->selective_scan_batch(a, n);
  }

 private:
  void refuse(const char* op) { check(!recording_, op, " must not be recorded"); }
  void run(std::function<void()> f) {
    if (recording_) current_.push_back(std::move(f));
    else f();
  }
  std::unique_ptr<Backend> in_;
  bool recording_ = false;
  std::vector<std::function<void()>> current_;
  std::vector<std::vector<std::function<void()>>> recs_;
};

TEST(DecodeRecording, ReplayEqualsRunningEveryOp) {
  const std::string dir = test::work_dir() + "/goldens/gqa_groups3";
  const auto g = test::read_json(dir + "/golden.json");
  std::vector<int32_t> ids;
  for (const auto& p : g["prompts"])
    if (p["input_ids"].size() > ids.size()) ids = p["input_ids"].get<std::vector<int32_t>>();
  RecordingCpu* rec = nullptr;
  ModelOptions o;
  o.wrap_backend = [&](std::unique_ptr<Backend> inner) {
    auto r = std::make_unique<RecordingCpu>(std::move(inner));
    rec = r.get();
    return std::unique_ptr<Backend>(std::move(r));
  };
  auto recorded = HymbaModel::load(dir, o);
  auto plain = HymbaModel::load(dir);
  const size_t V = size_t(plain->vocab_size());
  // Two sequences in turn: recordings keyed by each one's state must not mix.
  auto a1 = recorded->new_sequence(int64_t(ids.size())), b1 = recorded->new_sequence(int64_t(ids.size()));
  auto a2 = plain->new_sequence(int64_t(ids.size())), b2 = plain->new_sequence(int64_t(ids.size()));
  std::vector<float> x(V), y(V);
  for (size_t t = 0; t < ids.size(); ++t) {
    for (auto [r, p] : {std::pair{a1.get(), a2.get()}, std::pair{b1.get(), b2.get()}}) {
      const int32_t id = ids[(t * 7 + (r == b1.get() ? 3 : 0)) % ids.size()];
      recorded->forward(*r, &id, 1, x.data(), false, true);
      plain->forward(*p, &id, 1, y.data(), false, true);
      ASSERT_EQ(x, y) << "step " << t;  // same kernels, same order: bit-identical
    }
  }
  ASSERT_NE(rec, nullptr);
  const int layers = int(recorded->config().num_hidden_layers);
  // The first layer's inputs, shared by both sequences (run eagerly once,
  // then recorded and replayed: 2T - 1 replays over the 2T steps); then per
  // layer and sequence the stretch after attention (the layer's rest and
  // the next layer's inputs: T - 1 replays each).
  const int T = int(ids.size());
  EXPECT_EQ(rec->recordings_made, 1 + layers * 2);
  EXPECT_EQ(rec->replays, (2 * T - 1) + layers * 2 * (T - 1));
}

// A recording that fails is not fatal: the model warns, runs the ops of that
// step itself and stays op by op; the results are unchanged.
TEST(DecodeRecording, FailedRecordingFallsBackToRunningOps) {
  const std::string dir = test::work_dir() + "/goldens/gqa_groups3";
  RecordingCpu* rec = nullptr;
  ModelOptions o;
  o.wrap_backend = [&](std::unique_ptr<Backend> inner) {
    auto r = std::make_unique<RecordingCpu>(std::move(inner));
    r->fail_recording = true;
    rec = r.get();
    return std::unique_ptr<Backend>(std::move(r));
  };
  auto recorded = HymbaModel::load(dir, o);
  auto plain = HymbaModel::load(dir);
  const size_t V = size_t(plain->vocab_size());
  auto a = recorded->new_sequence(8), b = plain->new_sequence(8);
  std::vector<float> x(V), y(V);
  for (int32_t id : {5, 9, 2, 7, 1}) {
    recorded->forward(*a, &id, 1, x.data(), false, true);
    plain->forward(*b, &id, 1, y.data(), false, true);
    ASSERT_EQ(x, y);
  }
  EXPECT_EQ(rec->recordings_made, 0);
  EXPECT_EQ(rec->replays, 0);
}

}  // namespace
}  // namespace hymba
