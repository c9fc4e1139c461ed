// The layer plan: which attention each layer runs (global or sliding window),
// and who computes the K/V it attends over (itself, or the producer of its
// kv_reuse_group). Derived once from the config; the cache and the forward
// pass both follow it.
#pragma once

#include <string>
#include <vector>

#include "io/config.h"

namespace hymba {

struct LayerPlan {
  int index = 0;
  bool global = true;    // full causal attention; else sliding window + meta tokens
  bool owns_kv = true;   // computes K/V (its in_proj has K and V rows)
  int kv_layer = 0;      // layer whose K/V it attends over (itself when owns_kv)
  int kv_slot = 0;       // index of that K/V in the cache's KV list
  std::vector<int> consumers;  // layers that reuse this layer's K/V

  // "global", "sliding" (own K/V, nobody else reads it), "producer" or "consumer".
  std::string role() const;
};

struct ModelPlan {
  std::vector<LayerPlan> layers;
  std::vector<int> kv_owner;  // kv_slot -> layer that owns it
  static ModelPlan build(const HymbaConfig& c);
};

}  // namespace hymba
