#include "runtime/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "util/error.h"

namespace hymba {

std::vector<PerplexityWindow> perplexity_windows(int64_t n, int64_t ctx, int64_t stride) {
  check(n >= 2, "perplexity needs at least 2 tokens (got ", n, ")");
  check(ctx >= 2, "perplexity: the context must be at least 2 tokens (got ", ctx, ")");
  check(stride >= 1 && stride < ctx, "perplexity: the stride must be in [1, ctx - 1] = [1, ", ctx - 1,
        "] (got ", stride, ")");
  std::vector<PerplexityWindow> out;
  int64_t prev_end = 0;
  for (int64_t b = 0;; b += stride) {
    const int64_t e = std::min(b + ctx, n);
    out.push_back({b, e, std::max(prev_end, b + 1)});
    if (e == n) break;
    prev_end = e;
  }
  return out;
}

PerplexityResult compute_perplexity(HymbaModel& model, const std::vector<int32_t>& ids, int64_t ctx,
                                    int64_t stride, const std::function<void(int64_t, int64_t)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t n = int64_t(ids.size());
  const auto wins = perplexity_windows(n, ctx, stride);
  const int64_t V = model.vocab_size();
  for (int32_t id : ids)
    check(id >= 0 && id < V, "perplexity: token id ", id, " is out of range for vocabulary of size ", V);
  std::vector<float> logits;
  double nll = 0;
  PerplexityResult r;
  r.tokens = n;
  r.windows = int64_t(wins.size());
  for (size_t w = 0; w < wins.size(); ++w) {
    const auto& win = wins[w];
    const int64_t len = win.end - win.begin;
    logits.resize(size_t(len * V));
    auto seq = model.new_sequence(len);
    model.forward(*seq, ids.data() + win.begin, len, logits.data(), /*all_positions=*/true);
    r.tokens_forwarded += len;
    for (int64_t t = win.first_scored; t < win.end; ++t) {
      const float* row = logits.data() + size_t((t - 1 - win.begin) * V);  // row r predicts token begin + r + 1
      double mx = row[0];
      for (int64_t v = 1; v < V; ++v) mx = std::max(mx, double(row[v]));
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
      nll += mx + std::log(sum) - double(row[ids[size_t(t)]]);
      ++r.scored;
    }
    if (progress) progress(int64_t(w + 1), r.windows);
  }
  check(r.scored == n - 1, "perplexity: internal error (", r.scored, " tokens scored of ", n - 1, ")");
  r.loss = nll / double(r.scored);
  r.perplexity = std::exp(r.loss);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace hymba
