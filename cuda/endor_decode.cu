/*
 * endor_decode.cu: rebuild dense fp16 / bf16 / fp32 weights on the GPU from bitmap + tile offsets
 * + values, the values raw (format v1), codec expdict (format v2) or codec exphuff (format v3,
 * entropy-coded exponents; a dense exphuff tensor has no bitmap at all). The format: docs/format.md,
 * section 1; this kernel step by step, and why: docs/format.md, "How the GPU kernel decodes a
 * layer". The launcher: endor_gds/decode/gpu.py (NVRTC, options gpu.NVRTC_OPTIONS; the table is
 * built by gpu.GpuDecoder.make_table). No header is included: NVRTC has no system headers.
 *
 * Launch: endor_decode_bitmap, once per layer, over a table of descriptors (Desc, one per bitmap
 * tensor, first_tile ascending). Grid: one block per 4096-element tile of the whole table; block:
 * 128 threads, one bitmap word each; dynamic shared memory: the table's largest smem_bytes().
 *
 * Contract. The host guarantees each descriptor (sizes within the segments' capacities, elem_bytes
 * 2 or 4, index_bits 1..4, exphuff code lengths a prefix code of at most 12 bits and its decode
 * table built from them, alignments: bitmap, tile_offsets, escape_offsets, tile_bits 4 bytes;
 * values, codes, bits, huff_table, out 16; escape_positions, chunk_bits 2; escape_values
 * elem_bytes; outputs not overlapping inputs). The file is untrusted: the kernel checks everything
 * that comes from it (tile, escape and bit offsets, bits past n, popcounts, escape positions,
 * exponent codes), reads only inside each segment and writes only out[0..n).
 * Error word: the host sets *error to ~0 before the launch; a bad tile writes nothing and
 * atomicMin's desc << 40 | tile << 8 | reason (Reason below) into it, so the first bad tile in
 * table order is reported. Any error makes the whole launch's outputs invalid.
 *
 * Tested without a GPU: tests/decode/test_cuda_compile.py compiles it with nvcc (sm_80, sm_90,
 * warnings as errors, no spills); tests/support/endor_decode_emulate.cu runs its per-thread
 * functions on the CPU (-DENDOR_EMULATE).
 */

// The tile size of the file format (docs/format.md: 4096 elements, endor_gds.codec.bitmap.TILE_ELEMS).
// gpu.NVRTC_OPTIONS always passes it, so a change on the Python side reaches the kernel; the
// default lets the file compile on its own (nvcc -arch=sm_90 -cubin cuda/endor_decode.cu).
#ifndef ENDOR_TILE_ELEMS
#define ENDOR_TILE_ELEMS 4096
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
constexpr u32 kMaxIndexBits = 4;               // expdict.MAX_INDEX_BITS: 16 dictionary entries
constexpr u32 kHuffBits = 12;                  // exphuff.MAX_CODE_BITS: one lookup per exponent code
constexpr u32 kHuffChunk = 512;                // exphuff.CHUNK_VALUES: values decoded by one thread
constexpr u32 kHuffChunks = kTileElems / kHuffChunk;  // 8 chunks (decoding threads) per tile
// Resident blocks per SM the kernel is built for: 16 x 128 = 2048 threads, full occupancy on
// sm_80/sm_90, to hide DRAM latency in this memory-bound kernel. It caps registers at 32 per
// thread, which the kernel fits without spilling (tests/decode/test_cuda_compile.py fails on any spill).
// Shared memory per block is 9.2 KB for fp16/bf16 tables (+1 KB the driver reserves): 16 blocks
// fit an sm_90 SM (228 KB), about 15 an sm_80 SM (164 KB); a table holding fp32 (17.4 KB a block)
// runs about 12 and 8, expdict tables (docs/format.md) 14 / 10 (bf16) and 7 / 5 (fp32), exphuff
// tables 9 / 6 (bf16, 22.2 KB a block), 8 / 6 (fp16, 23.7 KB) and 5 / 4 (fp32, 38.2 KB).
constexpr u32 kMinBlocksPerSM = 16;
static_assert(kTileElems == 4096, "the block layout (128 threads, one word each) assumes 4096-element tiles");
static_assert(kThreads % 32 == 0 && kWarps <= 32, "the scan keeps one total per warp");

enum Codec : u32 { kRaw = 0, kExpDict = 1, kExpHuff = 2 };

// One bitmap tensor of the layer (built and uploaded once by gpu.GpuDecoder.make_table; the
// byte layout is gpu.DESC_DTYPE, and the emulation test checks the two agree).
struct Desc {
  const u32* bitmap;        // ceil(n/32) little-endian words; bit j of word w = element 32w+j
  const u8* values;         // raw: the nnz packed values; expdict: the residuals; 16-byte aligned
  u64 values_capacity;      // bytes readable at values (the padded segment)
  const u32* tile_offsets;  // ntiles+1 entries: values of tile t are [off[t], off[t+1])
  u8* out;                  // n*elem_bytes dense output; 16-byte aligned
  u64 n;                    // elements of the tensor, 1 <= n < 2^32
  u64 nnz;                  // number of values
  u64 first_tile;           // global tile index of this tensor's tile 0 (= block index)
  u32 elem_bytes;           // 2 (fp16, bf16) or 4 (fp32)
  u32 codec;                // kRaw or kExpDict; the fields below are 0 for kRaw
  const u8* codes;          // expdict fields, field_bits each; 16-byte aligned
  u64 codes_capacity;       // bytes readable at codes
  const u32* escape_offsets;    // ntiles+1 entries: escapes of tile t are [eoff[t], eoff[t+1])
  const u16* escape_positions;  // escapes entries: value index within its tile
  const u8* escape_values;      // escapes entries of elem_bytes: the full bit patterns
  u64 escapes;              // number of escapes
  u32 index_bits;           // 1..4: dictionary of 2^index_bits exponents
  u32 man_bits;             // mantissa bits: 7 (bf16), 10 (fp16), 23 (fp32)
  u8 exponents[16];         // the dictionary: index i -> exponent field exponents[i]
  // exphuff fields (0 for the other codecs; man_bits above is used too). A dense exphuff tensor
  // has bitmap == tile_offsets == nullptr and nnz == n: tile t holds values [4096t, 4096t + len).
  // Appended after the expdict fields, so a kernel of the previous layout still reads a
  // one-descriptor table of raw or expdict tensors (bench_decode --compare-source).
  const u8* bits;           // MSB-first stream: per value its exponent's code, then its high bits; 16-byte aligned
  u64 bits_capacity;        // bytes readable at bits, >= ceil(nbits / 8)
  const u32* tile_bits;     // ntiles+1 entries: bit offset of each tile's first value
  const u16* chunk_bits;    // 7 per tile: chunk c = 1..7 starts chunk_bits[7t + c - 1] bits after the tile
  const u16* huff_table;    // 4096 entries, next 12 bits -> exponent << 4 | code length (0: no code); 16-byte aligned
  u64 nbits;                // bits in the stream: tile_bits must end there
  u32 exp_bits;             // exponent bits: 8 (bf16, fp32) or 5 (fp16)
  u32 reserved;             // 0
};
static_assert(sizeof(Desc) == 200, "Desc must match kernels.DESC_DTYPE");

// The byte layout of a value in the expdict streams, from the descriptor.
ENDOR_HD u32 residual_bytes(const Desc& d) { return (d.man_bits + 1) / 8; }
ENDOR_HD u32 field_bits(const Desc& d) { return d.index_bits + (d.man_bits + 1) % 8; }
ENDOR_HD u32 max_field_bits(const Desc& d) { return kMaxIndexBits + (d.man_bits + 1) % 8; }
// exphuff: the residual bits the bits stream holds after each code (fp16: 3), and the most bits a
// value takes there (the longest code, then those bits).
ENDOR_HD u32 high_bits(const Desc& d) { return (d.man_bits + 1) % 8; }
ENDOR_HD u32 max_unit_bits(const Desc& d) { return kHuffBits + high_bits(d); }

// A rebuilt value is the OR of two disjoint parts (docs/format.md: residual r = low bytes | the
// field's high bits << 8*rb, value = r >> man_bits << (8*eb - 1) | exponent << man_bits |
// r & mantissa mask):
//   field_part(f): what the field decides, i.e. the exponent of its index and the residual's bits
//     above its low bytes (fp16: the sign and the top two mantissa bits);
//   low_part(low): what the residual's low bytes decide, i.e. mantissa bits and, in bf16 and fp32
//     (where the low bytes are the whole residual), the sign.
// Each block tabulates field_part for every field value (at most 2^7, in smem at
// field_table_offset), so a value costs one table read and a few ALU operations instead of index
// arithmetic, a dictionary read and the high bits' shifts.
ENDOR_HD u32 field_part(const Desc& d, u32 f) {
  const u32 b = d.index_bits, m = d.man_bits;
  const u32 high = (f >> b) << (8 * residual_bytes(d));
  return (static_cast<u32>(d.exponents[f & ((1u << b) - 1)]) << m) |
         ((high >> m) << (8 * d.elem_bytes - 1)) | (high & ((1u << m) - 1));
}
template <u32 EB>
ENDOR_HD u32 low_part(u32 low, u32 m) { return ((low >> m) << (8 * EB - 1)) | (low & ((1u << m) - 1)); }
constexpr u32 kMaxFieldBits = kMaxIndexBits + 3;  // fp16: 11-bit residual = 1 byte + 3 high bits
static_assert((1u << kMaxFieldBits) <= kThreads, "one table entry per thread");

// Dynamic shared memory a descriptor's tiles need (the host passes the table's maximum).
// Raw: the staged values window [floor16(lo*eb), ceil16(hi*eb)), at most (hi-lo)*eb + 30 bytes and
// a multiple of 16, so 4096*eb + 16. Expdict: the rebuilt values (4096*eb), then the residual
// window (4096*rb + 16, as above), then the codes window: bytes [floor16(lo*w/8), ceil16(ceil(hi*w/8)))
// span at most 4096*w/8 + 32 bytes (16-byte multiples), then the field table (field_part of every
// field value, elem_bytes each: 32 bytes for bf16, 256 fp16, 64 fp32). The table sits in dynamic
// memory so that it costs each tensor only its own size: a static 128-entry array would take a
// resident block off every bf16 SM.
ENDOR_HD u32 stage_bytes(u32 elem_bytes) { return kTileElems * elem_bytes + kStageSlack; }
ENDOR_HD u32 residuals_offset(const Desc& d) { return kTileElems * d.elem_bytes; }
ENDOR_HD u32 codes_offset(const Desc& d) {
  return residuals_offset(d) + kTileElems * residual_bytes(d) + kStageSlack;
}
ENDOR_HD u32 field_table_offset(const Desc& d) {
  return codes_offset(d) + kTileElems / 8 * max_field_bits(d) + 2 * kChunk;
}
// Exphuff: the rebuilt values (4096*eb; until they are rebuilt, the decode table's 4096 u16 sit
// there: it is read only while decoding, so it costs no memory of its own), the residual window
// (as expdict), the bits window where expdict has its codes window: the tile spans at most
// 4096 * max_unit_bits bits (open_tile checks it), the window that plus 32 bytes of alignment,
// plus 16 bytes the bit readers may read past its end (read_bits), then the decoded units.
// Units: chunk c's at c * kUnitStride, one byte per value (exponent | high bits << exp_bits). The
// stride is 512 + 16 bytes, not 512, so that the 8 decoding threads' 4-byte stores fall in 8
// different banks (512-byte strides would put all eight in one bank: an 8-way conflict per store).
constexpr u32 kUnitStride = kHuffChunk + kChunk;
constexpr u32 kUnitsBytes = kHuffChunks * kUnitStride;
static_assert((1u << kHuffBits) * 2 <= kTileElems * 2, "the decode table fits the values area");
ENDOR_HD u32 units_offset(const Desc& d) {
  return codes_offset(d) + kTileElems / 8 * max_unit_bits(d) + 3 * kChunk;
}
ENDOR_HD u32 smem_bytes(const Desc& d) {
  if (d.codec == kExpHuff) return units_offset(d) + kUnitsBytes;
  if (d.codec != kExpDict) return stage_bytes(d.elem_bytes);
  return field_table_offset(d) + (1u << max_field_bits(d)) * d.elem_bytes;
}

// Why a tile was rejected. The error word holds desc << 40 | tile << 8 | reason, so atomicMin
// keeps the first bad tile in table order (tile < 2^20 because n < 2^32; desc < 2^24 by make_table);
// the host sets it to ~0 (no error) before each launch.
enum Reason : u32 {
  kOk = 0,
  kBadOffsets = 1,     // lo > hi, hi > nnz, > kTileElems values, or the table not from 0 to nnz
  kBitsPastEnd = 2,    // a bit at a position >= n is set in the tensor's last word
  kCountMismatch = 3,  // the tile's popcount differs from hi - lo
  kBadEscapes = 4,     // expdict: escape offsets out of range, or a bad escape position
  kBadBits = 5,        // exphuff: tile or chunk bit offsets out of range, a missing code, or a
                       // chunk whose codes do not end where the next chunk starts
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

// A byte window of a stream staged into shared memory: bytes [win0, win0 + 16 * chunks) of the
// stream, the first bit of value lo at bit `head_bits` inside it.
struct Window {
  u64 win0;       // stream byte offset of the window, a multiple of 16
  u32 chunks;     // 16-byte chunks
  u32 head_bits;  // bit offset of value lo inside the window (a multiple of 8 for byte streams)
};

// The window holding stream bits [first_bit, end_bit) (both multiples of 8 for byte streams).
ENDOR_HD Window window_of(u64 first_bit, u64 end_bit, bool empty) {
  Window w;
  w.win0 = first_bit / 8 / kChunk * kChunk;
  w.head_bits = static_cast<u32>(first_bit - w.win0 * 8);
  const u64 end = ((end_bit + 7) / 8 + kChunk - 1) / kChunk * kChunk;
  w.chunks = empty ? 0 : static_cast<u32>((end - w.win0) / kChunk);
  return w;
}

// What every thread of a block knows about its tile (all threads compute the same values).
struct Tile {
  const Desc* d;  // the tile's tensor
  u32 desc;       // its index in the table
  u32 len;        // elements in this tile: 4096, fewer only in a tensor's last tile
  u64 t;          // tile index within the tensor
  u64 e0;         // first element of the tile
  u64 lo, hi;     // the tile's values are values[lo, hi) (trusted only when reason == kOk)
  u64 esc_lo, esc_hi;  // expdict: the tile's escapes (trusted only when reason == kOk)
  Window vals;    // raw: the values; expdict, exphuff: the residuals (head in bytes)
  Window codes;   // expdict: the fields; exphuff: the bits stream (head in bits)
  u32 reason;     // kOk, or kBadOffsets / kBadEscapes / kBadBits: then nothing is read through them
};

// Phase 1a (every thread): find the tensor, read and check the tile's offsets (and, for expdict,
// its escape offsets), and the windows to stage.
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
  if (d.tile_offsets == nullptr) {  // a dense exphuff tensor: every element is a value (nnz == n)
    tl.lo = tl.e0;
    tl.hi = tl.e0 + tl.len;
  } else {
    tl.lo = load_broadcast(d.tile_offsets + tl.t);
    tl.hi = load_broadcast(d.tile_offsets + tl.t + 1);
  }
  // lo <= hi <= nnz and hi - lo <= 4096 keep every read below inside values and shared memory.
  // The table must also start at 0 and end at nnz (tile t's hi is tile t+1's lo, the same entry),
  // so an accepted launch uses every value exactly once: the kernel accepts exactly the inputs
  // that the reference decoder (format.py, expdict.py) accepts.
  const bool last = tl.e0 + kTileElems >= d.n;
  const bool ok = tl.lo <= tl.hi && tl.hi <= d.nnz && tl.hi - tl.lo <= kTileElems &&
                  (tl.t != 0 || tl.lo == 0) && (!last || tl.hi == d.nnz);
  tl.reason = ok ? kOk : kBadOffsets;
  tl.esc_lo = tl.esc_hi = 0;
  const bool expdict = d.codec == kExpDict;
  if (expdict && ok) {  // the same rules for the escapes, bounded by the tile's value count
    tl.esc_lo = load_broadcast(d.escape_offsets + tl.t);
    tl.esc_hi = load_broadcast(d.escape_offsets + tl.t + 1);
    const bool esc_ok = tl.esc_lo <= tl.esc_hi && tl.esc_hi <= d.escapes &&
                        tl.esc_hi - tl.esc_lo <= tl.hi - tl.lo && (tl.t != 0 || tl.esc_lo == 0) &&
                        (!last || tl.esc_hi == d.escapes);
    tl.reason = esc_ok ? kOk : kBadEscapes;
  }
  const bool exphuff = d.codec == kExpHuff;
  u64 b0 = 0, b1 = 0;  // exphuff: the tile's bits [b0, b1) of the stream
  if (exphuff && ok) {
    // The tile starts at 0 in tile 0 and the last one ends at nbits (tile t's end is tile t+1's
    // start, the same entry), and no tile spans more than its values' longest units: that bounds
    // the bits window staged below. Whether the codes really fill [b0, b1) only the decode tells.
    b0 = load_broadcast(d.tile_bits + tl.t);
    b1 = load_broadcast(d.tile_bits + tl.t + 1);
    const bool bits_ok = b0 <= b1 && b1 <= d.nbits && (tl.t != 0 || b0 == 0) &&
                         (!last || b1 == d.nbits) && b1 - b0 <= (tl.hi - tl.lo) * max_unit_bits(d);
    tl.reason = bits_ok ? kOk : kBadBits;
  }
  const bool empty = tl.reason != kOk || tl.hi == tl.lo;
  const u64 vb = d.codec == kRaw ? d.elem_bytes : residual_bytes(d);  // bytes per value in `values`
  tl.vals = window_of(tl.lo * vb * 8, tl.hi * vb * 8, empty);
  if (exphuff) {
    tl.codes = window_of(b0, b1, empty);
  } else {
    tl.codes = window_of(tl.lo * field_bits(d), tl.hi * field_bits(d), empty || !expdict);
  }
  return tl;
}

// Phase 1c (every thread): stage window chunk c (stream byte win0 + 16c) into staged + 16c.
// A chunk wholly inside the capacity is one 16-byte load. Only the window's last chunk can
// straddle the capacity (a segment whose length is not a multiple of 16); it is copied byte by
// byte up to the capacity, and the bytes past it belong to no value (the host guarantees the
// capacity holds all nnz values).
ENDOR_HD void stage_chunk(const u8* src, u64 capacity, const Window& w, u32 c, u8* staged) {
  const u64 off = w.win0 + static_cast<u64>(c) * kChunk;
  ENDOR_INVARIANT(c < w.chunks);
  ENDOR_INVARIANT(off < capacity);
  if (off + kChunk <= capacity) {
    *reinterpret_cast<Chunk16*>(staged + c * kChunk) =
        load_once(reinterpret_cast<const Chunk16*>(src + off));
  } else {
#pragma unroll 1
    for (u64 b = off; b < capacity; ++b) staged[c * kChunk + (b - off)] = src[b];
  }
}

// Rounds of 128 chunks covering the largest window: raw fp32 values, 4096 * 4 + 16 bytes (the
// expdict windows are smaller: 3 * 4096 + 16 residual bytes, 512 * 7 + 32 code bytes; exphuff's
// bits window at most 512 * 15 + 32 bytes, its decode table 8 KB).
constexpr u32 kMaxStageRounds = (kTileElems * 4 + kStageSlack) / kChunk / kThreads + 1;  // 9

// Consecutive threads, consecutive 16-byte chunks. Unrolled, so a thread's loads of all its
// rounds are in flight together (memory-level parallelism in a latency-bound phase).
ENDOR_HD void stage_window(const u8* src, u64 capacity, const Window& w, u32 tid, u8* staged) {
#pragma unroll
  for (u32 r = 0; r < kMaxStageRounds; ++r) {
    const u32 c = r * kThreads + tid;
    if (c < w.chunks) stage_chunk(src, capacity, w, c, staged);
  }
}

// Phase 1c, exphuff: the residuals as expdict's, the tile's bits where expdict has its codes,
// and the tensor's decode table (4096 u16, the same for every tile of the tensor: it comes from
// L2 after the first tile) over the values area, which is free until the values are rebuilt.
ENDOR_HD void stage_huff(const Tile& tl, u32 tid, u8* smem) {
  const Desc& d = *tl.d;
  ENDOR_INVARIANT(residuals_offset(d) + tl.vals.chunks * kChunk <= codes_offset(d));
  ENDOR_INVARIANT(codes_offset(d) + tl.codes.chunks * kChunk + kChunk <= units_offset(d));
  stage_window(d.values, d.values_capacity, tl.vals, tid, smem + residuals_offset(d));
  stage_window(d.bits, d.bits_capacity, tl.codes, tid, smem + codes_offset(d));
  Window table;
  table.win0 = 0;
  table.chunks = (1u << kHuffBits) * 2 / kChunk;
  table.head_bits = 0;
  stage_window(reinterpret_cast<const u8*>(d.huff_table), (1u << kHuffBits) * 2, table, tid, smem);
}

// Phase 1c: stage the tile's streams. Raw: the values at smem. Expdict: the residuals and the
// codes in their regions (smem_bytes), and field_part of every field value into the field table
// (one entry per thread; 2-byte entries for fp16/bf16, so 128 of them span the 32 banks only twice).
ENDOR_HD void stage_values(const Tile& tl, u32 tid, u8* smem) {
  const Desc& d = *tl.d;
  ENDOR_INVARIANT(tl.reason == kOk);
  if (d.codec == kExpHuff) {
    stage_huff(tl, tid, smem);
    return;
  }
  if (d.codec != kExpDict) {
    ENDOR_INVARIANT(tl.vals.chunks * kChunk <= stage_bytes(d.elem_bytes));
    stage_window(d.values, d.values_capacity, tl.vals, tid, smem);
    return;
  }
  ENDOR_INVARIANT(residuals_offset(d) + tl.vals.chunks * kChunk <= codes_offset(d));
  ENDOR_INVARIANT(codes_offset(d) + tl.codes.chunks * kChunk <= smem_bytes(d));
  stage_window(d.values, d.values_capacity, tl.vals, tid, smem + residuals_offset(d));
  stage_window(d.codes, d.codes_capacity, tl.codes, tid, smem + codes_offset(d));
  if (tid < (1u << field_bits(d))) {
    u8* table = smem + field_table_offset(d);
    if (d.elem_bytes == 4) {
      reinterpret_cast<u32*>(table)[tid] = field_part(d, tid);
    } else {
      reinterpret_cast<u16*>(table)[tid] = static_cast<u16>(field_part(d, tid));
    }
  }
}

// Phase 1b (thread tid): bitmap word tid of the tile, 0 past the tile's end (nothing is read
// there). In the tensor's last, partial word, bits at positions >= n must be clear.
// A dense exphuff tensor has no bitmap: its word is all ones up to the tile's end, so the scan
// and step 4 treat it as a tensor whose every element is a value, with no special case.
ENDOR_HD u32 load_word(const Tile& tl, u32 tid, u32* reason) {
  const u32 first = tid * kWordBits;
  if (first >= tl.len) return 0;
  const u32 valid = tl.len - first;
  if (tl.d->bitmap == nullptr) return valid < kWordBits ? (1u << valid) - 1 : ~0u;
  const u32 word = load_once(tl.d->bitmap + tl.e0 / kWordBits + tid);
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

// Phase 3b, expdict: what a thread needs to rebuild values of its tile.
struct Rebuild {
  u32 w;                // field bits
  u32 m;                // mantissa bits
  u32 rb;               // residual bytes
  const u8* res_words;  // the staged residual window, 16-byte aligned: value 0 at bit res_head
  u32 res_head;
  const u8* codes;      // the staged codes window, 16-byte aligned: value 0's field at bit head
  u32 head;
};

ENDOR_HD Rebuild rebuild_of(const Tile& tl, const u8* smem) {
  const Desc& d = *tl.d;
  Rebuild p;
  p.w = field_bits(d);
  p.m = d.man_bits;
  p.rb = residual_bytes(d);
  p.res_words = smem + residuals_offset(d);
  p.res_head = tl.vals.head_bits;
  p.codes = smem + codes_offset(d);
  p.head = tl.codes.head_bits;
  return p;
}

// Value i alone, its field and residual bytes read byte by byte (the tile's last count % 4 values).
template <u32 EB>
ENDOR_HD typename BitsOf<EB>::T rebuild_one(const Rebuild& p, u32 i,
                                            const typename BitsOf<EB>::T* table) {
  const u32 bit = p.head + i * p.w;
  u32 x = p.codes[bit / 8];
  if (bit % 8 + p.w > 8) x |= static_cast<u32>(p.codes[bit / 8 + 1]) << 8;  // straddles a byte
  const u32 field = (x >> (bit % 8)) & ((1u << p.w) - 1);
  const u8* res = p.res_words + p.res_head / 8 + i * p.rb;  // value i's residual bytes
  u32 low = res[0];
  if (EB == 4) low |= static_cast<u32>(res[1]) << 8 | static_cast<u32>(res[2]) << 16;
  return static_cast<typename BitsOf<EB>::T>(table[field] | low_part<EB>(low, p.m));
}

// Bits [bit, bit + width) of a 4-byte aligned shared array, width <= 32, in the low bits of the
// result (the bits above them are whatever follows). The second word is read only when those
// bits reach into it, so nothing past the last needed word is read.
ENDOR_HD u32 bits_at(const u8* base, u32 bit, u32 width) {
  const u32* a = reinterpret_cast<const u32*>(base);
  const u32 k = bit / 32, s = bit % 32;
  const u32 lo = a[k];
  if (s + width <= 32) return lo >> s;
#ifdef __CUDA_ARCH__
  u32 r;  // funnel shift: the low 32 bits of (a[k+1]:lo) >> s, one instruction
  asm("shf.r.wrap.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(lo), "r"(a[k + 1]), "r"(s));
  return r;
#else
  return (lo >> s) | (a[k + 1] << (32 - s));  // the same, 0 < s < 32 here
#endif
}

// A pair of 32-bit words for one 8-byte shared store (four fp16/bf16 values).
struct alignas(8) Pair8 {
  u32 x, y;
};

// The residual bytes of four consecutive values, the first at bit `rbit` of the staged residual
// window: one or three 32-bit reads (plus one where they straddle a word) for the group.
template <u32 EB>
ENDOR_HD void group_lows(const u8* res_words, u32 rbit, u32 low[4]) {
  constexpr u32 kRb = EB == 2 ? 1 : 3;  // residual bytes: (7 or 10 + 1) / 8, (23 + 1) / 8
  constexpr u32 kLowBits = 8 * kRb;
  u32 r[kRb];  // the group's 4*kRb residual bytes, little-endian
#pragma unroll
  for (u32 k = 0; k < kRb; ++k) r[k] = bits_at(res_words, rbit + 32 * k, 32);
#pragma unroll
  for (u32 j = 0; j < 4; ++j) {
    const u32 q = kLowBits * j, k = q / 32, s = q % 32;  // constants once unrolled
    u32 x = r[k] >> s;
    if (s + kLowBits > 32) x |= r[k + 1] << (32 - s);
    low[j] = x & ((1u << kLowBits) - 1);
  }
}

// Values i0 .. i0 + 3 into the rebuilt array at smem: one 8- or 16-byte store.
template <u32 EB>
ENDOR_HD void store_group(u8* smem, u32 i0, const typename BitsOf<EB>::T v[4]) {
  if constexpr (EB == 2) {
    Pair8 o;
    o.x = v[0] | static_cast<u32>(v[1]) << 16;
    o.y = v[2] | static_cast<u32>(v[3]) << 16;
    *reinterpret_cast<Pair8*>(smem + 2 * i0) = o;
  } else {
    Chunk16 o;
    o.x = v[0];
    o.y = v[1];
    o.z = v[2];
    o.w = v[3];
    *reinterpret_cast<Chunk16*>(smem + 4 * i0) = o;
  }
}

// Values i0 .. i0 + 3 (i0 a multiple of 4; all four below the tile's count), the rebuild's step:
// the four share one read of their fields (4 x at most 7 bits) and of their residuals (4 or 12
// bytes), and one 8- or 16-byte store, where one value a step would read a byte for every field
// and residual byte and store each value alone. The residual bytes of every group start at the
// same offset mod 4 (a group has 4*rb bytes), so whether they straddle a word is the same for the
// whole block.
template <u32 EB>
ENDOR_HD void rebuild_group(const Rebuild& p, u32 i0, const typename BitsOf<EB>::T* table, u8* smem) {
  typedef typename BitsOf<EB>::T T;
  constexpr u32 kLowBits = EB == 2 ? 8 : 24;
  ENDOR_INVARIANT(p.rb == kLowBits / 8 && i0 % 4 == 0 && 4 * p.w <= 32);
  const u32 fields = bits_at(p.codes, p.head + i0 * p.w, 4 * p.w);
  u32 low[4];
  group_lows<EB>(p.res_words, p.res_head + i0 * kLowBits, low);
  T v[4];
#pragma unroll
  for (u32 j = 0; j < 4; ++j) {
    const u32 field = (fields >> (j * p.w)) & ((1u << p.w) - 1);
    v[j] = static_cast<T>(table[field] | low_part<EB>(low[j], p.m));
  }
  store_group<EB>(smem, i0, v);
}

// Phase 3b (thread tid), expdict: rebuild the tile's values into the start of smem: groups
// 4*tid, 4*(tid + 128), ..., then the last count % 4 values, one a thread.
template <u32 EB>
ENDOR_HD void rebuild_chunk(const Tile& tl, u32 tid, u8* smem) {
  typedef typename BitsOf<EB>::T T;
  const Rebuild p = rebuild_of(tl, smem);
  const T* tab = reinterpret_cast<const T*>(smem + field_table_offset(*tl.d));
  const u32 count = static_cast<u32>(tl.hi - tl.lo);
  const u32 grouped = count / 4 * 4;
#pragma unroll 1
  for (u32 i0 = 4 * tid; i0 < grouped; i0 += 4 * kThreads) rebuild_group<EB>(p, i0, tab, smem);
  T* out = reinterpret_cast<T*>(smem);
#pragma unroll 1
  for (u32 i = grouped + tid; i < count; i += kThreads) out[i] = rebuild_one<EB>(p, i, tab);
}

ENDOR_HD void rebuild_values(const Tile& tl, u32 tid, u8* smem) {
  if (tl.d->elem_bytes == 4) {
    rebuild_chunk<4>(tl, tid, smem);
  } else {
    rebuild_chunk<2>(tl, tid, smem);
  }
}

// Phase 3c runs only in a tile with escapes (all threads agree: esc_lo, esc_hi are the block's).
ENDOR_HD bool has_escapes(const Tile& tl) { return tl.esc_hi != tl.esc_lo; }

// Phase 3c (thread tid), expdict: escapes esc_lo + tid, + 128, ... overwrite their values in the
// rebuilt array. Returns kBadEscapes (writing nothing for that escape) for a position at or past
// the tile's value count or not above the previous escape's.
ENDOR_HD u32 patch_escapes(const Tile& tl, u32 tid, u8* smem) {
  const Desc& d = *tl.d;
  const u64 count = tl.hi - tl.lo;
  u32 reason = kOk;
#pragma unroll 1
  for (u64 e = tl.esc_lo + tid; e < tl.esc_hi; e += kThreads) {
    ENDOR_INVARIANT(e < d.escapes);
    const u32 pos = d.escape_positions[e];
    if (pos >= count || (e > tl.esc_lo && pos <= d.escape_positions[e - 1])) {
      reason = kBadEscapes;
      continue;
    }
    if (d.elem_bytes == 4) {
      reinterpret_cast<u32*>(smem)[pos] = reinterpret_cast<const u32*>(d.escape_values)[e];
    } else {
      reinterpret_cast<u16*>(smem)[pos] = reinterpret_cast<const u16*>(d.escape_values)[e];
    }
  }
  return reason;
}

// ---- Codec exphuff (format v3): phases 3a and 3b ----
//
// Value k's exponent is a canonical Huffman code of at most 12 bits in the MSB-first `bits`
// stream, then its fp16 high residual bits; the tile's values are 8 chunks of 512, each starting
// at its own bit offset (tile_bits, chunk_bits). A code's length is only known once it is looked
// up, so each chunk is one serial chain: table lookup -> length -> shift -> next lookup. The format
// gives 8 independent chains per tile; they run on 8 threads of the block (3a), each into a byte
// per value, and then the whole block rebuilds the values from those bytes and the residuals (3b),
// as expdict does from its fields. The serial chains, not DRAM, bound this codec's kernel.

// Thread kHuffStride * c decodes chunk c: two chains per warp, in all four warps, so that the 8
// chains issue from four warp schedulers and only two lanes of a warp diverge on a refill.
constexpr u32 kHuffStride = kThreads / kHuffChunks;
static_assert(kHuffStride * kHuffChunks == kThreads && kHuffChunk % 4 == 0, "8 chunks of whole groups");

// Word k of a 4-byte aligned shared array, read as 32 stream bits (MSB first: big-endian).
ENDOR_HD u32 stream_word(const u8* base, u32 k) {
  const u32 x = reinterpret_cast<const u32*>(base)[k];
#ifdef __CUDA_ARCH__
  return __byte_perm(x, 0, 0x0123);
#else
  return __builtin_bswap32(x);
#endif
}

// An MSB-first reader over the staged bits window: the next `have` bits at the top of `acc`, the
// window's words from `next` on not loaded yet (next * 32 == the bit position + have). One 64-bit
// shift per value and one shared load per 32 bits, where reading each code's bytes anew would
// put a shared load into every step of the chain.
struct BitReader {
  u64 acc;
  u32 have;
  u32 next;
};

ENDOR_HD BitReader reader_at(const u8* win, u32 bit) {
  BitReader r;
  r.acc = static_cast<u64>(stream_word(win, bit / 32)) << (32 + bit % 32);
  r.have = 32 - bit % 32;
  r.next = bit / 32 + 1;
  return r;
}

// At least max_unit_bits (<= 15) bits in acc for the next value: one more word when fewer are
// left. It may read up to 6 bytes past the chunk's last bit (a word holding bits < end + 47),
// so the bits window has 16 bytes of slack (units_offset); bits past the end never decide a
// value: the table gives the same entry for every continuation of a code, and a code or high
// bits reaching past the end are rejected.
ENDOR_HD void refill(BitReader& r, const u8* win, u32 window_words) {
  if (r.have < kHuffBits + 3) {
    ENDOR_INVARIANT(r.next < window_words);
    r.acc |= static_cast<u64>(stream_word(win, r.next)) << (32 - r.have);
    r.next += 1;
    r.have += 32;
  }
}

// Where value i's unit is in the units area (chunks kUnitStride bytes apart).
ENDOR_HD u32 unit_offset(u32 i) { return i / kHuffChunk * kUnitStride + i % kHuffChunk; }

// Phase 3a (one thread per chunk c), exphuff: check chunk c's edges (non-decreasing, within the
// tile; a chunk past the tile's values starts at the tile's end) and decode its values' units
// (exponent | high bits << exp_bits) into the units area, four to a 4-byte store. Returns
// kBadBits for a bad edge, a missing code, a unit past the chunk's end, or a chunk whose codes
// do not end exactly where the next chunk starts: the checks of endor_decode_exphuff_tiles
// (csrc/endor_cpu.c) and exphuff.decode_values_reference.
ENDOR_HD u32 decode_chunk(const Tile& tl, u32 c, u8* smem) {
  const Desc& d = *tl.d;
  ENDOR_INVARIANT(tl.reason == kOk && c < kHuffChunks);
  const u32 count = static_cast<u32>(tl.hi - tl.lo);
  // tile_bits[t], tile_bits[t+1] were checked in open_tile: span <= count * max_unit_bits
  const u32 span = static_cast<u32>(load_broadcast(d.tile_bits + tl.t + 1) -
                                    load_broadcast(d.tile_bits + tl.t));
  const u16* edges = d.chunk_bits + tl.t * (kHuffChunks - 1);  // chunks 1..7, from the tile start
  const u32 start = c == 0 ? 0u : edges[c - 1];
  const u32 end = c + 1 == kHuffChunks ? span : edges[c];
  if (start > end || end > span) return kBadBits;
  const u32 first = c * kHuffChunk;
  if (first >= count) return start == span ? kOk : kBadBits;
  const u32 n = count - first < kHuffChunk ? count - first : kHuffChunk;
  const u8* win = smem + codes_offset(d);
  const u32 window_words = (units_offset(d) - codes_offset(d)) / 4;
  const u16* table = reinterpret_cast<const u16*>(smem);  // staged over the values area
  u32* units = reinterpret_cast<u32*>(smem + units_offset(d) + c * kUnitStride);
  const u32 hb = high_bits(d), eb = d.exp_bits;
  u32 pos = tl.codes.head_bits + start;  // bit position in the window
  const u32 stop = tl.codes.head_bits + end;
  BitReader r = reader_at(win, pos);
  u32 packed = 0;  // the last four units, the newest in the top byte
#pragma unroll 1
  for (u32 i = 0; i < n; ++i) {
    refill(r, win, window_words);
    const u32 e = table[r.acc >> (64 - kHuffBits)];
    const u32 len = e & 15, w = len + hb;  // the code, then the high bits
    if (len == 0 || pos + w > stop) return kBadBits;
    const u32 high = static_cast<u32>(r.acc >> (64 - w)) & ((1u << hb) - 1);  // w >= 1
    r.acc <<= w;
    r.have -= w;
    pos += w;
    packed = packed >> 8 | ((e >> 4) | high << eb) << 24;
    if (i % 4 == 3) units[i / 4] = packed;
  }
  if (n % 4) units[n / 4] = packed >> (8 * (4 - n % 4));
  return pos == stop ? kOk : kBadBits;
}

// Phase 3a for the whole block: the chunk threads decode, the others have nothing to do.
ENDOR_HD u32 huff_decode(const Tile& tl, u32 tid, u8* smem) {
  return tid % kHuffStride == 0 ? decode_chunk(tl, tid / kHuffStride, smem) : kOk;
}

// A value from its unit (exponent | high << eb) and its residual's low bytes (8 * rb bits):
// residual r = low | high << 8*rb = sign << m | mantissa.
template <u32 EB>
ENDOR_HD typename BitsOf<EB>::T huff_value(u32 unit, u32 low, u32 m, u32 eb) {
  constexpr u32 kLowBits = EB == 2 ? 8 : 24;
  const u32 r = low | (unit >> eb) << kLowBits;
  return static_cast<typename BitsOf<EB>::T>(((r >> m) << (8 * EB - 1)) |
                                             (unit & ((1u << eb) - 1)) << m | (r & ((1u << m) - 1)));
}

// Phase 3b (thread tid), exphuff: rebuild the tile's values into the start of smem (over the
// decode table, no longer read), as expdict's rebuild_chunk: groups 4*tid, 4*(tid + 128), ...
// (one 4-byte read of their units, the residuals as expdict), then the last count % 4 values.
template <u32 EB>
ENDOR_HD void assemble_chunk(const Tile& tl, u32 tid, u8* smem) {
  typedef typename BitsOf<EB>::T T;
  constexpr u32 kRb = EB == 2 ? 1 : 3;
  const Desc& d = *tl.d;
  const u8* res = smem + residuals_offset(d);
  const u8* units = smem + units_offset(d);
  const u32 head = tl.vals.head_bits, m = d.man_bits, eb = d.exp_bits;
  const u32 count = static_cast<u32>(tl.hi - tl.lo);
  const u32 grouped = count / 4 * 4;
#pragma unroll 1
  for (u32 i0 = 4 * tid; i0 < grouped; i0 += 4 * kThreads) {
    const u32 u = *reinterpret_cast<const u32*>(units + unit_offset(i0));  // a group is in one chunk
    u32 low[4];
    group_lows<EB>(res, head + i0 * 8 * kRb, low);
    T v[4];
#pragma unroll
    for (u32 j = 0; j < 4; ++j) v[j] = huff_value<EB>((u >> (8 * j)) & 0xFF, low[j], m, eb);
    store_group<EB>(smem, i0, v);
  }
  T* out = reinterpret_cast<T*>(smem);
#pragma unroll 1
  for (u32 i = grouped + tid; i < count; i += kThreads) {
    const u8* r = res + head / 8 + i * kRb;
    u32 low = r[0];
    if (EB == 4) low |= static_cast<u32>(r[1]) << 8 | static_cast<u32>(r[2]) << 16;
    out[i] = huff_value<EB>(units[unit_offset(i)], low, m, eb);
  }
}

ENDOR_HD void assemble_values(const Tile& tl, u32 tid, u8* smem) {
  if (tl.d->elem_bytes == 4) {
    assemble_chunk<4>(tl, tid, smem);
  } else {
    assemble_chunk<2>(tl, tid, smem);
  }
}

// Phase 4 (thread tid), for elements of EB bytes: write the tile's 16-byte output chunks
// tid, tid+128, ... . `words` and `prefix` are the tile's bitmap words and each word's first
// value index relative to lo (shared memory); vals[i] = values[lo + i] (shared memory).
template <u32 EB>  // element bytes: 2 (fp16, bf16 bit patterns) or 4 (fp32 bit patterns)
ENDOR_HD void write_chunks(const Tile& tl, u32 tid, const u32* words, const u32* prefix,
                           const u8* staged) {
  typedef typename BitsOf<EB>::T T;
  constexpr u32 kPer = kChunk / EB;                      // elements per chunk: 8 or 4
  constexpr u32 kRounds = kTileElems / kPer / kThreads;  // chunk rounds per thread: 4 or 8
  const T* vals = reinterpret_cast<const T*>(staged);
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

// Phase 4: the values to expand are the staged raw values (from their head) or the rebuilt ones.
ENDOR_HD void write_outputs(const Tile& tl, u32 tid, const u32* words, const u32* prefix,
                            const u8* smem) {
  const u8* vals = tl.d->codec != kRaw ? smem : smem + tl.vals.head_bits / 8;
  if (tl.d->elem_bytes == 4) {
    write_chunks<4>(tl, tid, words, prefix, vals);
  } else {
    write_chunks<2>(tl, tid, words, prefix, vals);
  }
}

}  // namespace endor

#ifndef ENDOR_EMULATE
// The kernel: the phases above, separated by the barriers a block needs. Grid: one block per
// tile of the table (sum of ceil(n/4096)); block: 128 threads; dynamic shared memory: the
// largest smem_bytes() of the table. *error must be ~0 before the launch.
extern "C" __global__ void __launch_bounds__(endor::kThreads, endor::kMinBlocksPerSM)
    endor_decode_bitmap(const endor::Desc* __restrict__ descs,  // the table, first_tile ascending
                        unsigned int ndesc,                    // descriptors in the table (>= 1)
                        unsigned long long* __restrict__ error) {  // first bad (desc, tile, reason)
  using namespace endor;
  extern __shared__ Chunk16 smem_raw[];     // staged values / rebuilt values + windows, aligned
  __shared__ u32 words[kThreads];           // the tile's bitmap words
  __shared__ u32 prefix[kThreads];          // each word's first value index, relative to lo
  __shared__ u32 warp_totals[kWarps];       // per-warp popcount sums, for the block scan
  u8* smem = reinterpret_cast<u8*>(smem_raw);
  const u32 tid = threadIdx.x;

  const Tile tl = open_tile(descs, ndesc, blockIdx.x);
  // The bitmap word and the values are independent loads: issue the word first so its latency
  // overlaps the staging loads (16 resident blocks per SM keep enough of both in flight).
  u32 reason = tl.reason;
  const u32 word = load_word(tl, tid, &reason);
  if (tl.reason == kOk) stage_values(tl, tid, smem);

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

  // Barrier for staged streams, words and prefix; the whole block agrees on accept / reject.
  if (__syncthreads_or(reason != kOk)) {
    if (reason != kOk) report_error(error, error_key(tl.desc, tl.t, reason));
    return;
  }
  if (tl.d->codec == kExpHuff) {  // uniform in the block, as the codec tests below
    reason = huff_decode(tl, tid, smem);
    // Every unit is decoded and every chunk checked before a value is rebuilt over the table.
    if (__syncthreads_or(reason != kOk)) {
      if (reason != kOk) report_error(error, error_key(tl.desc, tl.t, reason));
      return;
    }
    assemble_values(tl, tid, smem);
    __syncthreads();  // every value is rebuilt before a chunk of step 4 reads it
  }
  if (tl.d->codec == kExpDict) {  // uniform in the block: no divergence at the barriers
    rebuild_values(tl, tid, smem);
    __syncthreads();  // every value is rebuilt before an escape overwrites one or a chunk reads it
    if (has_escapes(tl)) {  // the same for the whole block; most tiles have none
      reason = patch_escapes(tl, tid, smem);
      if (__syncthreads_or(reason != kOk)) {
        if (reason != kOk) report_error(error, error_key(tl.desc, tl.t, reason));
        return;
      }
    }
  }
  write_outputs(tl, tid, words, prefix, smem);
}
#endif  // ENDOR_EMULATE
