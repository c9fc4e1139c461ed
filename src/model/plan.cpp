#include "model/plan.h"

#include <set>

namespace hymba {

std::string LayerPlan::role() const {
  if (!owns_kv) return "consumer";
  if (!consumers.empty()) return global ? "global-producer" : "producer";
  return global ? "global" : "sliding";
}

ModelPlan ModelPlan::build(const HymbaConfig& c) {
  ModelPlan p;
  std::set<int> globals;
  if (c.global_attn_idx) globals.insert(c.global_attn_idx->begin(), c.global_attn_idx->end());
  p.layers.resize(c.num_hidden_layers);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    LayerPlan& l = p.layers[i];
    l.index = i;
    // Without a window every layer attends globally (the reference builds
    // no sliding-window mask when sliding_window is null).
    l.global = !c.sliding_window.has_value() || globals.count(i) > 0;
    l.kv_layer = i;
  }
  if (c.kv_reuse_group) {
    for (const auto& group : *c.kv_reuse_group) {
      for (size_t k = 1; k < group.size(); ++k) {
        p.layers[group[k]].owns_kv = false;
        p.layers[group[k]].kv_layer = group[0];
        p.layers[group[0]].consumers.push_back(group[k]);
      }
    }
  }
  for (auto& l : p.layers) {
    if (l.owns_kv) {
      l.kv_slot = int(p.kv_owner.size());
      p.kv_owner.push_back(l.index);
    }
  }
  for (auto& l : p.layers)
    if (!l.owns_kv) l.kv_slot = p.layers[l.kv_layer].kv_slot;
  return p;
}

}  // namespace hymba
