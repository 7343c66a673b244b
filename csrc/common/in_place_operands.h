// Host-side argument handling of prune_in_place_, shared by the CPU and CUDA
// kernels: each (values, scores, mask) triple checked, and described as a
// Target the CPU select walks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "bits.h"

namespace fastprune {

// One tensor pruned in place.
struct Target {
  at::Tensor kept_scores;  // the contiguous scores (keeps a copy alive)
  const void* scores;
  void* values;  // contiguous, value_size bytes per entry
  int64_t value_size;
  void* mask;   // bool, one per entry, or packed bits
  int64_t row;  // > 0: packed rows of this many entries; 0: a bool mask
  int64_t numel;
};

inline std::vector<Target> make_targets(at::TensorList values, at::TensorList scores, at::TensorList masks) {
  TORCH_CHECK(
      values.size() == scores.size() && scores.size() == masks.size(), "prune_in_place_: got ",
      values.size(), " values, ", scores.size(), " scores and ", masks.size(), " masks");
  std::vector<Target> targets;
  for (size_t i = 0; i < values.size(); ++i) {
    const at::Tensor &v = values[i], &s = scores[i], &m = masks[i];
    TORCH_CHECK(at::isFloatingType(s.scalar_type()) && s.scalar_type() == scores[0].scalar_type(),
                "prune_in_place_: scores must share one floating dtype, got ", s.scalar_type(), " and ",
                scores[0].scalar_type());
    TORCH_CHECK(s.sizes() == v.sizes(), "prune_in_place_: scores of shape ", s.sizes(), " for values of shape ",
                v.sizes());
    TORCH_CHECK(v.is_contiguous() && m.is_contiguous(), "prune_in_place_: values and masks must be contiguous");
    TORCH_CHECK(v.device() == values[0].device() && s.device() == v.device() && m.device() == v.device(),
                "prune_in_place_: all tensors must be on one device");
    const bool packed = m.scalar_type() == at::kByte;  // else bool
    if (packed) {
      check_packed("prune_in_place_", v, m);
    } else {
      TORCH_CHECK(m.scalar_type() == at::kBool && m.sizes() == v.sizes(),
                  "prune_in_place_: a mask is bool of the values' shape or their packed uint8 mask, got ",
                  m.scalar_type(), " of shape ", m.sizes(), " for values of shape ", v.sizes());
    }
    if (v.numel() == 0) continue;
    Target t;
    t.kept_scores = s.contiguous();
    t.scores = t.kept_scores.const_data_ptr();
    t.values = v.mutable_data_ptr();
    t.value_size = v.element_size();
    t.mask = m.mutable_data_ptr();
    t.row = packed ? packed_rows(v.sizes()).n : 0;
    t.numel = v.numel();
    targets.push_back(std::move(t));
  }
  return targets;
}

}  // namespace fastprune
