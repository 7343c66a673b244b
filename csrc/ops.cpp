// fastprune._C: the one schema block of the fastprune namespace.
//
// Kernels live in csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu and register
// themselves with TORCH_LIBRARY_IMPL; fake (meta) kernels live in
// python/fastprune/_meta.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A plain module init so that `import fastprune._C` loads this shared
// library (and with it the registrations below) under the limited API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastprune, m) {
  // New mask for unstructured pruning by magnitude: a copy of `mask` (same
  // dtype) in which exactly k candidates with the smallest |scores| (largest
  // |scores| when `largest`) are set to 0. Candidates are all entries, or only
  // those where mask == 1 when `only_ones`. k = count if count >= 0, else
  // round-half-even(fraction * candidates). Ties at the threshold: the lower
  // row-major flat index is pruned first. NaN ranks above +inf.
  m.def(
      "unstructured_mask(Tensor scores, Tensor mask, int count, float fraction, "
      "bool only_ones, bool largest) -> Tensor");
  // The same select over several tensors ranked as one concatenation (in list
  // order, which also orders ties), without concatenating: one new mask per
  // tensor. All scores share one floating dtype; masks may differ.
  m.def(
      "global_unstructured_masks(Tensor[] scores, Tensor[] masks, int count, "
      "float fraction, bool only_ones, bool largest) -> Tensor[]");
  // The separable passes of the magnitude select, for a caller that ranks
  // tensors spread over several processes (fastprune.distributed): each
  // process runs a pass on its own tensors, the results are summed across
  // processes, and every process derives the same next step. Keys are those
  // of unstructured_mask (|score|, NaN above inf, mirrored when `largest`);
  // they are below 2^63 and travel as non-negative ints. Digits are 11 bits
  // wide, counted from the most significant: a key of b bits has ceil(b / 11)
  // digits (2 for float16/bfloat16, 3 for float32, 6 for float64). Tensors
  // are ranked as one concatenation in list order, as in
  // global_unstructured_masks; candidates are as there.
  //
  // Counts (int64, 2048 bins, on the scores' device) of digit `digit` over
  // the candidates whose higher digits equal those of `prefix` (its bits at
  // and below digit `digit` are ignored).
  m.def(
      "radix_histogram(Tensor[] scores, Tensor[] masks, int digit, int prefix, "
      "bool only_ones, bool largest) -> Tensor");
  // Per tensor (int64, one per tensor, on the scores' device): the candidates
  // whose key is `key`.
  m.def(
      "count_at_key(Tensor[] scores, Tensor[] masks, int key, bool only_ones, "
      "bool largest) -> Tensor");
  // One new mask per tensor, as global_unstructured_masks shapes it: of the
  // candidates, those with key < `key` are 0, and so are those with key ==
  // `key` whose tie number lies in [skip, skip + take) (ties numbered from 0
  // in concatenation order: lower tensor, then lower row-major flat index).
  // Every other entry equals the mask.
  m.def(
      "masks_at_threshold(Tensor[] scores, Tensor[] masks, int key, int skip, "
      "int take, bool only_ones, bool largest) -> Tensor[]");
  // One step of the radix descent (csrc/common/select.h's radix_step) on a
  // histogram of digit `digit` as radix_histogram counts it (summed across
  // processes), for keys of `dtype` scores: where the rank-th smallest
  // counted key (1-based, in [1, hist.sum()]) falls. Returns [prefix', rank',
  // count, last]: `prefix` (its digits above `digit`; lower bits ignored) with
  // digit `digit` set to that key's, its rank among the candidates whose key
  // starts with prefix', their number (the bin's count), and 1 when `digit`
  // is the last digit (prefix' is then the threshold key and count its ties),
  // else 0. Host arithmetic on 2048 int64 counts, on any device (a CPU
  // histogram is read in place); tagged data-dependent: tracing cannot know
  // its result, so it has no fake kernel.
  m.def(
      "radix_step(Tensor hist, int digit, int prefix, int rank, ScalarType dtype) -> int[]",
      {at::Tag::data_dependent_output});
  // New mask for pruning inside segments (N:M groups, per-channel exact k):
  // a copy of `mask` (same dtype) in which, in every segment, the k live
  // entries (mask == 1) with the smallest |scores| are set to 0, ties to the
  // lower position in the segment (row-major), NaN above +inf. Segments:
  // when group == 0, every slice t.select(dim, i); when group > 0, every run
  // of `group` consecutive entries along `dim` (its size a multiple of group),
  // all other indices fixed. Per segment with `live` live entries: k =
  // max(live - count, 0) when `keep` (at most `count` stay), else k = count if
  // count >= 0, else round-half-even(fraction * live); k > live is a
  // ValueError. Entries that are not live keep their mask value.
  m.def(
      "segmented_mask(Tensor scores, Tensor mask, int dim, int group, int count, "
      "float fraction, bool keep) -> Tensor");
  // Packed masks (the in-place layout's mask="bits"): one bit per entry. A
  // tensor is read as rows of its last dimension (0-d: one row of one entry);
  // a row of n entries packs into ceil(n / 8) bytes, entry 8 b + j in bit j
  // (least significant first) of byte b, padding bits 0. The packed shape is
  // (*shape[:-1], ceil(shape[-1] / 8)), (1,) for 0-d.
  //
  // The packed mask of `mask` (any dtype): bit set where the entry is nonzero.
  m.def("pack_mask(Tensor mask) -> Tensor");
  // The bool mask of shape (*packed.shape[:-1], n) that `packed` holds.
  m.def("unpack_mask(Tensor packed, int n) -> Tensor");
  // Zeroes the entries of the contiguous tensor `t` whose bit in `packed`
  // (t's packed shape) is clear; the others keep their value.
  m.def("mask_packed_(Tensor(a!) t, Tensor packed) -> ()");
  // The global magnitude select of the in-place layout, in place: of the live
  // entries of all tensors (ranked as one concatenation in list order, as in
  // global_unstructured_masks with only_ones), the `count` with the smallest
  // |scores| (largest when `largest`; NaN above +inf; ties: lower position
  // first) are pruned: their bit in `masks` is cleared and their entry in
  // `values` set to 0 (any dtype; `values` may be `scores`). A mask is a bool
  // tensor of the values' shape (live: true) or their packed mask (live: bit
  // set). Values and masks are contiguous; count > live entries is a
  // ValueError, raised before anything is written.
  m.def(
      "prune_in_place_(Tensor(a!)[] values, Tensor[] scores, Tensor(b!)[] masks, int count, "
      "bool largest) -> ()");
  // The norm of every slice of `t` along `dim` (all other dimensions reduced),
  // as float64 of shape (t.size(dim),): p = inf is max |x|, -inf min |x|, 0
  // the count of non-zeros, else (sum |x|^p)^(1/p), as torch.linalg.vector_norm
  // (NaN propagates). Any strides; the result ranks the channels of
  // structured pruning.
  m.def("channel_norms(Tensor t, int dim, float p) -> Tensor");
  // An uninitialized tensor like `t` (dtype, sizes, strides). On the CPU, from
  // the cache's min_bytes on, its memory is a block of fastprune's CPU block
  // cache that earlier outputs gave back (pages already mapped), and returns
  // there when the tensor dies.
  m.def("cached_empty_like(Tensor t) -> Tensor");
  // The CPU block cache's state: [cached bytes, limit, min_bytes, hits, misses].
  m.def("cache_info() -> int[]");
  // Sets the cache's limit (bytes it may hold; 0 turns it off) and min_bytes
  // (smallest output it serves); a negative value keeps the current one.
  // Frees the blocks above the limit; returns cache_info() as it was before.
  m.def("configure_cache(int limit, int min_bytes) -> int[]");
  // Returns every cached block to the OS; the result is the bytes freed.
  m.def("empty_cache() -> int");
}
