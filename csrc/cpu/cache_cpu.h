// fastprune's CPU block cache: large outputs (masks, pruned tensors) reuse
// the memory of earlier ones instead of faulting in fresh pages.
#pragma once

#include <ATen/ATen.h>

namespace fastprune {

// An uninitialized CPU tensor with the sizes and strides
// at::empty_like(like, dtype, format) would give. From kCachedBytes on, its
// memory comes from the block cache and goes back there when the tensor's
// storage dies; smaller ones are plain at::empty_like results.
at::Tensor cached_empty_like(const at::Tensor& like, at::ScalarType dtype, at::MemoryFormat format);

}  // namespace fastprune
