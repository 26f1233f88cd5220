/*
 * endor_decode.cu: rebuild dense fp16 / bf16 / fp32 weights on the GPU from format v1
 * (bitmap + packed values + tile offsets; spec: docs/format.md, section 1).
 *
 * Who uses this file
 *   - endor_gds/kernels.py compiles it at run time with NVRTC (CuPy RawModule, options
 *     kernels.NVRTC_OPTIONS) and launches `endor_decode_bitmap`, once per layer.
 *   - tests/test_cuda_compile.py compiles it with nvcc for sm_80 and sm_90, warnings as errors.
 *   - tests/endor_decode_emulate.cu includes it with -DENDOR_EMULATE and runs the very same
 *     per-thread functions below for every thread of every block on the CPU, so the decode logic,
 *     the index math and the guards are tested bit-exactly on machines without a GPU.
 *   It includes no header at all: NVRTC has no system headers.
 *
 * One launch, all tensors of a layer
 *   The caller passes a small table of descriptors (Desc, below) in device memory, one per
 *   bitmap tensor of the layer. Tensor k owns global tiles [first_tile_k, first_tile_k + ntiles_k)
 *   and the grid has one block per tile of the whole layer, so a 7-tensor Llama layer is one
 *   launch instead of seven, and small tensors (k/v projections) share the GPU with large ones
 *   instead of running as tail-heavy launches of their own. A block finds its tensor by a binary
 *   search over the first_tile fields (a handful of broadcast loads that hit L1).
 *
 * One block = one tile of 4096 elements = 128 bitmap words, 128 threads
 *   1. Tile offsets t and t+1 say where the tile's values are: values[lo, hi). This is what lets
 *      every tile decode on its own, with no scan over the tensor. Every thread reads the same two
 *      words (broadcast); they are checked before anything is read through them.
 *   2. Thread i loads bitmap word i of the tile (coalesced 4-byte loads).
 *   3. The tile's values are staged into shared memory with 16-byte loads by consecutive threads
 *      (coalesced: a warp moves 512 contiguous bytes per instruction), from the 16-byte aligned
 *      window around [lo, hi). Staging does not depend on the bitmap, so the word load and the
 *      staging loads are in flight together. Then each thread counts its word's bits; a
 *      block exclusive scan (warp shuffles, then the 4 warp totals through shared memory) turns
 *      the counts into each word's first value index. The tile total must equal hi - lo.
 *   4. Output: the tile's dense bytes are written as 16-byte chunks, chunk c by thread c mod 128,
 *      so each warp store instruction writes 512 contiguous bytes (fully coalesced). A chunk is 8
 *      fp16/bf16 or 4 fp32 elements, i.e. one byte or one nibble of one bitmap word: its first
 *      value index is that word's scan result plus the popcount of the word's lower bits, and its
 *      values come from shared memory. (One thread writing its own word's 32 outputs would store
 *      64 or 128 bytes per thread, strided across the warp; the dense output is the largest
 *      stream of the decode, so it gets the coalesced pattern.)
 *   Bitmap and values are read exactly once, hence the L1::no_allocate loads: they should not
 *   evict the descriptors and tile offsets that all threads share.
 *
 * Decoding moves bit patterns: fp16 and bf16 share the 2-byte path, fp32 uses the 4-byte path;
 * the element size is a per-descriptor field (dtype table: endor_gds/kernels.py).
 *
 * Safety: the file is untrusted. Whatever the bitmap and the tile offsets say, the kernel reads
 * only [bitmap, bitmap + 4*ceil(n/32)), [values, values + values_capacity),
 * tile_offsets[0..ntiles], and writes only out[0..n). The host (kernels.GpuDecoder.make_table)
 * guarantees the descriptor itself: 1 <= n < 2^32, nnz * elem_bytes <= values_capacity,
 * elem_bytes in {2, 4}, the alignments below, and consecutive first_tile values. The kernel checks
 * everything that comes from the file:
 *   - lo <= hi <= nnz and hi - lo <= 4096 (else the staging loads could leave the segment or
 *     overflow shared memory), tile_offsets[0] == 0 and tile_offsets[ntiles] == nnz: reason
 *     kBadOffsets, checked before any value is read;
 *   - bits at positions >= n in the tensor's last word must be clear: kBitsPastEnd;
 *   - the tile's popcount must equal hi - lo: kCountMismatch. Together with the first check this
 *     bounds every value index by hi (the emulation asserts it at each read).
 *   A bad tile writes nothing and records (descriptor, tile, reason) in *error with atomicMin, so
 *   the first bad tile in table order is reported, deterministically. Other tiles of the launch
 *   may have been written: the caller treats the whole launch's outputs as invalid.
 *
 * Alignment required of the pointers (checked by make_table): bitmap and tile_offsets 4 bytes,
 * values 16 bytes (the 16-byte staging loads start at values + a multiple of 16, never before
 * values), out 16 bytes (tile t starts at out + 4096 * t * elem_bytes, a multiple of 16). Outputs
 * must not overlap inputs (the input loads use the read-only data path).
 */

#ifndef ENDOR_TILE_ELEMS
#error "compile with -DENDOR_TILE_ELEMS=<endor_gds.format.TILE_ELEMS> (see kernels.NVRTC_OPTIONS)"
#endif

#if defined(ENDOR_EMULATE) && !defined(__CUDA_ARCH__)
// Host emulation only: the harness defines endor_emulate_invariant() and aborts on a violation.
#define ENDOR_INVARIANT(cond) ::endor_emulate_invariant((cond), #cond, __FILE__, __LINE__)
#else
#define ENDOR_INVARIANT(cond) ((void)0)
#endif

#define ENDOR_HD __host__ __device__ __forceinline__

namespace endor {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

constexpr u32 kTileElems = ENDOR_TILE_ELEMS;  // elements per tile (format.TILE_ELEMS)
constexpr u32 kWordBits = 32;                  // elements per bitmap word
constexpr u32 kThreads = kTileElems / kWordBits;  // threads per block: one per bitmap word
constexpr u32 kWarps = kThreads / 32;          // warps per block
constexpr u32 kChunk = 16;                     // bytes per vector load / store
constexpr u32 kStageSlack = kChunk;            // staging window = values + alignment, see stage_bytes
// Resident blocks per SM the kernel is built for: 16 x 128 = 2048 threads, full occupancy on
// sm_80/sm_90, to hide DRAM latency in this memory-bound kernel. It caps registers at 32 per
// thread, which the kernel fits without spilling (tests/test_cuda_compile.py fails on any spill).
// Shared memory per block is 9.2 KB for fp16/bf16 tables (+1 KB the driver reserves): 16 blocks
// fit an sm_90 SM (228 KB), about 15 an sm_80 SM (164 KB); a table holding fp32 (17.4 KB a block)
// runs about 12 and 8.
constexpr u32 kMinBlocksPerSM = 16;
static_assert(kTileElems == 4096, "the block layout (128 threads, one word each) assumes 4096-element tiles");
static_assert(kThreads % 32 == 0 && kWarps <= 32, "the scan keeps one total per warp");

// Shared memory for a tile's staged values when the largest element in the table is
// `elem_bytes`: the window [floor16(lo*eb), ceil16(hi*eb)) is at most (hi-lo)*eb + 30 bytes and a
// multiple of 16, so 4096*eb + 16. The host passes this as the dynamic shared memory size.
ENDOR_HD u32 stage_bytes(u32 elem_bytes) { return kTileElems * elem_bytes + kStageSlack; }

// One bitmap tensor of the layer (built and uploaded once by kernels.GpuDecoder.make_table; the
// byte layout is kernels.DESC_DTYPE, and the emulation test checks the two agree).
struct Desc {
  const u32* bitmap;        // ceil(n/32) little-endian words; bit j of word w = element 32w+j
  const u8* values;         // the nnz packed non-zero values, elem_bytes each; 16-byte aligned
  u64 values_capacity;      // bytes readable at values (>= nnz*elem_bytes; the padded segment)
  const u32* tile_offsets;  // ntiles+1 entries: values of tile t are [off[t], off[t+1])
  u8* out;                  // n*elem_bytes dense output; 16-byte aligned
  u64 n;                    // elements of the tensor, 1 <= n < 2^32
  u64 nnz;                  // number of packed values
  u64 first_tile;           // global tile index of this tensor's tile 0 (= block index)
  u32 elem_bytes;           // 2 (fp16, bf16) or 4 (fp32)
  u32 reserved;             // 0; pads the struct to 8-byte alignment
};
static_assert(sizeof(Desc) == 72, "Desc must match kernels.DESC_DTYPE");

// Why a tile was rejected. The error word holds desc << 40 | tile << 8 | reason, so atomicMin
// keeps the first bad tile in table order (tile < 2^20 because n < 2^32; desc < 2^24 by make_table);
// the host sets it to ~0 (no error) before each launch.
enum Reason : u32 {
  kOk = 0,
  kBadOffsets = 1,     // lo > hi, hi > nnz, > kTileElems values, or the table not from 0 to nnz
  kBitsPastEnd = 2,    // a bit at a position >= n is set in the tensor's last word
  kCountMismatch = 3,  // the tile's popcount differs from hi - lo
};

ENDOR_HD u64 error_key(u32 desc, u64 tile, u32 reason) {
  ENDOR_INVARIANT(desc < (1u << 24) && tile < (1ull << 32) && reason < 256);
  return (static_cast<u64>(desc) << 40) | (tile << 8) | reason;
}

ENDOR_HD u32 popc32(u32 x) {
#ifdef __CUDA_ARCH__
  return __popc(x);
#else
  return static_cast<u32>(__builtin_popcount(x));
#endif
}

// A 16-byte vector (NVRTC has no vector_types.h); alignas makes copies single v4 instructions.
struct alignas(16) Chunk16 {
  u32 x, y, z, w;
};

// Loads of data read exactly once (bitmap words, values): read-only path, not kept in L1.
ENDOR_HD u32 load_once(const u32* p) {
#ifdef __CUDA_ARCH__
  u32 r;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
#else
  return *p;
#endif
}

ENDOR_HD Chunk16 load_once(const Chunk16* p) {
#ifdef __CUDA_ARCH__
  Chunk16 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
#else
  return *p;
#endif
}

// Tile offsets: every thread of the block reads the same word, so these go through the
// read-only path and stay in L1 (one DRAM access per block, the rest are L1 hits).
ENDOR_HD u32 load_broadcast(const u32* p) {
#ifdef __CUDA_ARCH__
  u32 r;
  asm("ld.global.nc.u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
#else
  return *p;
#endif
}

// Dense output: explicit global 16-byte stores (the pointer comes from the descriptor, so the
// compiler cannot prove it global and would otherwise emit generic stores).
ENDOR_HD void store16(u8* p, const Chunk16& v) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :
               : "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));  // never read back here
#else
  *reinterpret_cast<Chunk16*>(p) = v;
#endif
}

// The index of the descriptor owning global tile g: the last one with first_tile <= g.
// first_tile is strictly increasing (every tensor has at least one tile) and starts at 0.
ENDOR_HD u32 find_desc(const Desc* descs, u32 ndesc, u64 g) {
  u32 lo = 0, hi = ndesc - 1;
  while (lo < hi) {
    const u32 mid = (lo + hi + 1) / 2;
    if (descs[mid].first_tile <= g) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// What every thread of a block knows about its tile (all threads compute the same values).
struct Tile {
  const Desc* d;  // the tile's tensor
  u32 desc;       // its index in the table
  u32 len;        // elements in this tile: 4096, fewer only in a tensor's last tile
  u64 t;          // tile index within the tensor
  u64 e0;         // first element of the tile
  u64 lo, hi;     // the tile's values are values[lo, hi) (trusted only when reason == kOk)
  u64 win0;       // byte offset in values of the staged window: lo*elem_bytes rounded down to 16
  u32 chunks;     // 16-byte chunks in the staged window
  u32 head;       // byte offset of value lo inside the staged window (< 16)
  u32 reason;     // kOk, or kBadOffsets: then nothing is read through lo/hi
};

// Phase 1a (every thread): find the tensor, read and check the tile's offsets.
ENDOR_HD Tile open_tile(const Desc* descs, u32 ndesc, u64 g) {
  Tile tl;
  tl.desc = find_desc(descs, ndesc, g);
  tl.d = descs + tl.desc;
  const Desc& d = *tl.d;
  tl.t = g - d.first_tile;
  ENDOR_INVARIANT(g >= d.first_tile && tl.t * kTileElems < d.n);
  tl.e0 = tl.t * kTileElems;
  const u64 left = d.n - tl.e0;
  tl.len = left < kTileElems ? static_cast<u32>(left) : kTileElems;
  tl.lo = load_broadcast(d.tile_offsets + tl.t);
  tl.hi = load_broadcast(d.tile_offsets + tl.t + 1);
  // lo <= hi <= nnz and hi - lo <= 4096 keep every read below inside values and shared memory.
  // The table must also start at 0 and end at nnz (tile t's hi is tile t+1's lo, the same entry),
  // so an accepted launch uses every value exactly once: the kernel accepts exactly the inputs
  // that format.decode_bitmap_reference accepts.
  const bool last = tl.e0 + kTileElems >= d.n;
  const bool ok = tl.lo <= tl.hi && tl.hi <= d.nnz && tl.hi - tl.lo <= kTileElems &&
                  (tl.t != 0 || tl.lo == 0) && (!last || tl.hi == d.nnz);
  tl.reason = ok ? kOk : kBadOffsets;
  tl.win0 = tl.lo * d.elem_bytes / kChunk * kChunk;
  tl.head = static_cast<u32>(tl.lo * d.elem_bytes - tl.win0);
  if (tl.reason != kOk || tl.hi == tl.lo) {
    tl.chunks = 0;
  } else {
    const u64 end = (tl.hi * d.elem_bytes + kChunk - 1) / kChunk * kChunk;
    tl.chunks = static_cast<u32>((end - tl.win0) / kChunk);
  }
  return tl;
}

// Phase 1c (every thread): stage window chunk c (global byte win0 + 16c) into staged + 16c.
// A chunk wholly inside values_capacity is one 16-byte load. Only the window's last chunk can
// straddle the capacity (a segment whose length is not a multiple of 16); it is copied byte by
// byte up to the capacity, and the bytes past it belong to no value (hi*eb <= nnz*eb <= capacity).
ENDOR_HD void stage_chunk(const Tile& tl, u32 c, u8* staged) {
  const Desc& d = *tl.d;
  const u64 off = tl.win0 + static_cast<u64>(c) * kChunk;
  ENDOR_INVARIANT(c < tl.chunks && tl.reason == kOk);
  ENDOR_INVARIANT((c + 1) * kChunk <= stage_bytes(d.elem_bytes));
  ENDOR_INVARIANT(off < d.values_capacity);
  if (off + kChunk <= d.values_capacity) {
    *reinterpret_cast<Chunk16*>(staged + c * kChunk) =
        load_once(reinterpret_cast<const Chunk16*>(d.values + off));
  } else {
#pragma unroll 1
    for (u64 b = off; b < d.values_capacity; ++b) staged[c * kChunk + (b - off)] = d.values[b];
  }
}

constexpr u32 kMaxStageRounds = (kTileElems * 4 + kStageSlack) / kChunk / kThreads + 1;  // 9

ENDOR_HD void stage_values(const Tile& tl, u32 tid, u8* staged) {
#pragma unroll
  for (u32 r = 0; r < kMaxStageRounds; ++r) {
    const u32 c = r * kThreads + tid;  // consecutive threads, consecutive 16-byte chunks
    if (c < tl.chunks) stage_chunk(tl, c, staged);
  }
}

// Phase 1b (thread tid): bitmap word tid of the tile, 0 past the tile's end (nothing is read
// there). In the tensor's last, partial word, bits at positions >= n must be clear.
ENDOR_HD u32 load_word(const Tile& tl, u32 tid, u32* reason) {
  const u32 first = tid * kWordBits;
  if (first >= tl.len) return 0;
  const u32 word = load_once(tl.d->bitmap + tl.e0 / kWordBits + tid);
  const u32 valid = tl.len - first;
  if (valid < kWordBits && (word >> valid) != 0 && *reason == kOk) *reason = kBitsPastEnd;
  return word;
}

// Phase 2: block exclusive scan of the per-word popcounts. One Kogge-Stone step of the warp scan:
// `up` is the running sum `offset` lanes below (__shfl_up_sync); lanes below `offset` keep theirs.
ENDOR_HD u32 scan_step(u32 x, u32 up, u32 lane, u32 offset) { return lane >= offset ? x + up : x; }

// A thread's block-wide exclusive prefix from its warp-exclusive prefix and the warp totals;
// also returns the block total (the tile's popcount).
ENDOR_HD u32 block_prefix(u32 warp_exclusive, const u32* warp_totals, u32 warp, u32* total) {
  u32 before = 0, all = 0;
#pragma unroll
  for (u32 w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_totals[w] : 0;
    all += warp_totals[w];
  }
  *total = all;
  return before + warp_exclusive;
}

// Phase 2b (every thread): a tile whose popcount differs from its offsets is rejected.
ENDOR_HD u32 tile_verdict(const Tile& tl, u32 reason, u32 total) {
  if (reason != kOk) return reason;
  return static_cast<u64>(total) == tl.hi - tl.lo ? kOk : kCountMismatch;
}

ENDOR_HD void report_error(u64* error, u64 key) {
#ifdef __CUDA_ARCH__
  atomicMin(error, key);
#else
  if (key < *error) *error = key;
#endif
}

// The unsigned integer of an element's width: decoding moves bit patterns, never values.
template <u32 EB>  // element bytes
struct BitsOf;
template <>
struct BitsOf<2> {
  typedef u16 T;
};
template <>
struct BitsOf<4> {
  typedef u32 T;
};

// Phase 3 (thread tid), for elements of EB bytes: write the tile's 16-byte output chunks
// tid, tid+128, ... . `words` and `prefix` are the tile's bitmap words and each word's first
// value index relative to lo (shared memory); `staged` holds the values (shared memory).
template <u32 EB>  // element bytes: 2 (fp16, bf16 bit patterns) or 4 (fp32 bit patterns)
ENDOR_HD void write_chunks(const Tile& tl, u32 tid, const u32* words, const u32* prefix,
                           const u8* staged) {
  typedef typename BitsOf<EB>::T T;
  constexpr u32 kPer = kChunk / EB;                      // elements per chunk: 8 or 4
  constexpr u32 kRounds = kTileElems / kPer / kThreads;  // chunk rounds per thread: 4 or 8
  const T* vals = reinterpret_cast<const T*>(staged + tl.head);  // vals[i] = values[lo + i]
  u8* out = tl.d->out + tl.e0 * EB;
#pragma unroll
  for (u32 r = 0; r < kRounds; ++r) {
    const u32 c = r * kThreads + tid;  // consecutive threads, consecutive 16-byte chunks
    const u32 first = c * kPer;        // first element of the chunk, within the tile
    if (first >= tl.len) break;        // the tile ends (only in a tensor's last tile)
    const u32 w = first / kWordBits;
    const u32 s = first % kWordBits;
    const u32 word = words[w];
    const u32 bits = (word >> s) & ((1u << kPer) - 1);
    u32 v = prefix[w] + popc32(word & ((1u << s) - 1));  // index of the chunk's first value
    T x[kPer];
#pragma unroll
    for (u32 k = 0; k < kPer; ++k) {
      const u32 bit = (bits >> k) & 1u;
      ENDOR_INVARIANT(!bit || v < tl.hi - tl.lo);  // every value index < hi (offsets + verdict)
      x[k] = bit ? vals[v] : static_cast<T>(0);
      v += bit;
    }
    if (first + kPer <= tl.len) {
      Chunk16 o;
      if constexpr (EB == 2) {
        o.x = x[0] | (static_cast<u32>(x[1]) << 16);
        o.y = x[2] | (static_cast<u32>(x[3]) << 16);
        o.z = x[4] | (static_cast<u32>(x[5]) << 16);
        o.w = x[6] | (static_cast<u32>(x[7]) << 16);
      } else {
        o.x = x[0];
        o.y = x[1];
        o.z = x[2];
        o.w = x[3];
      }
      store16(out + static_cast<u64>(first) * EB, o);
    } else {
      // The tensor's last elements, fewer than a chunk: element stores, none past n.
#pragma unroll
      for (u32 k = 0; k < kPer; ++k) {  // static indices keep x in registers
        if (first + k < tl.len) reinterpret_cast<T*>(out)[first + k] = x[k];
      }
    }
  }
}

ENDOR_HD void write_outputs(const Tile& tl, u32 tid, const u32* words, const u32* prefix,
                            const u8* staged) {
  if (tl.d->elem_bytes == 4) {
    write_chunks<4>(tl, tid, words, prefix, staged);
  } else {
    write_chunks<2>(tl, tid, words, prefix, staged);
  }
}

}  // namespace endor

#ifndef ENDOR_EMULATE
// The kernel: the phases above, separated by the two barriers a block needs. Grid: one block per
// tile of the table (sum of ceil(n/4096)); block: 128 threads; dynamic shared memory:
// stage_bytes(largest elem_bytes in the table). *error must be ~0 before the launch.
extern "C" __global__ void __launch_bounds__(endor::kThreads, endor::kMinBlocksPerSM)
    endor_decode_bitmap(const endor::Desc* __restrict__ descs,  // the table, first_tile ascending
                        unsigned int ndesc,                    // descriptors in the table (>= 1)
                        unsigned long long* __restrict__ error) {  // first bad (desc, tile, reason)
  using namespace endor;
  extern __shared__ Chunk16 staged_raw[];  // the tile's values, 16-byte aligned
  __shared__ u32 words[kThreads];          // the tile's bitmap words
  __shared__ u32 prefix[kThreads];         // each word's first value index, relative to lo
  __shared__ u32 warp_totals[kWarps];      // per-warp popcount sums, for the block scan
  u8* staged = reinterpret_cast<u8*>(staged_raw);
  const u32 tid = threadIdx.x;

  const Tile tl = open_tile(descs, ndesc, blockIdx.x);
  // The bitmap word and the values are independent loads: issue the word first so its latency
  // overlaps the staging loads (16 resident blocks per SM keep enough of both in flight).
  u32 reason = tl.reason;
  const u32 word = load_word(tl, tid, &reason);
  if (tl.reason == kOk) stage_values(tl, tid, staged);

  const u32 count = popc32(word);
  const u32 lane = tid % 32, warp = tid / 32;
  u32 inclusive = count;
#pragma unroll
  for (u32 offset = 1; offset < 32; offset *= 2)
    inclusive = scan_step(inclusive, __shfl_up_sync(0xffffffffu, inclusive, offset), lane, offset);
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  u32 total;
  prefix[tid] = block_prefix(inclusive - count, warp_totals, warp, &total);
  words[tid] = word;
  reason = tile_verdict(tl, reason, total);

  // Barrier for staged values, words and prefix; the whole block agrees on accept / reject.
  if (__syncthreads_or(reason != kOk)) {
    if (reason != kOk) report_error(error, error_key(tl.desc, tl.t, reason));
    return;
  }
  write_outputs(tl, tid, words, prefix, staged);
}
#endif  // ENDOR_EMULATE
