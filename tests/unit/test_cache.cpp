// SequenceCache (cache/hybrid_cache) without a model: K/V rows that encode
// their position are stored chunk by chunk, and kv_segments must return
// exactly the positions the attention contract needs (spec 5.4): every
// position for a global slot; the pinned meta positions plus the last
// min(window, real) real positions for a sliding slot, each row holding the
// data stored for its position.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "cache/hybrid_cache.h"
#include "util/dtype.h"
#include "util/error.h"

namespace hymba {
namespace {

constexpr int64_t kMeta = 3, kWindow = 5;
constexpr int64_t kK = 4, kV = 6;  // K and V widths of one position

// Slot 0 sliding, slot 1 global, slot 2 sliding (several slots of one kind
// must not share storage).
CacheLayout small_layout(DType dt) {
  CacheLayout l;
  l.n_layers = 2;
  l.n_meta = kMeta;
  l.window = kWindow;
  l.kv_k = kK;
  l.kv_v = kV;
  l.d_inner = 3;
  l.d_state = 2;
  l.d_conv = 4;
  l.kv_dtype = dt;
  l.kv_global = {false, true, false};
  return l;
}

// Values that identify (slot, position, element, K or V), all exactly
// representable in bf16 (at most 8 significant bits, scaled by powers of
// two) for positions < 63, and never 0 (the cache's initial contents).
float k_value(int slot, int64_t pos, int64_t j) {
  return std::ldexp(float(pos + 1) + 0.25f * float(j % 4), slot);
}
float v_value(int slot, int64_t pos, int64_t j) {
  return -std::ldexp(float(pos + 1) + 0.25f * float(j % 4), slot + (j >= 4 ? 3 : 0));
}

double read_elem(const void* base, DType dt, int64_t i) {
  if (dt == DType::F32) return static_cast<const float*>(base)[i];
  uint16_t h;
  std::memcpy(&h, static_cast<const uint8_t*>(base) + 2 * i, 2);
  const uint32_t bits = uint32_t(h) << 16;  // bf16 (only bf16/f32 used here)
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Stores positions length()..length()+n-1 of every slot (with row padding
// in the source, as the model's workspace may have) and advances.
void store_chunk(SequenceCache& c, int64_t n) {
  const int64_t ldk = kK + 2, ldv = kV + 1;
  const int n_slots = int(c.layout().kv_global.size());
  for (int s = 0; s < n_slots; ++s) {
    std::vector<float> k(size_t(std::max<int64_t>(n, 1) * ldk), 999.0f),
        v(size_t(std::max<int64_t>(n, 1) * ldv), 999.0f);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j < kK; ++j) k[t * ldk + j] = k_value(s, c.length() + t, j);
      for (int64_t j = 0; j < kV; ++j) v[t * ldv + j] = v_value(s, c.length() + t, j);
    }
    c.store_kv(s, k.data(), ldk, v.data(), ldv, n);
  }
  c.advance(n);
}

const DType kDtypes[] = {DType::F32, DType::BF16};

// Checks the segments of every slot against what must be visible.
void check_segments(const SequenceCache& c) {
  const int64_t len = c.length();
  const CacheLayout& l = c.layout();
  for (int s = 0; s < int(l.kv_global.size()); ++s) {
    SCOPED_TRACE("slot " + std::to_string(s) + " length " + std::to_string(len));
    // Positions that must be present.
    std::vector<int64_t> want;
    if (l.kv_global[s]) {
      for (int64_t p = 0; p < len; ++p) want.push_back(p);
    } else {
      for (int64_t p = 0; p < std::min(len, l.n_meta); ++p) want.push_back(p);
      const int64_t real = std::max<int64_t>(0, len - l.n_meta);
      const int64_t keep = std::min(real, std::min(l.window, c.max_tokens()));
      for (int64_t p = len - keep; p < len; ++p) want.push_back(p);
    }
    KVSegment segs[8];
    const int n = c.kv_segments(s, segs);
    ASSERT_GE(n, 0);
    ASSERT_LE(n, 3);  // the header promises at most 3
    std::vector<int64_t> got;
    for (int i = 0; i < n; ++i) {
      const KVSegment& g = segs[i];
      EXPECT_EQ(g.dtype, l.kv_dtype);
      EXPECT_GE(g.ld_k, kK);
      EXPECT_GE(g.ld_v, kV);
      EXPECT_GT(g.count, 0) << "empty segment " << i;
      for (int64_t r = 0; r < g.count; ++r) {
        const int64_t p = g.pos0 + r;
        got.push_back(p);
        for (int64_t j = 0; j < kK; ++j)
          ASSERT_EQ(read_elem(g.k, g.dtype, r * g.ld_k + j), k_value(s, p, j))
              << "K of position " << p << " elem " << j;
        for (int64_t j = 0; j < kV; ++j)
          ASSERT_EQ(read_elem(g.v, g.dtype, r * g.ld_v + j), v_value(s, p, j))
              << "V of position " << p << " elem " << j;
      }
    }
    std::sort(got.begin(), got.end());
    EXPECT_EQ(got, want);  // exactly these positions, each once
  }
}

TEST(CacheRing, ChunksOfVaryingSize) {
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    // Chunk sizes 1, 2, 7 and larger than the window, crossing the meta
    // boundary and wrapping the ring many times.
    const std::vector<std::vector<int64_t>> schedules = {
        {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
        {2, 7, 1, 9, 2, 1, 7, 12, 1, 1},
        {3, 5, 5, 6, 1, 17},
        {7, 2, 7, 2, 7, 2, 1},
        {20, 1, 1},
        {43},
    };
    for (const auto& sched : schedules) {
      SequenceCache c(small_layout(dt), 40);
      EXPECT_EQ(c.length(), 0);
      check_segments(c);
      for (int64_t n : sched) {
        ASSERT_LE(n, c.remaining());
        store_chunk(c, n);
        check_segments(c);
      }
    }
  }
}

TEST(CacheRing, ContextShorterThanWindow) {
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    // max_tokens < window: the ring holds max_tokens rows and every real
    // position stays visible.
    SequenceCache c(small_layout(dt), 3);
    for (int64_t n : {2, 2, 1, 1}) {
      store_chunk(c, n);
      check_segments(c);
    }
    EXPECT_EQ(c.remaining(), 0);
  }
}

TEST(CacheRing, ExceedingContextThrows) {
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    SequenceCache c(small_layout(dt), 10);
    store_chunk(c, 12);
    EXPECT_EQ(c.remaining(), 1);
    std::vector<float> k(2 * kK, 1.0f), v(2 * kV, 1.0f);
    EXPECT_THROW(c.store_kv(0, k.data(), kK, v.data(), kV, 2), Error);
    EXPECT_THROW(c.store_kv(1, k.data(), kK, v.data(), kV, 2), Error);
    EXPECT_THROW(c.advance(2), Error);
    // The failed calls changed nothing: the last position still fits.
    check_segments(c);
    store_chunk(c, 1);
    check_segments(c);
    EXPECT_THROW(store_chunk(c, 1), Error);
  }
}

TEST(CacheRing, CopyFrom) {
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    const CacheLayout l = small_layout(dt);
    SequenceCache a(l, 40);
    store_chunk(a, 2);
    store_chunk(a, 9);
    store_chunk(a, 4);
    for (int layer = 0; layer < l.n_layers; ++layer) {
      for (size_t i = 0; i < size_t((l.d_conv - 1) * l.d_inner); ++i)
        a.conv_state(layer)[i] = float(layer * 100 + i);
      for (size_t i = 0; i < size_t(l.d_inner * l.d_state); ++i)
        a.ssm_state(layer)[i] = -float(layer * 100 + i);
    }
    // Into a cache of the same size, and one with a longer context (same ring).
    for (int64_t max_tokens : {40, 60}) {
      SCOPED_TRACE("destination max_tokens " + std::to_string(max_tokens));
      SequenceCache b(l, max_tokens);
      store_chunk(b, 7);  // stale contents must not survive
      b.copy_from(a);
      EXPECT_EQ(b.length(), a.length());
      check_segments(b);
      for (int layer = 0; layer < l.n_layers; ++layer) {
        for (size_t i = 0; i < size_t((l.d_conv - 1) * l.d_inner); ++i)
          EXPECT_EQ(b.conv_state(layer)[i], float(layer * 100 + i));
        for (size_t i = 0; i < size_t(l.d_inner * l.d_state); ++i)
          EXPECT_EQ(b.ssm_state(layer)[i], -float(layer * 100 + i));
      }
      // The copy continues like the original.
      store_chunk(b, 3);
      store_chunk(a, 3);
      check_segments(b);
      check_segments(a);
    }
  }
}

TEST(CacheRing, CopyMetaSnapshotIntoSmallerContext) {
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    // The meta-prefix snapshot (spec 5.4) is copied into sequences of any
    // context length, including ones whose ring is smaller than the window.
    const CacheLayout l = small_layout(dt);
    SequenceCache meta(l, 40);
    store_chunk(meta, 2);
    store_chunk(meta, 1);
    ASSERT_EQ(meta.length(), kMeta);
    SequenceCache small(l, 2);
    small.copy_from(meta);
    check_segments(small);
    store_chunk(small, 2);
    check_segments(small);
    // Once real positions are stored, rings of different sizes cannot be copied.
    SequenceCache other(l, 4);
    EXPECT_THROW(other.copy_from(small), Error);
    // Nor can a longer sequence be copied into a shorter context.
    SequenceCache big(l, 40);
    store_chunk(big, 20);
    SequenceCache tiny(l, 5);
    EXPECT_THROW(tiny.copy_from(big), Error);
  }
}

TEST(CacheRingLayout, NoMetaTokens) {
  // M = 0: the sliding slot is a pure ring.
  CacheLayout l = small_layout(DType::F32);
  l.n_meta = 0;
  SequenceCache c(l, 30);
  for (int64_t n : {1, 6, 2, 5, 5, 1, 10}) {
    store_chunk(c, n);
    check_segments(c);
  }
}

}  // namespace
}  // namespace hymba
