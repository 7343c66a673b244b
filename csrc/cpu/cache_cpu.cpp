// The CPU block cache behind fastprune's large outputs.
//
// Every prune creates two tensors the size of the parameter (the mask and the
// pruned `mask * orig` the hook keeps), and every forward of a pruned module
// creates the latter again. A fresh 64 MB tensor costs 20-30 ms to fault in,
// page by page, on a 2-core VM: more than the select. glibc returns blocks
// that large to the OS when they are freed (it maps everything above its
// mmap threshold, at most 32 MiB, anew), so in a process that prunes or runs
// forwards repeatedly every output pays that cost again.
//
// So outputs of at least `min_bytes` (default 32 MiB) get their memory from
// here: a block from c10::alloc_cpu (torch's own aligned allocation), handed
// out through a DataPtr whose deleter gives it back to a free list instead of
// to the OS when the tensor's storage dies. An allocation takes the smallest
// free block that fits with at most 1/8 to spare, pages already mapped. The
// free list holds at most `limit` bytes (default 1 GiB; the oldest blocks go
// first); empty_cache() returns it all to the OS, and a limit of 0 turns the
// cache off. Nothing outside fastprune's own outputs is affected.
#include "cache_cpu.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace fastprune {
namespace {

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    size_t size = nbytes;
    void* data = take(&size);
    if (data == nullptr) data = c10::alloc_cpu(size);
    return {data, new Block{data, size}, &BlockCache::give_back, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Whether an output of `nbytes` takes its memory from here.
  bool serves(int64_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_ > 0 && nbytes > 0 && nbytes >= min_bytes_;
  }

  // [cached bytes, limit, min_bytes, hits, misses]
  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, limit_, min_bytes_, hits_, misses_};
  }

  // Sets the limit and the smallest size cached (a negative value keeps the
  // current one); frees what no longer fits. Returns info() as it was.
  std::vector<int64_t> configure(int64_t limit, int64_t min_bytes) {
    std::vector<int64_t> old = info();
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (limit >= 0) limit_ = limit;
      if (min_bytes >= 0) min_bytes_ = min_bytes;
      evict_to(limit_, &evicted);
    }
    free_all(evicted);
    return old;
  }

  // Frees every cached block; returns the bytes freed.
  int64_t empty() {
    std::vector<void*> evicted;
    int64_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed = cached_;
      evict_to(0, &evicted);
    }
    free_all(evicted);
    return freed;
  }

 private:
  struct Block {
    void* data;
    size_t size;
  };

  // The smallest free block of *size to *size * 9/8 bytes, taken off the
  // list (*size set to its size), or nullptr.
  void* take(size_t* size) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t want = *size;
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->size >= want && it->size <= want + want / 8 &&
          (best == free_.end() || it->size < best->size)) {
        best = it;
      }
    }
    if (best == free_.end()) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    void* data = best->data;
    *size = best->size;
    cached_ -= static_cast<int64_t>(best->size);
    free_.erase(best);
    return data;
  }

  static void give_back(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    instance().put(*block);
    delete block;
  }

  void put(Block block) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(block);  // newest last
      cached_ += static_cast<int64_t>(block.size);
      evict_to(limit_, &evicted);
    }
    free_all(evicted);
  }

  // Drops the oldest blocks until at most `bytes` are cached (lock held).
  void evict_to(int64_t bytes, std::vector<void*>* evicted) {
    size_t n = 0;
    while (n < free_.size() && cached_ > bytes) {
      evicted->push_back(free_[n].data);
      cached_ -= static_cast<int64_t>(free_[n].size);
      ++n;
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(n));
  }

  static void free_all(const std::vector<void*>& blocks) {
    for (void* data : blocks) c10::free_cpu(data);
  }

 public:
  // Never destroyed: storages may die (and give blocks back) at exit.
  static BlockCache& instance() {
    static auto* cache = new BlockCache();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::vector<Block> free_;  // oldest first
  int64_t cached_ = 0;
  int64_t limit_ = int64_t{1} << 30;
  int64_t min_bytes_ = int64_t{32} << 20;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

at::Tensor cached_empty_like_op(const at::Tensor& t) {
  return cached_empty_like(t, t.scalar_type(), at::MemoryFormat::Preserve);
}

std::vector<int64_t> cache_info() { return BlockCache::instance().info(); }

std::vector<int64_t> configure_cache(int64_t limit, int64_t min_bytes) {
  return BlockCache::instance().configure(limit, min_bytes);
}

int64_t empty_cache() { return BlockCache::instance().empty(); }

}  // namespace

at::Tensor cached_empty_like(const at::Tensor& like, at::ScalarType dtype, at::MemoryFormat format) {
  const auto nbytes = static_cast<int64_t>(like.numel()) * static_cast<int64_t>(c10::elementSize(dtype));
  BlockCache& cache = BlockCache::instance();
  if (!cache.serves(nbytes)) {
    return at::empty_like(like, like.options().dtype(dtype), format);
  }
  // The sizes and strides empty_like would choose, without allocating.
  const at::Tensor layout = at::empty_like(like, like.options().dtype(dtype).device(at::kMeta), format);
  return at::detail::empty_strided_generic(
      layout.sizes(), layout.strides(), &cache, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
}

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("cached_empty_like", &cached_empty_like_op);
}

TORCH_LIBRARY_IMPL(fastprune, CompositeExplicitAutograd, m) {
  m.impl("cache_info", &cache_info);
  m.impl("configure_cache", &configure_cache);
  m.impl("empty_cache", &empty_cache);
}

}  // namespace fastprune
