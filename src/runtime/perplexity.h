// Perplexity of a token sequence by sliding-window evaluation.
//
// Definition (the training script train/train.py evaluates the same way, so the
// numbers are comparable): tokens x_0..x_{n-1} (for a text file: BOS +
// SentencePiece(text)). Windows start at 0, S, 2S, ... (S = stride); window
// [b, e) with e = min(b + N, n) (N = ctx) runs as a fresh sequence (the meta
// tokens, then x_b..x_{e-1}) and scores every x_t with t in
// [max(prev_e, b + 1), e), where prev_e is the previous window's end (0 for
// the first); the last window is the first one with e = n. So every token but
// x_0 is scored exactly once, with at least N - S tokens of context once the
// first window is past. loss = mean over scored t of -ln p(x_t | x_b..x_{t-1}),
// perplexity = exp(loss).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "model/hymba_model.h"

namespace hymba {

struct PerplexityWindow {
  int64_t begin = 0;        // first token of the window
  int64_t end = 0;          // one past the last token
  int64_t first_scored = 0; // first target position scored in this window
};

// The windows of the definition above; throws hymba::Error unless n >= 2,
// ctx >= 2 and 1 <= stride <= ctx - 1 (windows must overlap: with stride = ctx
// the first token of each window would have no prediction).
std::vector<PerplexityWindow> perplexity_windows(int64_t n, int64_t ctx, int64_t stride);

struct PerplexityResult {
  double loss = 0;            // mean negative log-likelihood (nats per token)
  double perplexity = 0;      // exp(loss)
  int64_t tokens = 0;         // n
  int64_t scored = 0;         // n - 1
  int64_t windows = 0;
  int64_t tokens_forwarded = 0;
  double seconds = 0;
};

// Runs the evaluation. `progress(done_windows, total_windows)` is called after
// each window when given. Log-probabilities are accumulated in double.
PerplexityResult compute_perplexity(HymbaModel& model, const std::vector<int32_t>& ids, int64_t ctx,
                                    int64_t stride,
                                    const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace hymba
