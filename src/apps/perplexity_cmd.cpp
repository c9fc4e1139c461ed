#include "apps/perplexity_cmd.h"

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "apps/cli_util.h"
#include "backend/backend.h"
#include "io/tokenizer.h"
#include "model/hymba_model.h"
#include "runtime/perplexity.h"
#include "util/error.h"

namespace hymba::cli {
namespace {

struct PerplexityArgs {
  std::string dir, file, ids, cache_type;
  int64_t ctx = 512;
  int64_t stride = 0;  // 0: ctx / 2
  int threads = 0;
  int64_t chunk = 256;
  bool no_bos = false, json = false, progress = false;
};

int run_perplexity(const PerplexityArgs& a) {
  check(a.file.empty() != a.ids.empty(), "give exactly one of -f/--file or --ids");
  const int64_t stride = a.stride > 0 ? a.stride : std::max<int64_t>(1, a.ctx / 2);
  check(a.ctx >= 2, "--ctx must be at least 2 (got ", a.ctx, ")");
  check(stride < a.ctx, "--stride must be smaller than --ctx (got stride ", stride, ", ctx ", a.ctx, ")");
  std::vector<int32_t> ids;
  if (!a.ids.empty()) {
    ids = parse_ids(a.ids);
  } else {
    check(std::filesystem::exists(std::filesystem::path(a.dir) / "tokenizer.model"), "'", a.dir,
          "' has no tokenizer.model: give the tokens as --ids");
    const std::string text = read_file(a.file);  // before the model loads: fail fast
    ids = Tokenizer::load(a.dir).encode(text, !a.no_bos);
  }
  check(ids.size() >= 2, "perplexity needs at least 2 tokens; the input has ", ids.size());
  if (a.threads > 0) set_cpu_threads(a.threads);
  ModelOptions o;
  if (!a.cache_type.empty()) o.kv_dtype = parse_dtype(a.cache_type);
  o.max_chunk = a.chunk;
  auto model = HymbaModel::load(a.dir, o);
  std::function<void(int64_t, int64_t)> progress;
  if (a.progress)
    progress = [](int64_t done, int64_t total) { std::fprintf(stderr, "\rwindow %" PRId64 "/%" PRId64, done, total); };
  const PerplexityResult r = compute_perplexity(*model, ids, a.ctx, stride, progress);
  if (a.progress) std::fprintf(stderr, "\n");
  if (a.json) {
    nlohmann::json j = {{"perplexity", r.perplexity}, {"loss", r.loss},         {"tokens", r.tokens},
                        {"scored", r.scored},         {"windows", r.windows},   {"ctx", a.ctx},
                        {"stride", stride},           {"bos", !a.no_bos && a.ids.empty()},
                        {"tokens_forwarded", r.tokens_forwarded}, {"seconds", r.seconds}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("perplexity %.6f  (loss %.6f nats/token over %" PRId64 " tokens; %" PRId64
                " windows of ctx %" PRId64 ", stride %" PRId64 ")\n",
                r.perplexity, r.loss, r.scored, r.windows, a.ctx, stride);
    std::fprintf(stderr, "[%" PRId64 " tokens forwarded in %.2f s, %.0f tok/s]\n", r.tokens_forwarded, r.seconds,
                 r.seconds > 0 ? double(r.tokens_forwarded) / r.seconds : 0.0);
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace

void add_perplexity_command(CLI::App& app) {
  auto args = std::make_shared<PerplexityArgs>();
  auto* p = app.add_subcommand(
      "perplexity",
      "perplexity of a text file by sliding-window evaluation: BOS + the file's tokens; windows of --ctx "
      "tokens every --stride tokens, each a fresh sequence, each scoring the tokens no earlier window "
      "scored; prints exp(mean negative log-likelihood)");
  p->add_option("-m,--model", args->dir, "model directory (HF layout)")->required();
  p->add_option("-f,--file", args->file, "text file to evaluate");
  p->add_option("--ids", args->ids, "evaluate these token ids (comma-separated) instead of a file");
  p->add_option("--ctx", args->ctx, "window length in tokens (default 512)")->check(CLI::Range(int64_t(2), int64_t(1) << 24));
  p->add_option("--stride", args->stride, "distance between window starts (default ctx/2; must be < ctx)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 24));
  p->add_flag("--no-bos", args->no_bos, "do not put BOS in front of the file's tokens");
  p->add_flag("--json", args->json, "print the result as JSON");
  p->add_flag("--progress", args->progress, "print window progress to stderr");
  p->add_option("-t,--threads", args->threads, "CPU threads (default: all cores)")->check(CLI::Range(1, 1024));
  p->add_option("--cache-type", args->cache_type,
                "K/V cache element type: f32, bf16, f16 (default: f32 for fp32 checkpoints, else bf16)")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  p->add_option("--chunk", args->chunk, "prefill chunk size in tokens")->check(CLI::Range(int64_t(1), int64_t(65536)));
  p->callback([args] {
    int rc = 1;
    try {
      rc = run_perplexity(*args);
    } catch (const hymba::Error& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
    }
    throw CLI::RuntimeError(rc);
  });
}

}  // namespace hymba::cli
