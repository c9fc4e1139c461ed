#include "model/hymba_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "backend/profiling.h"
#include "util/error.h"

namespace hymba {

// Per-chunk activation buffers in the backend's memory, sized for the
// largest chunk so far. Names follow spec section 4.3.
struct HymbaModel::Workspace {
  int64_t capacity = 0;
  DeviceArray<float> h, a, u, attn, conv, xdbc, dtn, delta, y, gate, up, cos, sin;
  std::vector<DeviceArray<float>> k, v;  // per kv slot: this chunk's post-RoPE K/V
  DeviceArray<float> logits;             // rows of logits before they go to the host
  // Host-side argument lists of the per-sequence ops (one entry per span).
  std::vector<AttentionArgs> attn_args;
  std::vector<KVSegment> segs;
  std::vector<ConvArgs> conv_args;
  std::vector<ScanArgs> scan_args;
  std::vector<StoreArgs> stores;  // the step's cache commit
  std::vector<int64_t> positions;  // a batched step's RoPE positions, row by row
};

HymbaModel::~HymbaModel() = default;

std::unique_ptr<HymbaModel> HymbaModel::load(const std::string& dir, const ModelOptions& opts) {
  namespace fs = std::filesystem;
  check(fs::is_directory(dir), "model directory '", dir, "' does not exist");
  std::unique_ptr<HymbaModel> m(new HymbaModel());
  m->cfg_ = HymbaConfig::load((fs::path(dir) / "config.json").string());
  m->plan_ = ModelPlan::build(m->cfg_);
  m->opts_ = opts;
  check(opts.max_chunk >= 0, "max_chunk must be positive (or 0 for the device's default)");
  m->ckpt_ = SafetensorsCheckpoint::open_dir(dir, opts.huge_pages);
  m->w_ = ModelWeights::bind(m->ckpt_, m->cfg_, m->plan_);
  const DType kv = opts.kv_dtype ? *opts.kv_dtype : (m->w_.matrix_dtype == DType::F32 ? DType::F32 : DType::BF16);
  m->layout_ = CacheLayout::build(m->cfg_, m->plan_, kv);
  m->be_ = make_backend(opts.device);
  if (opts.wrap_backend) m->be_ = opts.wrap_backend(std::move(m->be_));
  if (opts.profile) m->be_ = make_profiling_backend(std::move(m->be_));
  if (m->opts_.max_chunk == 0) m->opts_.max_chunk = m->be_->preferred_chunk();
  std::function<void(double)> upload_progress;
  if (opts.progress) upload_progress = [&](double f) { opts.progress("weights", f); };
  m->w_.make_resident(*m->be_, upload_progress);
  if (m->cfg_.rope) {
    const std::vector<float> inv_freq = m->cfg_.rope_inv_freq();
    m->inv_freq_ = DeviceArray<float>(*m->be_, inv_freq.size());
    m->be_->upload(m->inv_freq_.data(), inv_freq.data(), m->inv_freq_.bytes());
  }
  m->ws_ = std::make_unique<Workspace>();
  if (m->cfg_.num_memory_tokens > 0) m->meta_ = m->compute_meta_prefix(0);
  return m;
}

std::unique_ptr<SequenceCache> HymbaModel::compute_meta_prefix(int64_t max_tokens) {
  auto seq = std::make_unique<SequenceCache>(layout_, max_tokens, *be_);
  const int64_t M = cfg_.num_memory_tokens, D = cfg_.hidden_size;
  for (int64_t done = 0; done < M;) {
    const int64_t n = std::min(opts_.max_chunk, M - done);
    ensure_workspace(n);
    be_->copy(ws_->h.data(), w_.memory_tokens.data() + done * D, size_t(n * D) * sizeof(float));
    const RowSpan span{seq.get(), 0, n};
    run_layers(&span, 1, n, false);
    done += n;
  }
  return seq;
}

std::unique_ptr<SequenceCache> HymbaModel::new_sequence(int64_t max_tokens) const {
  auto seq = std::make_unique<SequenceCache>(layout_, max_tokens, *be_);
  if (meta_) seq->copy_from(*meta_);
  return seq;
}

void HymbaModel::ensure_workspace(int64_t n) {
  Workspace& ws = *ws_;
  if (n <= ws.capacity) return;
  // Recordings point at the old buffers.
  be_->drop_recordings();
  recordings_.clear();
  const HymbaConfig& c = cfg_;
  const int64_t D = c.hidden_size, Di = c.d_inner, R = c.dt_rank, N = c.mamba_d_state;
  int64_t in_rows = 0;
  for (const auto& lw : w_.layers) in_rows = std::max(in_rows, lw.in_proj.rows);
  Backend& be = *be_;
  auto buf = [&](int64_t width) { return DeviceArray<float>(be, size_t(n * width)); };
  ws.h = buf(D);
  ws.a = buf(D);
  ws.u = buf(in_rows);
  ws.attn = buf(Di);
  ws.conv = buf(Di);
  ws.xdbc = buf(R + 2 * N);
  ws.dtn = buf(R);
  ws.delta = buf(Di);
  ws.y = buf(Di);
  ws.gate = buf(c.intermediate_size);
  ws.up = buf(c.intermediate_size);
  ws.cos = buf(std::max<int64_t>(c.head_dim_qk / 2, 1));
  ws.sin = buf(std::max<int64_t>(c.head_dim_qk / 2, 1));
  ws.k.clear();
  ws.v.clear();
  for (size_t s = 0; s < plan_.kv_owner.size(); ++s) {
    ws.k.push_back(buf(layout_.kv_k));
    ws.v.push_back(buf(layout_.kv_v));
  }
  ws.capacity = n;
}

void HymbaModel::forward(SequenceCache& seq, const int32_t* ids, int64_t n, float* logits, bool all_positions,
                         bool decode) {
  run_forward(seq, ids, n, decode, !logits ? Logits::kNone : all_positions ? Logits::kAll : Logits::kLast, logits);
}

int32_t HymbaModel::forward_sample(SequenceCache& seq, const int32_t* ids, int64_t n, const SampleArgs& args,
                                   bool decode) {
  check(n > 0, "forward_sample: no input tokens");
  run_forward(seq, ids, n, decode, Logits::kLastOnDevice, nullptr);
  int32_t id = -1;
  be_->sample_tokens(ws_->logits.data(), 1, cfg_.vocab_size, cfg_.vocab_size, &args, &id);
  return id;
}

void HymbaModel::run_forward(SequenceCache& seq, const int32_t* ids, int64_t n, bool decode, Logits want,
                             float* logits) {
  // Validate everything before touching the sequence, so bad input leaves it intact.
  for (int64_t t = 0; t < n; ++t)
    check(ids[t] >= 0 && ids[t] < cfg_.vocab_size, "token id ", ids[t], " at index ", t,
          " is out of range (vocabulary has ", cfg_.vocab_size, " tokens)");
  check(n <= seq.remaining(), "input of ", n, " tokens does not fit the context: ", seq.remaining(),
        " of ", seq.max_tokens(), " tokens left");
  const int64_t D = cfg_.hidden_size, V = cfg_.vocab_size;
  for (int64_t done = 0; done < n;) {
    const int64_t nc = std::min(opts_.max_chunk, n - done);
    ensure_workspace(nc);
    Workspace& ws = *ws_;
    be_->embed_rows(w_.embed, ids + done, nc, ws.h.data(), D);
    const RowSpan span{&seq, 0, nc};
    recording_on_ = decode && nc == 1 && opts_.record_decode && !opts_.profile && !recording_broken_ &&
                    be_->can_record();
    try {
      run_layers(&span, 1, nc, decode);
    } catch (...) {
      recording_on_ = false;
      throw;
    }
    recording_on_ = false;
    done += nc;
    if (want == Logits::kNone) continue;
    // LM head on the rows that are asked for: every row, or the very last one.
    const int64_t first = want == Logits::kAll ? 0 : (done == n ? nc - 1 : nc);
    const int64_t rows = nc - first;
    if (rows <= 0) continue;
    lm_head(first, rows, want == Logits::kAll ? logits + (done - nc) * V : logits);
  }
}

void HymbaModel::lm_head(int64_t first, int64_t rows, float* out) {
  Workspace& ws = *ws_;
  const int64_t D = cfg_.hidden_size, V = cfg_.vocab_size;
  if (ws.logits.size() < size_t(rows * V)) ws.logits = DeviceArray<float>(*be_, size_t(rows * V));
  be_->norm_matmul(w_.lm_head, ws.h.data() + first * D, rows, D, w_.final_norm.data(), float(cfg_.rms_norm_eps),
                   ws.a.data(), ws.logits.data(), V, false);
  if (out) be_->download(out, ws.logits.data(), size_t(rows * V) * sizeof(float));
}

void HymbaModel::forward_batch(SequenceCache* const* seqs, const int32_t* ids, int64_t batch, float* logits) {
  run_batch(seqs, ids, batch, logits, nullptr, nullptr);
}

void HymbaModel::forward_batch_sample(SequenceCache* const* seqs, const int32_t* ids, int64_t batch,
                                      const SampleArgs* args, int32_t* out) {
  run_batch(seqs, ids, batch, nullptr, args, out);
}

void HymbaModel::run_batch(SequenceCache* const* seqs, const int32_t* ids, int64_t batch, float* logits,
                           const SampleArgs* args, int32_t* out) {
  check(batch > 0, "forward_batch: empty batch");
  for (int64_t b = 0; b < batch; ++b) {
    check(ids[b] >= 0 && ids[b] < cfg_.vocab_size, "token id ", ids[b], " of sequence ", b,
          " is out of range (vocabulary has ", cfg_.vocab_size, " tokens)");
    check(seqs[b]->remaining() >= 1, "sequence ", b, " is full (", seqs[b]->max_tokens(), " tokens)");
    for (int64_t o = 0; o < b; ++o) check(seqs[o] != seqs[b], "sequence ", b, " appears twice in the batch");
  }
  const int64_t D = cfg_.hidden_size, V = cfg_.vocab_size;
  for (int64_t done = 0; done < batch;) {
    const int64_t nb = std::min(opts_.max_chunk, batch - done);
    ensure_workspace(nb);
    Workspace& ws = *ws_;
    be_->embed_rows(w_.embed, ids + done, nb, ws.h.data(), D);
    std::vector<RowSpan> spans;
    for (int64_t b = 0; b < nb; ++b) spans.push_back({seqs[done + b], b, 1});
    recording_on_ = false;  // recordings hold one sequence's state
    run_layers(spans.data(), int(nb), nb, true);
    lm_head(0, nb, logits ? logits + done * V : nullptr);
    if (args) be_->sample_tokens(ws.logits.data(), nb, V, V, args + done, out + done);
    done += nb;
  }
}

// Single-token decode on a backend that can record: each stretch of ops
// whose arguments do not change from step to step (they point only at the
// workspace, the weights and one sequence's conv/SSM state) is run eagerly
// the first time (so the backend settles its plans and scratch), recorded the
// second time, and replayed from then on. The key holds every pointer a part
// depends on beyond the workspace, so a recording is reused only where it is
// valid; workspace reallocation drops them all.
template <typename F>
void HymbaModel::recorded(const RecordKey& key, F&& ops) {
  if (!recording_on_) {
    ops();
    return;
  }
  auto it = recordings_.find(key);
  if (it == recordings_.end()) {
    if (recordings_.size() >= 4096) {  // many sequences came and went: start over
      be_->drop_recordings();
      recordings_.clear();
    }
    ops();
    recordings_.emplace(key, -1);  // seen once
    return;
  }
  if (it->second < 0) {
    try {
      be_->begin_recording();
      ops();
      it->second = be_->end_recording();
    } catch (const Error& e) {
      // Nothing recorded ran: close the recording if it is still open, stop
      // recording for this model and run the ops the plain way.
      try {
        be_->end_recording();
      } catch (const Error&) {
      }
      std::fprintf(stderr, "warning: decode recording failed, running op by op from now on (%s)\n", e.what());
      recording_broken_ = true;
      recording_on_ = false;
      recordings_.erase(it);
      ops();
      return;
    }
  }
  be_->replay(it->second);
}

void HymbaModel::run_layers(const RowSpan* spans, int n_spans, int64_t n, bool decode) {
  Workspace& ws = *ws_;
  const int half = int(cfg_.head_dim_qk / 2);
  if (cfg_.rope && n_spans == 1) {
    be_->rope_tables(spans[0].seq->length(), spans[0].n, inv_freq_.data(), half, ws.cos.data() + spans[0].row0 * half,
                     ws.sin.data() + spans[0].row0 * half);
  } else if (cfg_.rope) {  // a batched step: one row per sequence, each at its own position
    ws.positions.clear();
    for (int i = 0; i < n_spans; ++i) {
      check(spans[i].row0 == int64_t(ws.positions.size()), "run_layers: spans must cover the rows in order");
      for (int64_t t = 0; t < spans[i].n; ++t) ws.positions.push_back(spans[i].seq->length() + t);
    }
    be_->rope_tables_at(ws.positions.data(), int64_t(ws.positions.size()), inv_freq_.data(), half, ws.cos.data(),
                        ws.sin.data());
  }
  // Each layer: its inputs (in_proj, q/k/v), attention, then the rest (the
  // Mamba branch, the fusion, the MLP). In single-token decode the stretch
  // from one attention to the next (a layer's rest plus the next layer's
  // inputs) depends only on the workspace, the weights and the sequence's
  // conv/SSM state, so it is one recording (see recorded()).
  const std::vector<LayerPlan>& layers = plan_.layers;
  if (!layers.empty())
    recorded({layers[0].index, 0, nullptr, nullptr, n},
             [&] { layer_inputs(layers[0], w_.layers[layers[0].index], n); });
  // Attention and the Mamba branch of a layer read the same inputs and write
  // separate outputs (ws.attn; ws.conv, xdbc, delta, y and the sequence's
  // conv/SSM state): attention runs as a side branch keyed by the layer,
  // which the backend may overlap with the Mamba branch; layer_rest joins it
  // before the fusion. In recorded decode the join is part of the replayed
  // stretch and waits for the branch issued just before it (the key's latest
  // side_end; CudaVsCpu.RecordedJoinWaitsForTheLatestSideBranch).
  // Joined on the way out too, if an op throws (side_join is a no-op when
  // nothing is pending). A destructor must not throw while an exception
  // unwinds, so a failing join there is dropped: the first error is the one
  // the caller sees.
  struct SideJoin {
    Backend& be;
    ~SideJoin() {
      try {
        be.side_join();
      } catch (...) {
      }
    }
  } side_join_on_exit{*be_};
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerPlan& lp = layers[i];
    be_->side_begin(lp.index);
    layer_attention(lp, spans, n_spans, n, decode);
    be_->side_end();
    const LayerPlan* next = i + 1 < layers.size() ? &layers[i + 1] : nullptr;
    recorded({lp.index, 1, spans[0].seq->conv_state(lp.index), spans[0].seq->ssm_state(lp.index), n}, [&] {
      layer_rest(lp, w_.layers[lp.index], spans, n_spans, n);
      if (next) layer_inputs(*next, w_.layers[next->index], n);
    });
  }
  // The chunk's K/V joins the cache only now: every layer of the chunk has
  // attended over the cache as it was before the chunk plus the chunk itself.
  // All slots of all spans in one batched store (one launch on a GPU).
  ws.stores.clear();
  for (int i = 0; i < n_spans; ++i) {
    const RowSpan& sp = spans[i];
    for (size_t s = 0; s < plan_.kv_owner.size(); ++s)
      sp.seq->store_kv(int(s), ws.k[s].data() + sp.row0 * layout_.kv_k, layout_.kv_k,
                       ws.v[s].data() + sp.row0 * layout_.kv_v, layout_.kv_v, sp.n, &ws.stores);
  }
  be_->store_rows_batch(ws.stores.data(), int(ws.stores.size()));
  for (int i = 0; i < n_spans; ++i) spans[i].seq->advance(spans[i].n);
}

void HymbaModel::layer_inputs(const LayerPlan& lp, const LayerWeights& w, int64_t n) {
  const HymbaConfig& c = cfg_;
  Workspace& ws = *ws_;
  const int64_t D = c.hidden_size;
  const int64_t ld_u = w.in_proj.rows;
  // Fused input projection: u = [q | k | v | x | z] (k, v only for KV owners).
  be_->norm_matmul(w.in_proj, ws.h.data(), n, D, w.input_norm.data(), float(c.rms_norm_eps), ws.a.data(),
                   ws.u.data(), ld_u, false);
  // Attention inputs: RoPE on q; a KV owner also packs this chunk's K/V,
  // applies RoPE to K and rounds both to the cache precision now, so results
  // do not depend on whether a key is read from this chunk or, later, from
  // the cache.
  const float* k = lp.owns_kv ? ws.u.data() + c.attn_dim : nullptr;
  const float* v = lp.owns_kv ? k + layout_.kv_k : nullptr;
  be_->prepare_qkv(ws.u.data(), k, v, ld_u, n, c.num_attention_heads, c.num_key_value_heads, int(c.head_dim_qk),
                   c.rope ? ws.cos.data() : nullptr, c.rope ? ws.sin.data() : nullptr, layout_.kv_dtype,
                   ws.k[lp.kv_slot].data(), layout_.kv_k, ws.v[lp.kv_slot].data(), layout_.kv_v);
}

void HymbaModel::layer_attention(const LayerPlan& lp, const RowSpan* spans, int n_spans, int64_t n, bool decode) {
  const HymbaConfig& c = cfg_;
  Workspace& ws = *ws_;
  const int64_t Di = c.d_inner;
  const int64_t ld_u = w_.layers[lp.index].in_proj.rows;
  float* q = ws.u.data();
  float* kc = ws.k[lp.kv_slot].data();
  float* vc = ws.v[lp.kv_slot].data();
  // Attention, per sequence: its cached K/V plus its rows of this chunk
  // (segments live in ws.segs: 4 per span, referenced by the args).
  ws.attn_args.resize(size_t(n_spans));
  ws.segs.resize(size_t(n_spans) * 4);
  for (int i = 0; i < n_spans; ++i) {
    const RowSpan& sp = spans[i];
    KVSegment* segs = ws.segs.data() + size_t(i) * 4;
    int n_segs = sp.seq->kv_segments(lp.kv_slot, segs);
    segs[n_segs++] = KVSegment{kc + sp.row0 * layout_.kv_k, vc + sp.row0 * layout_.kv_v, DType::F32,
                               layout_.kv_k, layout_.kv_v, sp.seq->length(), sp.n};
    AttentionArgs& aa = ws.attn_args[size_t(i)];
    aa.q = q + sp.row0 * ld_u;
    aa.ldq = ld_u;
    aa.n_q = sp.n;
    aa.q_pos0 = sp.seq->length();
    aa.n_heads = c.num_attention_heads;
    aa.n_kv_heads = c.num_key_value_heads;
    aa.head_dim_qk = int(c.head_dim_qk);
    aa.head_dim_v = int(c.head_dim_v);
    aa.segments = segs;
    aa.n_segments = n_segs;
    aa.window = lp.global ? -1 : *c.sliding_window - ((decode && opts_.hf_decode_window) ? 1 : 0);
    aa.n_always_visible = c.num_memory_tokens;
    aa.scale = 1.0f / std::sqrt(float(c.head_dim_qk));
    aa.out = ws.attn.data() + sp.row0 * Di;
    aa.ldo = Di;
  }
  if (n_spans == 1) be_->attention(ws.attn_args[0]);
  else be_->attention_batch(ws.attn_args.data(), n_spans);
}

void HymbaModel::layer_rest(const LayerPlan& lp, const LayerWeights& w, const RowSpan* spans, int n_spans,
                            int64_t n) {
  const HymbaConfig& c = cfg_;
  Workspace& ws = *ws_;
  Backend& be = *be_;
  const int64_t D = c.hidden_size, Di = c.d_inner, R = c.dt_rank, N = c.mamba_d_state;
  const int64_t XD = R + 2 * N;
  const float eps = float(c.rms_norm_eps);
  const int64_t ld_u = w.in_proj.rows;
  int64_t off = c.attn_dim;
  if (lp.owns_kv) off += layout_.kv_k + layout_.kv_v;
  float* x = ws.u.data() + off;
  float* z = x + Di;
  // ---- Mamba branch (conv and scan carry per-sequence state)
  ws.conv_args.resize(size_t(n_spans));
  for (int i = 0; i < n_spans; ++i) {
    const RowSpan& sp = spans[i];
    ws.conv_args[size_t(i)] = ConvArgs{x + sp.row0 * ld_u, ld_u, sp.n, Di, w.conv_weight.data(), w.conv_bias.data(),
                                       int(c.mamba_d_conv), sp.seq->conv_state(lp.index),
                                       ws.conv.data() + sp.row0 * Di, Di};
  }
  if (n_spans == 1) {  // the single-sequence op (what a recording may hold), with x_proj
    be.conv_silu_matmul(ws.conv_args[0], w.x_proj, ws.xdbc.data(), XD);
  } else {
    be.conv_silu_matmul_batch(ws.conv_args.data(), n_spans, w.x_proj, ws.xdbc.data(), XD);
  }
  ws.scan_args.resize(size_t(n_spans));
  for (int i = 0; i < n_spans; ++i) {
    const RowSpan& sp = spans[i];
    ScanArgs& sa = ws.scan_args[size_t(i)];
    sa.u = ws.conv.data() + sp.row0 * Di;
    sa.ldu = Di;
    sa.delta = ws.delta.data() + sp.row0 * Di;
    sa.ld_delta = Di;
    sa.B = ws.xdbc.data() + sp.row0 * XD + R;
    sa.ldb = XD;
    sa.C = ws.xdbc.data() + sp.row0 * XD + R + N;
    sa.ldc = XD;
    sa.z = z + sp.row0 * ld_u;
    sa.ldz = ld_u;
    sa.dt_bias = w.dt_bias.data();
    sa.A = w.A.data();
    sa.D = w.D.data();
    sa.state = sp.seq->ssm_state(lp.index);
    sa.y = ws.y.data() + sp.row0 * Di;
    sa.ldy = Di;
    sa.n = sp.n;
    sa.channels = Di;
    sa.d_state = N;
  }
  // dt/B/C norms and dt_proj, then the scan: one fused op (for a batch, the
  // spans' rows of xdbc are consecutive, as the op's contract wants).
  const ScanInputNorms norms{ws.xdbc.data(), XD,          w.dt_proj,        w.dt_norm.data(), w.B_norm.data(),
                             w.C_norm.data(), eps,        ws.dtn.data()};
  if (n_spans == 1) {
    be.normed_selective_scan(ws.scan_args[0], norms);
  } else {
    be.normed_selective_scan_batch(ws.scan_args.data(), n_spans, norms);
  }

  // ---- fuse the branches: normalise each, average, project, residual
  be.side_join();  // attention (run_layers' side branch) is done
  be.fuse_branches_matmul(w.out_proj, ws.attn.data(), Di, ws.y.data(), Di, n, w.attn_out_norm.data(),
                          w.ssm_out_norm.data(), eps, ws.h.data(), D, true);

  // ---- SwiGLU MLP, residual
  be.mlp_residual(w.gate_proj, w.up_proj, w.down_proj, ws.h.data(), n, D, w.mlp_norm.data(), eps, ws.a.data(),
                  ws.up.data(), ws.gate.data(), ws.h.data(), D);
}

}  // namespace hymba
