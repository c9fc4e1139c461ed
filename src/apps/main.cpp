// `hymba`: the command-line front end. Subcommands: generate, chat, template,
// logits, init, info, tokenize, bench. Errors go to stderr with exit status 1.
#include <omp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <random>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "apps/cli_util.h"
#include "backend/backend.h"
#include "backend/cpu/matmul.h"
#include "backend/profiling.h"
#include "io/config.h"
#include "io/tokenizer.h"
#include "model/hymba_model.h"
#include "model/presets.h"
#include "model/weights.h"
#include "runtime/chat_session.h"
#include "runtime/chat_template.h"
#include "runtime/generator.h"
#include "runtime/perplexity.h"
#include "util/error.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace hymba::cli {
namespace {

// Options shared by the commands that load a model.
struct ModelArgs {
  std::string dir;
  int threads = 0;
  std::string cache_type;  // "", f32, bf16, f16
  bool hf_decode_window = false;
  int64_t chunk = 0;
  std::string device = "auto";
  bool profile = false;
  bool huge_pages = false;

  void add_to(CLI::App* app) {
    app->add_option("-m,--model", dir, "model directory (HF layout: config.json, *.safetensors)")->required();
    app->add_option("-t,--threads", threads, "CPU threads (default: all cores)")->check(CLI::Range(1, 1024));
    app->add_option("--cache-type", cache_type, "K/V cache element type: f32, bf16, f16 (default: f32 for fp32 "
                    "checkpoints, else bf16)")->check(CLI::IsMember({"f32", "bf16", "f16"}));
    app->add_flag("--hf-decode-window", hf_decode_window,
                  "during decode use the reference's window of (window-1) past tokens instead of the training rule "
                  "q-k <= window (spec 8.1)");
    app->add_option("--chunk", chunk, "prefill chunk size in tokens (bounds working memory; default: 256 on the CPU, 8192 "
                    "on a GPU)")->check(CLI::Range(1, 65536));
    app->add_option("--device", device, "compute device: cpu, cuda, or auto (cuda when this build has it and a GPU "
                    "is visible, else cpu)")->check(CLI::IsMember({"cpu", "cuda", "auto"}));
    app->add_flag("--profile", profile, "time every op and print a table to stderr at the end");
    app->add_flag("--hugepages", huge_pages, "copy the weights into transparent huge pages instead of mapping the "
                  "file (faster decode where THP is available; one copy at load)");
  }
  std::unique_ptr<HymbaModel> load() const {
    if (threads > 0) set_cpu_threads(threads);
    ModelOptions o;
    if (!cache_type.empty()) o.kv_dtype = parse_dtype(cache_type);
    o.hf_decode_window = hf_decode_window;
    o.max_chunk = chunk;
    o.profile = profile;
    o.huge_pages = huge_pages;
    o.device = device;
    // One line while loading (with progress where copying weights takes
    // time, on a terminal), one summary line when done; both on stderr.
    const bool tty = isatty(fileno(stderr));
    if (tty) {
      o.progress = [](const char* stage, double f) {
        std::fprintf(stderr, "\rloading %s %3d%%", stage, int(f * 100));
        std::fflush(stderr);
      };
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto model = HymbaModel::load(dir, o);
    if (tty) std::fprintf(stderr, "\r\033[K");
    const HymbaConfig& c = model->config();
    int n_global = 0, n_consumers = 0;
    for (const LayerPlan& l : model->plan().layers) n_global += l.global, n_consumers += !l.owns_kv;
    std::fprintf(stderr, "loaded %s: %.1fM params, %s weights, %d layers (%d global, %d sharing K/V), %" PRId64
                 " meta tokens, on %s in %.1f s\n",
                 dir.c_str(), double(parameter_count(c, model->plan())) / 1e6,
                 dtype_name(model->weights().matrix_dtype), int(c.num_hidden_layers), n_global, n_consumers,
                 int64_t(c.num_memory_tokens), model->backend().name().c_str(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return model;
  }
};

bool has_tokenizer(const std::string& dir) { return fs::exists(fs::path(dir) / "tokenizer.model"); }

// Sampling options shared by generate and chat.
void add_sampling_options(CLI::App* app, SamplingParams& s) {
  app->add_option("--temp", s.temperature, "sampling temperature; 0 = greedy");
  app->add_option("--top-k", s.top_k, "keep the k most likely tokens; 0 = off");
  app->add_option("--top-p", s.top_p, "nucleus sampling threshold in (0, 1]; 1 = off");
  app->add_option("--min-p", s.min_p, "drop tokens below min-p x the top probability; 0 = off");
  app->add_option("--repeat-penalty", s.repeat_penalty, "repetition penalty; 1 = off");
  app->add_option("--repeat-last-n", s.repeat_last_n, "tokens of history the penalty looks at (-1 = all)");
}

void write_stdout(const std::string& text) {
  if (text.empty()) return;
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

// ------------------------------------------------------------------ generate
struct GenerateArgs {
  ModelArgs model;
  std::string prompt, ids, prompt_file;
  int n = 128;
  SamplingParams sampling;
  uint64_t seed = 42;
  bool print_ids = false, no_bos = false, ignore_eos = false;
  int64_t ctx = 0;
  std::vector<std::string> stop;
  // --chat: the prompt is one user message in the checkpoint's chat format.
  bool chat = false;
  std::string system, chat_format = "auto";
  bool system_given = false;
};

int run_generate(const GenerateArgs& a) {
  check(int(!a.prompt.empty()) + int(!a.ids.empty()) + int(!a.prompt_file.empty()) == 1,
        "give exactly one of -p/--prompt, -f/--file or --ids");
  check(!a.chat || a.ids.empty(), "--chat needs the user message as text (-p/--prompt or -f/--file), not --ids");
  check(a.chat || !a.system_given, "--system needs --chat");
  check(a.chat || a.chat_format == "auto", "--chat-format needs --chat");
  GenerationRequest req;
  req.max_new_tokens = a.n;
  req.sampling = a.sampling;
  req.sampling.seed = a.seed;
  req.stop_strings = a.stop;
  req.ignore_eos = a.ignore_eos;
  req.context = a.ctx;
  validate_sampling(req.sampling);  // before the model loads: fail fast on bad options
  std::unique_ptr<ChatTemplate> tmpl;
  if (a.chat) {  // also before the model loads
    check(has_tokenizer(a.model.dir), "'", a.model.dir, "' has no tokenizer.model: --chat needs the tokenizer");
    tmpl = std::make_unique<ChatTemplate>(ChatTemplate::load(a.model.dir, a.chat_format));
  }
  auto model = a.model.load();
  std::unique_ptr<Tokenizer> tok;
  if (has_tokenizer(a.model.dir)) tok = std::make_unique<Tokenizer>(Tokenizer::load(a.model.dir));
  if (!a.ids.empty()) {
    req.prompt = parse_ids(a.ids);
  } else {
    check(tok != nullptr, "'", a.model.dir, "' has no tokenizer.model: give the prompt as --ids");
    const std::string text = a.prompt_file.empty() ? a.prompt : read_file(a.prompt_file);
    if (a.chat) {
      Conversation conv;
      if (a.system_given) conv.add_message("system", a.system);
      conv.add_message("user", text);
      conv.add_generation_prompt = true;
      req.prompt = tok->encode(tmpl->render(conv), /*add_bos=*/false);  // the chat path has no BOS
      req.stop_strings.push_back("</s>");
    } else {
      req.prompt = tok->encode(text, !a.no_bos);
    }
  }

  Generator gen(*model, tok.get());
  auto res = gen.generate(req, [&](int32_t, const std::string& text) {
    write_stdout(text);
    return true;
  });
  if (tok) std::printf("\n");
  if (a.print_ids || !tok) std::printf("%s\n", join_ids(res.tokens).c_str());
  std::fflush(stdout);
  const double prefill_tps = res.prefill_seconds > 0 ? double(res.prompt_tokens) / res.prefill_seconds : 0;
  const double decode_tps =
      res.decode_seconds > 0 && res.tokens.size() > 1 ? double(res.tokens.size() - 1) / res.decode_seconds : 0;
  if (a.model.profile) std::fprintf(stderr, "%s", profile_report(model->backend()).c_str());
  std::fprintf(stderr, "[prompt %" PRId64 " tok, %.1f tok/s | generated %zu tok, %.1f tok/s | stop: %s]\n",
               res.prompt_tokens, prefill_tps, res.tokens.size(), decode_tps, res.stop_reason.c_str());
  return 0;
}

// ------------------------------------------------------------------ chat
// Ctrl-C: while an answer is being produced it stops the answer (a second
// Ctrl-C before the answer has stopped quits); at the prompt it quits.
std::atomic<bool> g_generating{false};
std::atomic<bool> g_cancel{false};

extern "C" void on_sigint(int) {
  if (g_generating.load() && !g_cancel.load()) {
    g_cancel.store(true);
    return;
  }
  const char nl = '\n';
  [[maybe_unused]] ssize_t w = ::write(STDOUT_FILENO, &nl, 1);
  _exit(130);
}

struct ChatArgs {
  ModelArgs model;
  std::string system, chat_format = "auto";
  bool system_given = false;
  int n = 512;
  SamplingParams sampling;
  uint64_t seed = 42;
  int64_t ctx = 0;
  std::vector<std::string> stop;
  bool ignore_eos = false, print_ids = false, stats = false;
};

const char* kChatHelp =
    "commands: /reset (forget the conversation, keep the system prompt), /exit or /quit (leave; so does Ctrl-D),\n"
    "          /help. A line ending in '\\' continues on the next line. Ctrl-C stops the current answer\n"
    "          (it stays in the history); Ctrl-C at the prompt quits.\n";

// Reads one message: lines ending in a backslash continue. False at EOF.
bool read_message(bool tty, std::string& msg) {
  msg.clear();
  std::string line;
  bool first = true;
  while (true) {
    if (tty) {
      std::fputs(first ? "> " : ". ", stdout);
      std::fflush(stdout);
    }
    if (!std::getline(std::cin, line)) return !first;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    first = false;
    if (!line.empty() && line.back() == '\\') {
      line.pop_back();
      msg += line + "\n";
      continue;
    }
    msg += line;
    return true;
  }
}

int run_chat(const ChatArgs& a) {
  ChatOptions opts;
  opts.system = a.system;
  opts.has_system = a.system_given;
  opts.max_new_tokens = a.n;
  opts.sampling = a.sampling;
  opts.sampling.seed = a.seed;
  opts.stop_strings.insert(opts.stop_strings.end(), a.stop.begin(), a.stop.end());
  opts.ignore_eos = a.ignore_eos;
  opts.context = a.ctx;
  validate_sampling(opts.sampling);
  check(has_tokenizer(a.model.dir), "'", a.model.dir, "' has no tokenizer.model: chat needs the tokenizer");
  ChatTemplate tmpl = ChatTemplate::load(a.model.dir, a.chat_format);
  Tokenizer tok = Tokenizer::load(a.model.dir);
  auto model = a.model.load();
  ChatSession session(*model, tok, tmpl, opts);

  struct sigaction sa{};
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);

  const bool tty = ::isatty(STDIN_FILENO) != 0;
  if (tty)
    std::fprintf(stderr, "hymba chat: %s, context %" PRId64 " tokens, template from %s\n%s", a.model.dir.c_str(),
                 session.context(), tmpl.source().c_str(), kChatHelp);
  std::string msg;
  while (read_message(tty, msg)) {
    const std::string cmd = python_strip(msg);
    if (cmd.empty()) continue;
    if (cmd == "/exit" || cmd == "/quit") break;
    if (cmd == "/help") {
      std::fputs(kChatHelp, stderr);
      continue;
    }
    if (cmd == "/reset") {
      session.reset();
      std::fprintf(stderr, "[conversation cleared]\n");
      continue;
    }
    g_cancel.store(false);
    g_generating.store(true);
    ChatTurn turn;
    try {
      turn = session.send(msg, [&](int32_t, const std::string& text) {
        write_stdout(text);
        return !g_cancel.load();
      });
    } catch (const hymba::Error& e) {
      g_generating.store(false);
      std::fprintf(stderr, "error: %s\n", e.what());
      continue;
    }
    g_generating.store(false);
    write_stdout("\n");
    if (turn.gen.stop_reason == "cancelled") std::fprintf(stderr, "[answer stopped]\n");
    if (turn.gen.stop_reason == "context")
      std::fprintf(stderr, "[the context is full: /reset to start over, or give a larger --ctx]\n");
    if (a.print_ids) write_stdout(join_ids(turn.gen.tokens) + "\n");
    if (a.stats) {
      const auto& g = turn.gen;
      const double prefill_tps = g.prefill_seconds > 0 ? double(turn.prefilled_tokens) / g.prefill_seconds : 0;
      const double decode_tps =
          g.decode_seconds > 0 && g.tokens.size() > 1 ? double(g.tokens.size() - 1) / g.decode_seconds : 0;
      std::fprintf(stderr,
                   "[turn %d: conversation %" PRId64 " tok, reused %" PRId64 ", prefilled %" PRId64
                   " (%s), %.1f tok/s | answer %zu tok, %.1f tok/s | stop: %s]\n",
                   session.turns(), turn.conversation_tokens, turn.reused_tokens, turn.prefilled_tokens,
                   turn.cache_path.c_str(), prefill_tps, g.tokens.size(), decode_tps, g.stop_reason.c_str());
    }
  }
  if (tty) write_stdout("\n");
  return 0;
}

// ------------------------------------------------------------------ template
int run_template(const std::string& dir, const std::string& file, const std::string& format, bool print_ids) {
  const ChatTemplate tmpl = ChatTemplate::load(dir, format);
  const std::string text = file == "-" ? std::string(std::istreambuf_iterator<char>(std::cin), {}) : read_file(file);
  const Conversation conv = Conversation::from_json_text(text, file == "-" ? "stdin" : "'" + file + "'");
  std::vector<std::string> warnings;
  const std::string out = tmpl.render(conv, &warnings);
  for (const auto& w : warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  if (print_ids) {
    check(has_tokenizer(dir), "'", dir, "' has no tokenizer.model: --ids needs the tokenizer");
    write_stdout(join_ids(Tokenizer::load(dir).encode(out, /*add_bos=*/false)) + "\n");
  } else {
    write_stdout(out);
  }
  return 0;
}

// ------------------------------------------------------------------ logits
int run_logits(const ModelArgs& m, const std::string& ids_s, bool all_positions) {
  auto model = m.load();
  auto ids = parse_ids(ids_s);
  const int64_t n = int64_t(ids.size()), V = model->vocab_size();
  auto seq = model->new_sequence(n);
  std::vector<float> logits(size_t((all_positions ? n : 1) * V));
  model->forward(*seq, ids.data(), n, logits.data(), all_positions);
  std::string out = "{\"logits\": [";
  char buf[32];
  for (int64_t r = 0; r < (all_positions ? n : 1); ++r) {
    out += r ? ", [" : "[";
    for (int64_t v = 0; v < V; ++v) {
      std::snprintf(buf, sizeof buf, v ? ", %.9g" : "%.9g", double(logits[size_t(r * V + v)]));
      out += buf;
    }
    out += "]";
  }
  out += "]}\n";
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}

// ------------------------------------------------------------------ init
int run_init(const std::string& preset, const std::string& dtype, uint64_t seed, const std::string& out,
             bool config_only) {
  const HymbaConfig c = preset_config(preset);
  if (config_only) {
    write_config(c, parse_dtype(dtype), out);
    std::fprintf(stderr, "wrote %s/config.json (preset %s)\n", out.c_str(), preset.c_str());
    return 0;
  }
  const auto t0 = std::chrono::steady_clock::now();
  write_random_checkpoint(c, parse_dtype(dtype), seed, out);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "wrote %s (preset %s, %s, %" PRId64 " parameters) in %.1f s\n", out.c_str(), preset.c_str(),
               dtype.c_str(), parameter_count(c, ModelPlan::build(c)), s);
  return 0;
}

// ------------------------------------------------------------------ info
json cache_json(const CacheBytes& b) {
  return {{"global_kv", b.global_kv}, {"sliding_kv", b.sliding_kv}, {"ssm", b.ssm}, {"conv", b.conv},
          {"total", b.total()}};
}

DType default_cache_dtype(const HymbaConfig& c) {
  return c.torch_dtype == "float32" ? DType::F32 : (c.torch_dtype == "float16" ? DType::F16 : DType::BF16);
}

int run_info(const std::string& dir, int64_t ctx, bool as_json, const std::string& cache_type) {
  const HymbaConfig c = HymbaConfig::load((fs::path(dir) / "config.json").string());
  const ModelPlan plan = ModelPlan::build(c);
  const DType kv = cache_type.empty() ? default_cache_dtype(c) : parse_dtype(cache_type);
  const CacheLayout layout = CacheLayout::build(c, plan, kv);
  if (ctx <= 0) ctx = c.max_position_embeddings;
  const CacheBytes at_ctx = layout.bytes(ctx);
  const CacheBytes at_0 = layout.bytes(0);
  const int64_t params = parameter_count(c, plan);
  json layers = json::array();
  for (const auto& l : plan.layers)
    layers.push_back({{"index", l.index}, {"attention", l.global ? "global" : "sliding"}, {"role", l.role()},
                      {"kv_layer", l.kv_layer}});
  if (as_json) {
    json j = {{"params", params},
              {"layers", layers},
              {"ctx", ctx},
              {"cache_dtype", dtype_name(kv)},
              {"cache_bytes", cache_json(at_ctx)},
              // Bytes one more token adds at this length (only global layers
              // grow once the sliding windows are full).
              {"cache_growth_per_token", layout.bytes(ctx + 1).total() - at_ctx.total()},
              {"cache_bytes_empty", at_0.total()}};
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::printf("model: %s\nparameters: %" PRId64 " (%.3f B)\n", dir.c_str(), params, double(params) / 1e9);
  std::printf("hidden %" PRId64 ", layers %d, heads %d (kv %d), head dim q/k %" PRId64 " v %" PRId64
              ", d_inner %" PRId64 ", d_state %d, meta tokens %" PRId64 ", window %s\n",
              c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim_qk,
              c.head_dim_v, c.d_inner, c.mamba_d_state, c.num_memory_tokens,
              c.sliding_window ? std::to_string(*c.sliding_window).c_str() : "none");
  std::printf("layer plan:\n");
  for (const auto& l : plan.layers) {
    std::printf("  %2d  %-7s %-16s", l.index, l.global ? "global" : "sliding", l.role().c_str());
    if (!l.owns_kv) std::printf(" reads K/V of layer %d", l.kv_layer);
    std::printf("\n");
  }
  std::printf("cache (%s K/V, fp32 SSM and conv state) for one sequence of %" PRId64 " tokens:\n", dtype_name(kv), ctx);
  std::printf("  global K/V   %14" PRId64 " B  %s\n", at_ctx.global_kv, human_bytes(at_ctx.global_kv).c_str());
  std::printf("  sliding K/V  %14" PRId64 " B  %s\n", at_ctx.sliding_kv, human_bytes(at_ctx.sliding_kv).c_str());
  std::printf("  SSM state    %14" PRId64 " B  %s\n", at_ctx.ssm, human_bytes(at_ctx.ssm).c_str());
  std::printf("  conv state   %14" PRId64 " B  %s\n", at_ctx.conv, human_bytes(at_ctx.conv).c_str());
  std::printf("  total        %14" PRId64 " B  %s\n", at_ctx.total(), human_bytes(at_ctx.total()).c_str());
  std::printf("  growth per token (once the windows are full): %" PRId64 " B\n",
              layout.bytes(ctx + 1).total() - at_ctx.total());
  return 0;
}

// ------------------------------------------------------------------ tokenize
int run_tokenize(const std::string& dir, const std::string& text, const std::string& file, bool no_bos) {
  check(text.empty() != file.empty(), "give exactly one of -p/--prompt or -f/--file");
  Tokenizer tok = Tokenizer::load(dir);
  const auto ids = tok.encode(file.empty() ? text : read_file(file), !no_bos);
  std::printf("%s\n", join_ids(ids).c_str());
  return 0;
}

// ------------------------------------------------------------------ perplexity
struct PerplexityArgs {
  std::string file, ids;
  int64_t ctx = 512;
  int64_t stride = 0;  // 0: ctx / 2
  bool no_bos = false, json = false, progress = false;
};

int run_perplexity(const ModelArgs& m, const PerplexityArgs& a) {
  check(a.file.empty() != a.ids.empty(), "give exactly one of -f/--file or --ids");
  const int64_t stride = a.stride > 0 ? a.stride : std::max<int64_t>(1, a.ctx / 2);
  check(a.ctx >= 2, "--ctx must be at least 2 (got ", a.ctx, ")");
  check(stride < a.ctx, "--stride must be smaller than --ctx (got stride ", stride, ", ctx ", a.ctx, ")");
  std::vector<int32_t> ids;
  if (!a.ids.empty()) {
    ids = parse_ids(a.ids);
  } else {
    check(has_tokenizer(m.dir), "'", m.dir, "' has no tokenizer.model: give the tokens as --ids");
    const std::string text = read_file(a.file);  // before the model loads: fail fast
    ids = Tokenizer::load(m.dir).encode(text, !a.no_bos);
  }
  check(ids.size() >= 2, "perplexity needs at least 2 tokens; the input has ", ids.size());
  auto model = m.load();
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


// ------------------------------------------------------------------ bench
struct BenchArgs {
  int64_t prompt_len = 512;
  int gen_len = 64;
  int64_t batch = 1;
  std::string batch_fill = "prefill";
  bool as_json = false;
  uint64_t seed = 0;
  bool warmup = true;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Prefill one random prompt (or `batch` of them), then decode gen_len greedy
// steps: one sequence with forward_sample(), a batch with
// forward_batch_sample() (all sequences step together; tokens are picked on
// the device, as generation does). With --batch-fill replicate only the first
// prompt is prefilled and its cache copied into the other sequences: decode
// cost does not depend on the values, and prefilling 128 long prompts can
// take longer than the measurement itself.
int run_bench(const ModelArgs& m, const BenchArgs& b) {
  check(b.prompt_len >= 1, "--prompt-len must be >= 1");
  check(b.gen_len >= 1, "--gen-len must be >= 1");
  check(b.batch >= 1, "--batch must be >= 1");
  const auto t_load = std::chrono::steady_clock::now();
  auto model = m.load();
  const double load_s = seconds_since(t_load);
  const HymbaConfig& c = model->config();
  const int64_t V = c.vocab_size;
  std::mt19937_64 rng(b.seed);
  auto random_prompt = [&] {
    std::vector<int32_t> prompt(static_cast<size_t>(b.prompt_len));
    for (auto& id : prompt) id = int32_t(3 + rng() % uint64_t(std::max<int64_t>(V - 4, 1)));
    return prompt;
  };
  std::vector<std::unique_ptr<SequenceCache>> seqs;
  for (int64_t i = 0; i < b.batch; ++i) seqs.push_back(model->new_sequence(b.prompt_len + b.gen_len));
  const std::vector<SampleArgs> greedy(size_t(b.batch));  // temperature 0
  if (b.warmup) {
    // Untimed: one chunk-sized prefill and a few decode steps on a throwaway
    // sequence, so one-time costs (GPU module loading, matmul plans, decode
    // recordings) stay out of the numbers. A batch's first step is not timed
    // either (below).
    const int64_t n = std::min(b.prompt_len, model->options().max_chunk);
    auto warm = model->new_sequence(n + 4);
    std::vector<int32_t> ids = random_prompt();
    ids.resize(size_t(n));
    int32_t t = model->forward_sample(*warm, ids.data(), n, SampleArgs{});
    for (int i = 0; i < 4; ++i) t = model->forward_sample(*warm, &t, 1, SampleArgs{}, /*decode=*/true);
    model->backend().synchronize();
  }
  profile_reset(model->backend());  // the meta prefix ran at load: not part of the prompt
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> first_prompt = random_prompt();
  std::vector<int32_t> next(size_t(b.batch)), picked(size_t(b.batch));
  next[0] = model->forward_sample(*seqs[0], first_prompt.data(), b.prompt_len, greedy[0]);
  const double prefill_s = seconds_since(t0);  // the first token's pick included: it is what the user waits for
  const double ttft_s = prefill_s;
  const auto t_fill = std::chrono::steady_clock::now();
  for (int64_t i = 1; i < b.batch; ++i) {
    if (b.batch_fill == "replicate") {
      seqs[size_t(i)]->copy_from(*seqs[0]);
      next[size_t(i)] = next[0];
    } else {
      const std::vector<int32_t> p = random_prompt();
      next[size_t(i)] = model->forward_sample(*seqs[size_t(i)], p.data(), b.prompt_len, greedy[0]);
    }
  }
  model->backend().synchronize();
  const double fill_s = seconds_since(t_fill);
  if (m.profile) {
    std::fprintf(stderr, "--- prefill of %" PRId64 " tokens\n%s", b.prompt_len,
                 profile_report(model->backend()).c_str());
    profile_reset(model->backend());
  }
  std::vector<SequenceCache*> ptrs;
  for (auto& sq : seqs) ptrs.push_back(sq.get());
  auto t1 = std::chrono::steady_clock::now();
  int timed_steps = b.gen_len;
  // Each step ends when its picked tokens reach the host, so the time
  // between the ends of two steps is that step's (its spread tells a slow
  // run from a few slow steps).
  std::vector<double> step_ms;
  auto t_step = t1;
  for (int step = 0; step < b.gen_len; ++step) {
    if (step == 1 && b.batch > 1 && b.warmup && b.gen_len > 1) {  // the batch's first step was its warm-up
      model->backend().synchronize();
      t1 = std::chrono::steady_clock::now();
      t_step = t1;
      step_ms.clear();
      timed_steps = b.gen_len - 1;
    }
    if (b.batch == 1) {
      next[0] = model->forward_sample(*seqs[0], next.data(), 1, greedy[0], /*decode=*/true);
    } else {
      model->forward_batch_sample(ptrs.data(), next.data(), b.batch, greedy.data(), picked.data());
      next.swap(picked);
    }
    step_ms.push_back(seconds_since(t_step) * 1e3);
    t_step = std::chrono::steady_clock::now();
  }
  const double decode_s = seconds_since(t1);
  std::sort(step_ms.begin(), step_ms.end());
  // The q-quantile of the timed steps (nearest rank; 0 without steps).
  auto step_quantile = [&](double q) {
    if (step_ms.empty()) return 0.0;
    const size_t i = size_t(std::ceil(q * double(step_ms.size())));
    return step_ms[std::min(step_ms.size() - 1, i == 0 ? 0 : i - 1)];
  };

  // Bytes of weights a decode step streams: every matrix once, the tied
  // embedding once (as the LM head); small vectors are negligible.
  int64_t weight_bytes = 0;
  const auto& w = model->weights();
  auto mb = [](const MatrixView& mv) { return mv.rows * mv.cols * int64_t(dtype_size(mv.dtype)); };
  for (const auto& l : w.layers)
    weight_bytes += mb(l.in_proj) + mb(l.x_proj) + mb(l.dt_proj) + mb(l.out_proj) + mb(l.gate_proj) +
                    mb(l.up_proj) + mb(l.down_proj);
  weight_bytes += mb(w.lm_head);
  CacheBytes cache;  // summed over the batch
  for (const auto& sq : seqs) {
    const CacheBytes one = sq->allocated_bytes();
    cache.global_kv += one.global_kv, cache.sliding_kv += one.sliding_kv, cache.ssm += one.ssm,
        cache.conv += one.conv;
  }
  const int64_t formula = b.batch * model->cache_layout().bytes(b.prompt_len + b.gen_len).total();
  if (m.profile)
    std::fprintf(stderr, "--- decode of %d steps\n%s", b.gen_len, profile_report(model->backend()).c_str());
  const double prefill_tps = double(b.prompt_len) / prefill_s;
  const double step_s = decode_s / timed_steps;
  const double decode_tps = double(b.batch) / step_s;  // tokens of all sequences
  // A decode step reads every weight once and, at most, each sequence's whole
  // cache (K/V of the positions in use, SSM and conv state): an upper bound
  // of the bytes a step must move.
  const double bytes_per_step = double(weight_bytes) + double(cache.total());
  const int64_t rss = peak_rss_bytes();
  if (b.as_json) {
    json j = {{"device", model->backend().name()},
              {"prefill_tok_s", prefill_tps},
              {"decode_tok_s", decode_tps},
              {"decode_step_ms", step_s * 1e3},
              {"decode_step_ms_min", step_quantile(0.0)},
              {"decode_step_ms_median", step_quantile(0.5)},
              {"decode_step_ms_p90", step_quantile(0.9)},
              {"decode_step_ms_max", step_quantile(1.0)},
              {"ttft_ms", ttft_s * 1e3},
              {"peak_rss_bytes", rss},
              {"cache_bytes", cache_json(cache)},
              {"cache_bytes_formula", formula},
              {"prompt_len", b.prompt_len},
              {"gen_len", b.gen_len},
              {"batch", b.batch},
              {"batch_fill", b.batch_fill},
              {"batch_fill_s", fill_s},
              {"warmup", b.warmup},
              {"timed_decode_steps", timed_steps},
              {"threads", cpu_threads()},
              {"matmul_isa", cpu::matmul_isa()},
              {"weights_dtype", dtype_name(w.matrix_dtype)},
              {"cache_dtype", dtype_name(model->cache_layout().kv_dtype)},
              {"weight_bytes_per_token", weight_bytes},
              {"bytes_per_step_upper", bytes_per_step},
              {"decode_effective_gb_s", double(weight_bytes) / step_s / 1e9},
              {"load_s", load_s}};
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::printf("model %s (%s weights, %s cache) on %s, %d CPU threads, matmul %s\n", m.dir.c_str(),
              dtype_name(w.matrix_dtype), dtype_name(model->cache_layout().kv_dtype),
              model->backend().name().c_str(), cpu_threads(), cpu::matmul_isa());
  std::printf("load            %8.2f s\n", load_s);
  std::printf("prefill  %5" PRId64 " tok %8.2f tok/s  (%.2f s)\n", b.prompt_len, prefill_tps, prefill_s);
  std::printf("ttft            %8.1f ms\n", ttft_s * 1e3);
  if (b.batch > 1)
    std::printf("batch    %5" PRId64 " seq  filled by %s in %.2f s\n", b.batch, b.batch_fill.c_str(), fill_s);
  std::printf("decode   %5d steps %8.2f tok/s  (%.2f ms/step, %.1f GB/s of weights)\n", b.gen_len, decode_tps,
              step_s * 1e3, double(weight_bytes) / step_s / 1e9);
  if (!step_ms.empty())
    std::printf("steps           min %.2f, median %.2f, p90 %.2f, max %.2f ms (%d timed)\n", step_quantile(0.0),
                step_quantile(0.5), step_quantile(0.9), step_quantile(1.0), timed_steps);
  std::printf("peak RSS        %s\n", human_bytes(rss).c_str());
  std::printf("cache           global K/V %s, sliding K/V %s, SSM %s, conv %s, total %s (formula %s)\n",
              human_bytes(cache.global_kv).c_str(), human_bytes(cache.sliding_kv).c_str(),
              human_bytes(cache.ssm).c_str(), human_bytes(cache.conv).c_str(), human_bytes(cache.total()).c_str(),
              human_bytes(formula).c_str());
  return 0;
}

std::string version_string() {
  std::string s = std::string("hymba ") + HYMBA_VERSION + "\nbackends:";
  for (const std::string& b : compiled_backends()) s += " " + b;
  s += "\ncpu matmul paths:";
  for (const char* isa : {"avx512", "avx512-nobf16", "avx2", "portable"})
    if (cpu::matmul_isa_supported(isa)) s += std::string(" ") + isa;
  s += std::string(" (default ") + cpu::matmul_isa() + ")";
  return s;
}

}  // namespace
}  // namespace hymba::cli

int main(int argc, char** argv) {
  using namespace hymba;
  using namespace hymba::cli;
  CLI::App app{"hymba: run NVIDIA Hymba hybrid-head language models"};
  app.require_subcommand(0, 1);
  app.set_version_flag("--version", version_string());

  GenerateArgs gen;
  auto* g = app.add_subcommand("generate", "generate text from a prompt");
  gen.model.add_to(g);
  g->add_option("-p,--prompt", gen.prompt, "prompt text (tokenized with the model's tokenizer)");
  g->add_option("-f,--file", gen.prompt_file, "read the prompt text from a file");
  g->add_option("--ids", gen.ids, "prompt as comma-separated token ids, e.g. 1,2,3");
  g->add_option("-n,--n-predict", gen.n, "number of tokens to generate")->check(CLI::Range(0, 1 << 24));
  add_sampling_options(g, gen.sampling);
  g->add_option("--seed", gen.seed, "random seed (same seed, same output)");
  g->add_option("--ctx", gen.ctx, "context size in tokens (default: prompt + n)");
  g->add_option("--stop", gen.stop, "stop when this text is generated (repeatable)");
  g->add_flag("--print-ids", gen.print_ids, "end with one line of the generated token ids");
  g->add_flag("--no-bos", gen.no_bos, "do not add the BOS token to a text prompt");
  g->add_flag("--ignore-eos", gen.ignore_eos, "keep generating past the end-of-sequence token");
  g->add_flag("--chat", gen.chat, "the prompt is one user message: render it with the checkpoint's chat template "
              "(no BOS), print the assistant's answer (stops at EOS or '</s>')");
  auto* g_sys = g->add_option("--system", gen.system, "system message for --chat (default: none)");
  g->add_option("--chat-format", gen.chat_format, "with --chat: auto (the checkpoint's template, refused if it is "
                "not Hymba's) or hymba (force the Hymba-Instruct format)")
      ->check(CLI::IsMember(ChatTemplate::format_names()));

  ChatArgs ch;
  auto* c = app.add_subcommand("chat", "interactive multi-turn chat in the checkpoint's chat format (docs/CHAT.md)");
  ch.model.add_to(c);
  auto* c_sys = c->add_option("--system", ch.system, "system message (default: none)");
  c->add_option("--chat-format", ch.chat_format, "auto (the checkpoint's template, refused if it is not Hymba's) "
                "or hymba (force the Hymba-Instruct format)")
      ->check(CLI::IsMember(ChatTemplate::format_names()));
  c->add_option("-n,--n-predict", ch.n, "most tokens per answer")->check(CLI::Range(0, 1 << 24));
  add_sampling_options(c, ch.sampling);
  c->add_option("--seed", ch.seed, "random seed (turn k samples with seed + k)");
  c->add_option("--ctx", ch.ctx, "context size in tokens for the whole conversation (default: the model's "
                "max_position_embeddings, at most 8192)");
  c->add_option("--stop", ch.stop, "also stop an answer at this text (repeatable; EOS and '</s>' always stop)");
  c->add_flag("--ignore-eos", ch.ignore_eos, "keep generating past the end-of-sequence token");
  c->add_flag("--print-ids", ch.print_ids, "after each answer, print one line of its token ids");
  c->footer(std::string("In the chat: ") + kChatHelp);
  c->add_flag("--stats", ch.stats, "after each answer, print to stderr the tokens reused from the cache, "
              "prefilled and generated, and the speeds");

  std::string tp_dir, tp_file, tp_format = "auto";
  bool tp_ids = false;
  auto* tp = app.add_subcommand("template", "print the chat prompt a conversation renders to, exactly (no newline "
                                "added); needs only tokenizer_config.json");
  tp->add_option("-m,--model", tp_dir, "directory with tokenizer_config.json")->required();
  tp->add_option("-f,--file", tp_file, "conversation JSON: {\"messages\": [{\"role\", \"content\"}...], \"tools\": "
                 "[...], \"contexts\": [...], \"add_generation_prompt\": bool}; - reads stdin")->required();
  tp->add_option("--chat-format", tp_format, "auto (the checkpoint's template, refused if it is not Hymba's) or "
                 "hymba (force the Hymba-Instruct format)")
      ->check(CLI::IsMember(ChatTemplate::format_names()));
  tp->add_flag("--ids", tp_ids, "print the prompt's token ids (no BOS, as the chat path) instead; needs tokenizer.model");

  ModelArgs lg_model;
  std::string lg_ids;
  bool lg_all = false;
  auto* lg = app.add_subcommand("logits", "print the logits of a token sequence as JSON");
  lg_model.add_to(lg);
  lg->add_option("--ids", lg_ids, "comma-separated token ids")->required();
  lg->add_flag("--all-positions", lg_all, "one row per input position (default: the last one)");

  std::string in_preset, in_dtype = "bf16", in_out;
  uint64_t in_seed = 0;
  auto* in = app.add_subcommand("init", "write a random-weight checkpoint in the HF layout");
  in->add_option("--preset", in_preset, "tiny, 125m, 350m or 1.5b")->required()->check(
      CLI::IsMember(preset_names()));
  in->add_option("--dtype", in_dtype, "weight dtype: f32, bf16 or f16")->check(CLI::IsMember({"f32", "bf16", "f16"}));
  in->add_option("--seed", in_seed, "random seed");
  in->add_option("--out", in_out, "output directory")->required();
  bool in_config_only = false;
  in->add_flag("--config-only", in_config_only, "write only config.json (no weights)");

  std::string if_dir, if_cache;
  int64_t if_ctx = 0;
  bool if_json = false;
  auto* inf = app.add_subcommand("info", "parameters, layer plan and cache size (needs only config.json)");
  inf->add_option("-m,--model", if_dir, "model directory")->required();
  inf->add_option("--ctx", if_ctx, "context length for the cache size (default: max_position_embeddings)");
  inf->add_option("--cache-type", if_cache, "K/V element type: f32, bf16, f16 (default: the config's torch_dtype)")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  inf->add_flag("--json", if_json, "print JSON");

  std::string tk_dir, tk_text, tk_file;
  bool tk_no_bos = false;
  auto* tk = app.add_subcommand("tokenize", "print the token ids of a text (needs only the tokenizer files)");
  tk->add_option("-m,--model", tk_dir, "directory with tokenizer.model")->required();
  tk->add_option("-p,--prompt", tk_text, "text to tokenize");
  tk->add_option("-f,--file", tk_file, "file to tokenize");
  tk->add_flag("--no-bos", tk_no_bos, "do not add the BOS token");

  ModelArgs bn_model;
  BenchArgs bn_args;
  bn_args.seed = 1;
  auto* bn = app.add_subcommand("bench", "measure prefill and decode speed, time to first token and memory");
  bn_model.add_to(bn);
  bn->add_option("--prompt-len", bn_args.prompt_len, "prompt tokens (random ids)");
  bn->add_option("--gen-len", bn_args.gen_len, "generated tokens (greedy), i.e. decode steps");
  bn->add_option("--batch", bn_args.batch, "sequences decoding together (batched decode steps)")
      ->check(CLI::Range(int64_t(1), int64_t(4096)));
  bn->add_option("--batch-fill", bn_args.batch_fill,
                 "how the other sequences of a batch get their prompt: prefill (each its own random prompt) or "
                 "replicate (copy the first one's cache; decode cost does not depend on the values)")
      ->check(CLI::IsMember({"prefill", "replicate"}));
  bn->add_option("--seed", bn_args.seed, "seed of the random prompts");
  bn->add_flag("--json", bn_args.as_json, "print JSON");
  bn->add_flag("!--no-warmup", bn_args.warmup,
               "time from a cold start: no untimed warm-up prefill/decode first, and a batch's first step is timed");

  auto* pp = app.add_subcommand(
      "perplexity",
      "perplexity of a text file by sliding-window evaluation: BOS + the file's tokens; windows of --ctx "
      "tokens every --stride tokens, each a fresh sequence, each scoring the tokens no earlier window "
      "scored; prints exp(mean negative log-likelihood)");
  ModelArgs pp_model;
  PerplexityArgs pp_args;
  pp_model.add_to(pp);
  pp->add_option("-f,--file", pp_args.file, "text file to evaluate");
  pp->add_option("--ids", pp_args.ids, "evaluate these token ids (comma-separated) instead of a file");
  pp->add_option("--ctx", pp_args.ctx, "window length in tokens (default 512)")
      ->check(CLI::Range(int64_t(2), int64_t(1) << 24));
  pp->add_option("--stride", pp_args.stride, "distance between window starts (default ctx/2; must be < ctx)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 24));
  pp->add_flag("--no-bos", pp_args.no_bos, "do not put BOS in front of the file's tokens");
  pp->add_flag("--json", pp_args.json, "print the result as JSON");
  pp->add_flag("--progress", pp_args.progress, "print window progress to stderr");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (g->parsed()) {
      gen.system_given = g_sys->count() > 0;
      return run_generate(gen);
    }
    if (c->parsed()) {
      ch.system_given = c_sys->count() > 0;
      return run_chat(ch);
    }
    if (tp->parsed()) return run_template(tp_dir, tp_file, tp_format, tp_ids);
    if (lg->parsed()) return run_logits(lg_model, lg_ids, lg_all);
    if (in->parsed()) return run_init(in_preset, in_dtype, in_seed, in_out, in_config_only);
    if (inf->parsed()) return run_info(if_dir, if_ctx, if_json, if_cache);
    if (tk->parsed()) return run_tokenize(tk_dir, tk_text, tk_file, tk_no_bos);
    if (bn->parsed()) return run_bench(bn_model, bn_args);
    if (pp->parsed()) return run_perplexity(pp_model, pp_args);
    std::cout << app.help();
    return 0;
  } catch (const hymba::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
