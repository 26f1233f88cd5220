// Guarded host buffers and input reading, shared by the kernel emulation harnesses
// (endor_decode_emulate.cu, endor_crc_emulate.cu).
//
// Every buffer a kernel touches is its own allocation of exactly its size. Default: mmap with an
// inaccessible page on each side, the buffer placed against the trailing guard page (as close as
// its alignment allows) and the slack filled with a canary that intact() verifies afterwards, so
// an overrun faults or is reported. g_malloc: plain posix_memalign, for running under valgrind,
// which checks every byte read and written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <sys/mman.h>
#include <unistd.h>

// The kernels' ENDOR_INVARIANT (-DENDOR_EMULATE) calls this: a violated invariant ends the run.
inline void endor_emulate_invariant(bool ok, const char* what, const char* file, int line) {
  if (!ok) {
    std::fprintf(stderr, "INVARIANT VIOLATED: %s (%s:%d)\n", what, file, line);
    std::exit(3);
  }
}

namespace emulate {

inline bool g_malloc = false;
const unsigned char kCanary = 0xCD;  // slack bytes around buffers: must be unchanged afterwards

struct Buffer {
  unsigned char* p = nullptr;  // the buffer, `size` bytes, at remainder mod modulus
  size_t size = 0;
  unsigned char* map = nullptr;  // guard mode: the whole mapping; malloc mode: the allocation
  size_t map_len = 0;
};

[[noreturn]] inline void die(const char* msg) {
  std::fprintf(stderr, "harness: %s\n", msg);
  std::exit(2);
}

// `size` bytes at an address equal to `remainder` modulo `modulus` (a power of two, at least 16).
inline Buffer alloc(size_t size, size_t modulus = 16, size_t remainder = 0) {
  Buffer b;
  b.size = size;
  if (g_malloc) {
    void* p = nullptr;
    if (posix_memalign(&p, modulus, size + remainder ? size + remainder : 1)) die("posix_memalign failed");
    b.map = static_cast<unsigned char*>(p);
    b.p = b.map + remainder;
    return b;
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t inner = (size + modulus + page - 1) / page * page;
  b.map_len = inner + 2 * page;
  void* m = mmap(nullptr, b.map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) die("mmap failed");
  b.map = static_cast<unsigned char*>(m);
  if (mprotect(b.map, page, PROT_NONE) || mprotect(b.map + page + inner, page, PROT_NONE))
    die("mprotect failed");
  std::memset(b.map + page, kCanary, inner);
  const uintptr_t end = reinterpret_cast<uintptr_t>(b.map + page + inner);
  b.p = reinterpret_cast<unsigned char*>((end - size - remainder) / modulus * modulus + remainder);
  return b;
}

// Guard mode: the slack around the buffer still holds the canary.
inline bool intact(const Buffer& b) {
  if (g_malloc) return true;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (unsigned char* q = b.map + page; q < b.map + b.map_len - page; ++q) {
    if ((q < b.p || q >= b.p + b.size) && *q != kCanary) return false;
  }
  return true;
}

inline void release(Buffer& b) {
  if (g_malloc) {
    std::free(b.map);
  } else {
    munmap(b.map, b.map_len);
  }
  b = Buffer();
}

inline void read_exact(FILE* f, void* dst, size_t n) {
  if (n && std::fread(dst, 1, n, f) != n) die("input file is truncated");
}

inline uint32_t read_u32(FILE* f) {
  uint32_t v;
  read_exact(f, &v, 4);
  return v;
}

}  // namespace emulate
