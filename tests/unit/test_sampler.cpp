// Sampler and StopMatcher tests. Expected distributions are computed here,
// independently of src/runtime/sampler.cpp.
#include <gtest/gtest.h>

#include "test_util.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "runtime/sampler.h"
#include "util/error.h"

using hymba::Sampler;
using hymba::SamplingParams;
using hymba::StopMatcher;

namespace {

SamplingParams sampling(float temp, int top_k = 0, float top_p = 1.0f, float min_p = 0.0f,
                        uint64_t seed = 1) {
  SamplingParams p;
  p.temperature = temp;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.seed = seed;
  return p;
}

// Reference pipeline written from the definitions: penalty, temperature,
// top-k, top-p (smallest prefix reaching p), min-p, renormalise.
std::map<int, double> expected_dist(std::vector<float> logits, const SamplingParams& p,
                                    const std::vector<int32_t>& history) {
  std::set<int32_t> recent;
  const size_t n = p.repeat_last_n < 0 ? history.size()
                                       : std::min<size_t>(history.size(), p.repeat_last_n);
  for (size_t i = history.size() - n; i < history.size(); ++i) recent.insert(history[i]);
  for (int32_t id : recent)
    logits[id] = logits[id] > 0 ? logits[id] / p.repeat_penalty : logits[id] * p.repeat_penalty;

  std::vector<int> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < order.size()) order.resize(p.top_k);

  std::vector<double> prob;
  double z = 0;
  for (int id : order) {
    prob.push_back(std::exp(static_cast<double>(logits[id]) / p.temperature));
    z += prob.back();
  }
  for (double& q : prob) q /= z;

  size_t keep = order.size();
  if (p.top_p < 1.0f) {
    double cum = 0;
    for (keep = 0; keep < order.size();) {
      cum += prob[keep++];
      if (cum >= p.top_p) break;
    }
  }
  const double thr = p.min_p * prob[0];
  while (keep > 1 && prob[keep - 1] < thr) --keep;

  std::map<int, double> out;
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += prob[i];
  for (size_t i = 0; i < keep; ++i) out[order[i]] = prob[i] / kept;
  return out;
}

std::vector<float> log_probs(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double q : probs) l.push_back(static_cast<float>(std::log(q)));
  return l;
}

std::set<int32_t> kept_ids(Sampler& s, const std::vector<float>& logits) {
  std::set<int32_t> ids;
  for (const auto& [id, prob] : s.distribution(logits.data(), static_cast<int>(logits.size()), {}))
    ids.insert(id);
  return ids;
}

using hymba::test::error_of;

std::vector<float> random_logits(std::mt19937_64& g, int n) {
  std::vector<float> l(n);
  for (auto& v : l) v = static_cast<float>(static_cast<int64_t>(g() % 2001) - 1000) / 200.0f;
  return l;
}

}  // namespace

TEST(Sampler, GreedyPicksArgmaxLowestIdOnTies) {
  Sampler s(sampling(0.0f));
  std::vector<float> l = {0.1f, 2.5f, -1.0f, 2.4f};
  EXPECT_EQ(s.sample(l.data(), 4, {}), 1);
  l = {1.0f, 3.0f, 3.0f, -std::numeric_limits<float>::infinity()};
  EXPECT_EQ(s.sample(l.data(), 4, {}), 1);
  l = {-std::numeric_limits<float>::infinity(), -7.0f};
  EXPECT_EQ(s.sample(l.data(), 2, {}), 1);
}

TEST(Sampler, SameSeedSameSamplesDifferentSeedsDiffer) {
  std::mt19937_64 g(7);
  std::vector<std::vector<float>> steps;
  for (int i = 0; i < 300; ++i) steps.push_back(random_logits(g, 50));
  auto run = [&](uint64_t seed) {
    Sampler s(sampling(1.0f, 0, 0.95f, 0.01f, seed));
    std::vector<int32_t> out;
    for (const auto& l : steps) out.push_back(s.sample(l.data(), 50, out));
    return out;
  };
  const auto a = run(42), b = run(42), c = run(43);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);

  Sampler s(sampling(1.0f, 0, 1.0f, 0.0f, 42));
  std::vector<int32_t> first, again;
  for (const auto& l : steps) first.push_back(s.sample(l.data(), 50, {}));
  s.reseed(42);
  for (const auto& l : steps) again.push_back(s.sample(l.data(), 50, {}));
  EXPECT_EQ(first, again);
}

TEST(Sampler, FixedSeedSequenceIsPlatformIndependent) {
  // mt19937_64 output and our own uniform mapping are fully specified, so this
  // sequence must be identical everywhere (std::*_distribution is not).
  std::mt19937_64 ref(123);
  std::vector<double> probs = {0.1, 0.2, 0.3, 0.4};
  Sampler s(sampling(1.0f, 0, 1.0f, 0.0f, 123));
  const auto l = log_probs(probs);
  for (int i = 0; i < 1000; ++i) {
    const double u = static_cast<double>(ref() >> 11) * 0x1.0p-53;
    // Candidates are walked in descending probability: 3, 2, 1, 0.
    const int want = u < 0.4 ? 3 : u < 0.7 ? 2 : u < 0.9 ? 1 : 0;
    const double eps = 1e-6;  // stay clear of float rounding at the edges
    const bool edge = std::fabs(u - 0.4) < eps || std::fabs(u - 0.7) < eps || std::fabs(u - 0.9) < eps;
    const int got = s.sample(l.data(), 4, {});
    if (!edge) {
      EXPECT_EQ(got, want) << "draw " << i;
    }
  }
}

TEST(Sampler, TopK1EqualsGreedy) {
  std::mt19937_64 g(11);
  Sampler greedy(sampling(0.0f));
  Sampler k1(sampling(1.3f, 1, 1.0f, 0.0f, 99));
  for (int i = 0; i < 200; ++i) {
    auto l = random_logits(g, 64);
    if (i % 3 == 0) l[10] = l[40] = *std::max_element(l.begin(), l.end()) + 1.0f;  // ties
    EXPECT_EQ(k1.sample(l.data(), 64, {}), greedy.sample(l.data(), 64, {}));
  }
}

TEST(Sampler, EmpiricalFrequenciesMatchFilteredDistribution) {
  const std::vector<float> logits = {1.2f, 0.3f, 2.0f, -0.7f, 1.9f, 0.8f, -2.0f, 0.0f, 1.5f, 0.6f};
  const std::vector<int32_t> history = {4, 4, 9, 7};
  struct Case {
    SamplingParams p;
    const char* name;
  };
  std::vector<Case> cases = {
      {sampling(1.0f), "temperature only"},
      {sampling(0.7f, 6, 0.9f, 0.05f, 5), "all filters"},
      {sampling(1.5f, 0, 0.8f, 0.0f, 6), "top-p"},
      {sampling(1.0f, 0, 1.0f, 0.2f, 7), "min-p"},
      {sampling(2.0f, 4, 1.0f, 0.0f, 8), "top-k"},
  };
  cases[1].p.repeat_penalty = 1.3f;
  cases[1].p.repeat_last_n = 3;  // window {4, 9, 7}: each penalised once
  for (const auto& c : cases) {
    const auto want = expected_dist(logits, c.p, history);
    Sampler s(c.p);
    const auto got_dist = s.distribution(logits.data(), 10, history);
    ASSERT_EQ(got_dist.size(), want.size()) << c.name;
    for (const auto& [id, prob] : got_dist) {
      ASSERT_TRUE(want.count(id)) << c.name << " kept token " << id;
      EXPECT_NEAR(prob, want.at(id), 1e-9) << c.name << " token " << id;
    }

    const int draws = 200000;
    std::vector<int> counts(10, 0);
    for (int i = 0; i < draws; ++i) ++counts[s.sample(logits.data(), 10, history)];
    double chi2 = 0;
    for (int id = 0; id < 10; ++id) {
      if (!want.count(id)) {
        EXPECT_EQ(counts[id], 0) << c.name << ": filtered token " << id << " was sampled";
        continue;
      }
      const double e = want.at(id) * draws;
      chi2 += (counts[id] - e) * (counts[id] - e) / e;
    }
    // df <= 9; 40 is far beyond the 1e-5 tail, yet tiny next to a wrong
    // distribution (a 1% error on a 0.2 token alone gives ~40 at 200k draws).
    EXPECT_LT(chi2, 40.0) << c.name;
  }
}

TEST(Sampler, TopPAndMinPExclusionSetsAreExact) {
  const auto l = log_probs({0.5, 0.2, 0.15, 0.1, 0.05});
  auto set_for = [&](float top_p, float min_p) {
    Sampler s(sampling(1.0f, 0, top_p, min_p));
    return kept_ids(s, l);
  };
  using S = std::set<int32_t>;
  EXPECT_EQ(set_for(0.4f, 0.0f), (S{0}));
  EXPECT_EQ(set_for(0.65f, 0.0f), (S{0, 1}));
  EXPECT_EQ(set_for(0.75f, 0.0f), (S{0, 1, 2}));
  EXPECT_EQ(set_for(0.9f, 0.0f), (S{0, 1, 2, 3}));
  EXPECT_EQ(set_for(0.99f, 0.0f), (S{0, 1, 2, 3, 4}));
  EXPECT_EQ(set_for(1e-6f, 0.0f), (S{0}));  // always at least one
  EXPECT_EQ(set_for(1.0f, 0.25f), (S{0, 1, 2}));  // keep p >= 0.125
  EXPECT_EQ(set_for(1.0f, 0.35f), (S{0, 1}));     // keep p >= 0.175
  EXPECT_EQ(set_for(1.0f, 0.09f), (S{0, 1, 2, 3, 4}));
  EXPECT_EQ(set_for(1.0f, 1.0f), (S{0}));
  EXPECT_EQ(set_for(0.9f, 0.25f), (S{0, 1, 2}));  // both: the smaller set wins
  EXPECT_EQ(set_for(0.65f, 0.25f), (S{0, 1}));

  Sampler s(sampling(1.0f, 0, 0.65f, 0.0f, 3));
  for (int i = 0; i < 20000; ++i) {
    const int id = s.sample(l.data(), 5, {});
    EXPECT_TRUE(id == 0 || id == 1) << id;
  }
  // Top-k ties at the boundary go to the lower id.
  const std::vector<float> tied = {1.0f, 3.0f, 2.0f, 2.0f, 2.0f};
  Sampler k2(sampling(1.0f, 2));
  EXPECT_EQ(kept_ids(k2, tied), (S{1, 2}));
}

TEST(Sampler, RepetitionPenaltyChangesArgmax) {
  SamplingParams p = sampling(0.0f);
  p.repeat_penalty = 1.5f;
  Sampler s(p);
  std::vector<float> l = {2.0f, 1.8f, -0.5f};
  EXPECT_EQ(s.sample(l.data(), 3, {}), 0);
  EXPECT_EQ(s.sample(l.data(), 3, {0}), 1);  // 2.0 / 1.5 < 1.8
  l = {-1.0f, -1.2f};
  EXPECT_EQ(s.sample(l.data(), 2, {0}), 1);  // -1.0 * 1.5 < -1.2

  // Applied once per distinct id: 2.0 / 1.2 > 1.5 (thrice would be < 1.5).
  SamplingParams q = sampling(0.0f);
  q.repeat_penalty = 1.2f;
  Sampler once(q);
  l = {2.0f, 1.5f};
  EXPECT_EQ(once.sample(l.data(), 2, {0, 0, 0}), 0);

  // Only the last repeat_last_n tokens count.
  p.repeat_last_n = 2;
  Sampler window(p);
  l = {2.0f, 1.8f, -0.5f, 0.0f};
  EXPECT_EQ(window.sample(l.data(), 4, {0, 3, 2}), 0);
  EXPECT_EQ(window.sample(l.data(), 4, {3, 0, 2}), 1);
  p.repeat_last_n = 0;
  Sampler off(p);
  EXPECT_EQ(off.sample(l.data(), 4, {0}), 0);
  p.repeat_last_n = -1;
  Sampler all(p);
  EXPECT_EQ(all.sample(l.data(), 4, {0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2}), 1);
}

TEST(Sampler, InvalidParamsAreErrors) {
  auto msg_for = [](auto mutate) {
    SamplingParams p;
    mutate(p);
    return error_of([&] { Sampler s(p); });
  };
  EXPECT_NE(msg_for([](SamplingParams& p) { p.temperature = -0.1f; }).find("temperature"), std::string::npos);
  EXPECT_NE(msg_for([](SamplingParams& p) { p.temperature = NAN; }).find("temperature"), std::string::npos);
  EXPECT_NE(msg_for([](SamplingParams& p) { p.top_k = -1; }).find("top_k"), std::string::npos);
  EXPECT_NE(msg_for([](SamplingParams& p) { p.top_p = 0.0f; }).find("top_p"), std::string::npos);
  EXPECT_NE(msg_for([](SamplingParams& p) { p.top_p = 1.5f; }).find("top_p"), std::string::npos);
  EXPECT_NE(msg_for([](SamplingParams& p) { p.min_p = -0.1f; }).find("min_p"), std::string::npos);
  EXPECT_NE(msg_for([](SamplingParams& p) { p.min_p = 1.1f; }).find("min_p"), std::string::npos);
  EXPECT_NE(msg_for([](SamplingParams& p) { p.repeat_penalty = 0.0f; }).find("repeat_penalty"), std::string::npos);
  EXPECT_NE(msg_for([](SamplingParams& p) { p.repeat_last_n = -2; }).find("repeat_last_n"), std::string::npos);
  EXPECT_EQ(msg_for([](SamplingParams&) {}), "<no hymba::Error thrown>");

  for (float temp : {0.0f, 1.0f}) {
    Sampler s(sampling(temp));
    std::vector<float> l = {0.5f, NAN, 1.0f};
    const std::string m = error_of([&] { s.sample(l.data(), 3, {}); });
    EXPECT_NE(m.find("NaN"), std::string::npos) << m;
    EXPECT_NE(m.find("token 1"), std::string::npos) << m;
    l = {0.5f, std::numeric_limits<float>::infinity()};
    EXPECT_THROW(s.sample(l.data(), 2, {}), hymba::Error);
    const float ninf = -std::numeric_limits<float>::infinity();
    l = {ninf, ninf};
    EXPECT_THROW(s.sample(l.data(), 2, {}), hymba::Error);
    l = {0.5f, 1.0f};
    EXPECT_THROW(s.sample(l.data(), 0, {}), hymba::Error);
  }
  SamplingParams p = sampling(0.0f);
  p.repeat_penalty = 1.1f;
  Sampler s(p);
  std::vector<float> l = {0.5f, 1.0f};
  EXPECT_NE(error_of([&] { s.sample(l.data(), 2, {5}); }).find("5"), std::string::npos);
}

TEST(StopMatcher, StopSplitAcrossChunks) {
  StopMatcher m({"</s>", "\nUser:"});
  auto r = m.feed("Hello <");
  EXPECT_EQ(r.text, "Hello ");
  EXPECT_FALSE(r.stopped);
  r = m.feed("/");
  EXPECT_EQ(r.text, "");
  r = m.feed("s");
  EXPECT_EQ(r.text, "");
  r = m.feed("> trailing");
  EXPECT_EQ(r.text, "");
  EXPECT_TRUE(r.stopped);
  EXPECT_TRUE(m.stopped());
  r = m.feed("more");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.text, "");
}

TEST(StopMatcher, FalseAlarmReleasesHeldText) {
  StopMatcher m({"</s>"});
  std::string out;
  out += m.feed("a <").text;
  EXPECT_EQ(out, "a ");
  out += m.feed("/b").text;
  EXPECT_EQ(out, "a </b");
  out += m.feed(" </").text;
  EXPECT_EQ(out, "a </b ");
  out += m.flush();
  EXPECT_EQ(out, "a </b </");
  EXPECT_FALSE(m.stopped());
}

TEST(StopMatcher, CharByCharMatchesWholeText) {
  const std::vector<std::string> stops = {"abcabd", "\n\nUser", "€!"};
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"xxabcabcabdyy", "xxabc"},
      {"hello\n\nUse\n\nUser: hi", "hello\n\nUse"},
      {"price 5€ then 6€!", "price 5€ then 6"},
      {"no stop here abcab", "no stop here abcab"},
  };
  for (const auto& [text, want] : cases) {
    for (size_t step : {1u, 2u, 3u, 100u}) {
      StopMatcher m(stops);
      std::string out;
      for (size_t i = 0; i < text.size() && !m.stopped(); i += step) out += m.feed(text.substr(i, step)).text;
      if (!m.stopped()) out += m.flush();
      EXPECT_EQ(out, want) << text << " step " << step;
    }
  }
  // Earliest stop wins when two overlap.
  StopMatcher m({"bcd", "ab"});
  EXPECT_EQ(m.feed("xabcd").text, "x");
}

TEST(StopMatcher, EmptyStopStringRejected) {
  EXPECT_THROW(StopMatcher({"ok", ""}), hymba::Error);
  StopMatcher none({});
  EXPECT_EQ(none.feed("anything </s>").text, "anything </s>");
}

// ---- the host sampling kernel through Backend::sample_tokens (the CPU
// backend's default) against Sampler, which runs the same kernel one row at
// a time: same options, same window, same uniform draws.

namespace {

struct RandomCase {
  SamplingParams p;
  int vocab = 0;
  std::vector<std::vector<float>> steps;  // one row per step
  std::vector<int32_t> history;           // before the first step
};

RandomCase random_case(std::mt19937_64& g) {
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); };
  auto unif = [&](double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g); };
  RandomCase c;
  c.vocab = pick(0, 3) == 0 ? pick(1, 5) : pick(6, 300);
  SamplingParams& p = c.p;
  p.seed = g();
  p.temperature = pick(0, 4) == 0 ? 0.0f : static_cast<float>(unif(0.05, 3.0));
  const int k = pick(0, 4);
  p.top_k = k == 0 ? 0 : k == 1 ? 1 : k == 2 ? c.vocab + pick(0, 5) : pick(1, c.vocab);
  const int tp = pick(0, 3);
  p.top_p = tp == 0 ? 1.0f : tp == 1 ? 1e-6f : static_cast<float>(unif(0.05, 1.0));
  const int mp = pick(0, 4);
  p.min_p = mp == 0 ? 0.0f : mp == 1 ? 1.0f : static_cast<float>(unif(0.0, 0.5));
  p.repeat_penalty = pick(0, 2) == 0 ? 1.0f : static_cast<float>(unif(0.5, 2.0));
  p.repeat_last_n = pick(-1, 8);
  for (int i = pick(0, 12); i > 0; --i) c.history.push_back(pick(0, std::min(c.vocab - 1, 6)));  // repeats
  // Logits: coarse grids give many exact ties; -inf here and there; some
  // rows peaked, some flat.
  for (int s = 0; s < 6; ++s) {
    std::vector<float> l(static_cast<size_t>(c.vocab));
    const int style = pick(0, 3);
    for (float& v : l) {
      if (style == 0) v = static_cast<float>(pick(-3, 3)) * 0.5f;               // ties everywhere
      else if (style == 1) v = static_cast<float>(unif(-8.0, 8.0));             // generic
      else if (style == 2) v = static_cast<float>(pick(-2, 2)) * 1e-3f;           // nearly flat
      else v = pick(0, 20) == 0 ? 30.0f : static_cast<float>(unif(-20.0, -5.0));  // peaked
      if (pick(0, 9) == 0) v = -std::numeric_limits<float>::infinity();
      if (pick(0, 30) == 0) v = -0.0f;
    }
    l[static_cast<size_t>(pick(0, c.vocab - 1))] = static_cast<float>(pick(-2, 2));  // a finite one
    c.steps.push_back(std::move(l));
  }
  return c;
}

hymba::SampleArgs args_of(const SamplingParams& p, const std::vector<int32_t>& history, double u) {
  hymba::SampleArgs a;
  a.temperature = p.temperature;
  a.top_k = p.top_k;
  a.top_p = p.top_p;
  a.min_p = p.min_p;
  a.repeat_penalty = p.repeat_penalty;
  if (p.repeat_penalty != 1.0f && p.repeat_last_n != 0 && !history.empty()) {
    const size_t n = p.repeat_last_n < 0 ? history.size() : std::min<size_t>(history.size(), p.repeat_last_n);
    a.history = history.data() + history.size() - n;
    a.n_history = static_cast<int64_t>(n);
  }
  a.u = u;
  return a;
}

std::string describe(const SamplingParams& p, int vocab) {
  std::ostringstream os;
  os << "vocab " << vocab << " temperature " << p.temperature << " top_k " << p.top_k << " top_p " << p.top_p
     << " min_p " << p.min_p << " penalty " << p.repeat_penalty << " last_n " << p.repeat_last_n << " seed "
     << p.seed;
  return os.str();
}

}  // namespace

TEST(SampleTokens, CpuBackendEqualsSamplerOnRandomCases) {
  auto be = hymba::make_cpu_backend();
  std::mt19937_64 g(2024);
  int compared = 0;
  for (int t = 0; t < 3000; ++t) {
    const RandomCase c = random_case(g);
    Sampler s(c.p);
    std::mt19937_64 draws(c.p.seed);  // Sampler's stream, reproduced
    std::vector<int32_t> history = c.history;
    // The steps one at a time, as generation calls it (the history grows).
    for (const auto& row : c.steps) {
      const int32_t want = s.sample(row.data(), c.vocab, history);
      const double u = c.p.temperature > 0.0f ? static_cast<double>(draws() >> 11) * 0x1.0p-53 : 0.0;
      const hymba::SampleArgs a = args_of(c.p, history, u);
      hymba::DeviceArray<float> d(*be, row.size());
      be->upload(d.data(), row.data(), row.size() * sizeof(float));
      int32_t got = -1;
      be->sample_tokens(d.data(), 1, c.vocab, c.vocab, &a, &got);
      ASSERT_EQ(got, want) << "case " << t << ": " << describe(c.p, c.vocab) << " u " << u;
      history.push_back(want);
      ++compared;
    }
    // All steps as one batch (rows of leading dimension vocab + 3), each with
    // its own window and draw.
    const int64_t ld = c.vocab + 3;
    const int64_t rows = static_cast<int64_t>(c.steps.size());
    std::vector<float> batch(static_cast<size_t>(rows * ld), std::numeric_limits<float>::quiet_NaN());
    for (int64_t r = 0; r < rows; ++r)
      std::copy(c.steps[r].begin(), c.steps[r].end(), batch.begin() + r * ld);
    Sampler s2(c.p);
    std::mt19937_64 draws2(c.p.seed);
    std::vector<std::vector<int32_t>> hist(static_cast<size_t>(rows), c.history);
    std::vector<hymba::SampleArgs> args;
    std::vector<int32_t> want;
    for (int64_t r = 0; r < rows; ++r) {
      hist[r].push_back(static_cast<int32_t>(r % c.vocab));
      want.push_back(s2.sample(c.steps[r].data(), c.vocab, hist[r]));
      const double u = c.p.temperature > 0.0f ? static_cast<double>(draws2() >> 11) * 0x1.0p-53 : 0.0;
      args.push_back(args_of(c.p, hist[r], u));
    }
    hymba::DeviceArray<float> d(*be, batch.size());
    be->upload(d.data(), batch.data(), batch.size() * sizeof(float));
    std::vector<int32_t> got(static_cast<size_t>(rows), -1);
    be->sample_tokens(d.data(), rows, c.vocab, ld, args.data(), got.data());
    ASSERT_EQ(got, want) << "batch of case " << t << ": " << describe(c.p, c.vocab);
  }
  EXPECT_GT(compared, 10000);
}

TEST(SampleTokens, SamplerErrorsConsumeNoRandomness) {
  // The draw follows the checks: a rejected row leaves the stream where it was.
  const std::vector<float> good = {0.1f, 0.5f, 0.3f, 0.2f};
  const std::vector<float> bad = {0.1f, NAN, 0.3f, 0.2f};
  Sampler a(sampling(1.0f, 0, 1.0f, 0.0f, 77)), b(sampling(1.0f, 0, 1.0f, 0.0f, 77));
  std::vector<int32_t> ra, rb;
  for (int i = 0; i < 50; ++i) {
    EXPECT_THROW(a.sample(bad.data(), 4, {}), hymba::Error);
    ra.push_back(a.sample(good.data(), 4, {}));
    rb.push_back(b.sample(good.data(), 4, {}));
  }
  EXPECT_EQ(ra, rb);
}

TEST(SampleTokens, BadInputThrowsWithClearMessages) {
  auto be = hymba::make_cpu_backend();
  const float inf = std::numeric_limits<float>::infinity();
  auto run = [&](std::vector<float> l, hymba::SampleArgs a, int64_t rows = 1) {
    const int64_t vocab = static_cast<int64_t>(l.size()) / rows;
    std::vector<hymba::SampleArgs> args(static_cast<size_t>(rows), a);
    std::vector<int32_t> out(static_cast<size_t>(rows));
    return error_of([&] { be->sample_tokens(l.data(), rows, vocab, vocab, args.data(), out.data()); });
  };
  for (float temp : {0.0f, 0.8f}) {
    hymba::SampleArgs a;
    a.temperature = temp;
    a.u = 0.5;
    std::string m = run({0.5f, 1.0f, NAN, inf}, a);
    EXPECT_NE(m.find("logit of token 2 is NaN"), std::string::npos) << m;
    m = run({0.5f, inf, NAN}, a);
    EXPECT_NE(m.find("logit of token 1 is +inf"), std::string::npos) << m;
    m = run({-inf, -inf, -inf}, a);
    EXPECT_NE(m.find("no token has a finite logit"), std::string::npos) << m;
    // The second row is the bad one.
    m = run({0.5f, 1.0f, 0.5f, -inf, -inf, -inf}, a, 2);
    EXPECT_NE(m.find("no token has a finite logit"), std::string::npos) << m;

    const std::vector<int32_t> hist = {1, 7, -3, 2};
    a.history = hist.data();
    a.n_history = 4;
    a.repeat_penalty = 1.3f;
    m = run({0.5f, 1.0f, 0.25f}, a);
    EXPECT_NE(m.find("history token id -3 is out of range for vocabulary of size 3"), std::string::npos) << m;
    a.repeat_penalty = 1.0f;  // checked even when the penalty is off
    m = run({0.5f, 1.0f, 0.25f}, a);
    EXPECT_NE(m.find("history token id -3"), std::string::npos) << m;
    a.n_history = 2;  // {1, 7}
    m = run({0.5f, 1.0f, 0.25f}, a);
    EXPECT_NE(m.find("history token id 7"), std::string::npos) << m;
    // NaN is reported before the history.
    m = run({0.5f, NAN, 0.25f}, a);
    EXPECT_NE(m.find("NaN"), std::string::npos) << m;
    // A penalty below 1 pushing a huge logit to +inf.
    a.n_history = 1;  // {1}
    a.repeat_penalty = 0.5f;
    m = run({0.5f, 3e38f, 0.25f}, a);
    EXPECT_NE(m.find("logit of token 1 is +inf after the repetition penalty"), std::string::npos) << m;
  }
  hymba::SampleArgs a;
  a.temperature = -1.0f;
  EXPECT_NE(run({0.5f, 1.0f}, a).find("temperature"), std::string::npos);
  a.temperature = 1.0f;
  a.u = 1.0;
  EXPECT_NE(run({0.5f, 1.0f}, a).find("u must be in [0, 1)"), std::string::npos);
}
