/*
 * endor_crc.cu: the CRC-32C (Castagnoli) of every segment of an extent staged in device memory,
 * each compared with the CRC its manifest stores; one 8-byte error word tells the host whether
 * the whole extent passed. The launcher: endor_gds/decode/gpu_crc.py (NVRTC, options
 * gpu.NVRTC_OPTIONS; the tables are built by gpu_crc.pack_segments, the constants by
 * gpu_crc.constants()); the method, and why: docs/format.md, "How the GPU checks an extent".
 * No header is included: NVRTC has no system headers.
 *
 * Arithmetic is in GF(2)[x] mod P (P the CRC-32C polynomial), on 32-bit values in the bit order
 * of the CRC register (reflected: bit 31 is x^0). Feeding a register s one byte b gives
 * (s ^ b) * x^8, so after a 4-byte word w and n zero bytes it holds (s ^ w) * x^(32 + 8n): a
 * CRC is linear in the bytes, and a stretch of zeros is a multiplication by a power of x.
 *
 * Launch 1, endor_crc_pieces. Memory is cut into 128-byte rows at 128-byte aligned addresses; a
 * segment covers the rows that hold its bytes and its first four (a shorter segment too), and a
 * *piece* is up to 256 consecutive rows of one segment (32 KiB), one warp each (the host lists
 * the pieces, each segment's first piece the short one). Lane c reads the 4-byte word at
 * column c of every row of its piece (a row is one coalesced 128-byte load per warp) and keeps a
 * register s <- (s ^ w) * x^1024: the word and the 124 bytes after it in its row, which the other
 * lanes hold and add by linearity. The multiplication by x^1024 is eight lookups, one per nibble
 * of s ^ w, in tables kept in shared memory 32 times over, so that lane c reads only bank c: no
 * bank conflicts whatever the data. Bytes outside the segment read as zero (a zero byte before a
 * CRC's first byte changes nothing; the zeros after its last byte are taken back below), and the
 * segment's first four bytes are read inverted: that is what CRC-32C's initial value ~0 does.
 * After its piece, lane c's register is the CRC (zero initial value) of its column of the piece,
 * continued 4c bytes past the piece's last row; multiplied by x^(1024 * rows after the piece in
 * the segment) (the piece's `shift`, from the host) it reaches the end of the segment's last row,
 * and it is XORed into the segment's accumulator of lane c: acc[seg * 32 + c].
 *
 * Launch 2, endor_crc_verdict: one warp per segment. Lane c multiplies acc[seg * 32 + c] by
 * x^(-32c) (consts), the warp XORs the 32 terms: the register after the segment and the t zero
 * bytes to the end of its last row; times x^(-8t) (the segment's `unshift`) it is the register
 * after the segment, and CRC-32C its complement. A segment whose CRC differs from `expected`
 * atomicMin's seg << 32 | computed CRC into *error (~0 before the launch), so the first bad
 * segment in table order and its CRC come back in one 8-byte word.
 *
 * Contract. The host guarantees the pieces cover every row of every segment exactly once, each
 * piece's shift and each segment's unshift as above, consts = gpu_crc.constants(), acc zeroed and
 * *error = ~0 before launch 1. Segments may start at any byte and be of any length, 0 included;
 * the kernel reads only bytes inside them (4-byte aligned words whole, and the bytes of a word
 * that are inside where a row holds the segment's first four bytes or its last byte).
 *
 * Tested without a GPU: tests/decode/test_cuda_compile.py compiles it with nvcc (sm_80, sm_90,
 * warnings as errors, no spills); tests/support/endor_crc_emulate.cu runs its per-thread functions
 * on the CPU (-DENDOR_EMULATE).
 */

#if defined(ENDOR_EMULATE) && !defined(__CUDA_ARCH__)
// Host emulation only: the harness defines endor_emulate_invariant() and aborts on a violation.
#define ENDOR_CRC_INVARIANT(cond) ::endor_emulate_invariant((cond), #cond, __FILE__, __LINE__)
#else
#define ENDOR_CRC_INVARIANT(cond) ((void)0)
#endif

#define ENDOR_CRC_HD __host__ __device__ __forceinline__

namespace endor_crc {

typedef unsigned char u8;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

constexpr u32 kPoly = 0x82F63B78u;          // CRC-32C, reflected (gpu_crc.POLY)
constexpr u32 kLanes = 32;                  // a warp; lane c reads column c of each row
constexpr u32 kRowBytes = 4 * kLanes;       // 128: one 4-byte word per lane (gpu_crc.ROW_BYTES)
constexpr u32 kNibbles = 8;                 // lookups per word: one 16-entry table per nibble
constexpr u32 kTableEntries = kNibbles * 16;       // (v << 4k) * x^1024 for nibble k, value v
constexpr u32 kTableWords = kTableEntries * kLanes;  // 32 copies, one per bank: 16 KB of shared memory
constexpr u32 kConsts = kTableEntries + kLanes;  // consts: the tables, then x^(-32c) per lane c
static_assert(kConsts == 160, "gpu_crc.constants() is 160 words");
constexpr u32 kThreads = 256;               // 8 warps: 8 pieces per block (gpu_crc.THREADS)
constexpr u32 kWarps = kThreads / kLanes;
// 8 blocks x 256 threads = 2048 threads per SM (full occupancy on sm_80 / sm_90), 8 x 16 KB of
// tables = 128 KB of shared memory (sm_80 has 164 KB, sm_90 228 KB); it caps registers at 32 per
// thread, which the kernel fits without spilling (tests/decode/test_cuda_compile.py fails on any).
constexpr u32 kMinBlocksPerSM = 8;
// Rows loaded before the first of them is folded: 8 loads in flight per lane (1 KB per warp,
// 64 KB per SM) cover HBM's latency at full bandwidth; the fold of a row waits on shared memory.
constexpr u32 kUnroll = 8;

// One segment (gpu_crc.SEG_DTYPE; the emulation test checks the two agree).
struct Seg {
  const u8* data;   // its first byte: any alignment
  u64 length;       // bytes, 0 allowed
  u32 expected;     // the CRC-32C the manifest stores
  u32 unshift;      // x^(-8t) mod P: t = bytes from its end to the end of its last row
};
static_assert(sizeof(Seg) == 24, "Seg must match gpu_crc.SEG_DTYPE");

// Rows of one segment, for one warp (gpu_crc.PIECE_DTYPE).
struct Piece {
  u32 seg;          // its segment's index in the table
  u32 first_row;    // counted from the segment's first row (the 128-byte row holding its byte 0)
  u32 rows;         // >= 1
  u32 shift;        // x^(1024 * rows of the segment after this piece) mod P
};
static_assert(sizeof(Piece) == 16, "Piece must match gpu_crc.PIECE_DTYPE");

// a * b mod P: one pass over a's 32 coefficients, b times x at each (no branch: the same path
// for every lane). A piece needs one, a segment's verdict two.
ENDOR_CRC_HD u32 gf_mul(u32 a, u32 b) {
  u32 p = 0;
#pragma unroll 8
  for (u32 i = 0; i < 32; ++i) {
    p ^= b & (0u - ((a >> (31 - i)) & 1u));
    b = (b >> 1) ^ (kPoly & (0u - (b & 1u)));
  }
  return p;
}

// Whole words of a segment: 4-byte aligned, read exactly once, so through the read-only path and
// not kept in L1 (which shares its memory with the tables).
ENDOR_CRC_HD u32 load_word(const Seg& sg, i64 rel) {
  ENDOR_CRC_INVARIANT(rel >= 0 && static_cast<u64>(rel) + 4 <= sg.length);
  const u8* p = sg.data + rel;
#ifdef __CUDA_ARCH__
  u32 r;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
#else
  return *reinterpret_cast<const u32*>(p);
#endif
}

ENDOR_CRC_HD u32 load_byte(const Seg& sg, i64 rel) {
  ENDOR_CRC_INVARIANT(rel >= 0 && static_cast<u64>(rel) < sg.length);
  return sg.data[rel];
}

// The word at `rel` (bytes from the segment's start; 4-byte aligned in memory, possibly partly or
// wholly outside the segment) as the CRC reads it: bytes outside are zero, the first four bytes of
// the segment are inverted (CRC-32C's initial value; for a segment shorter than 4 bytes the
// inverted bytes run past its end, into zeros the verdict takes back).
ENDOR_CRC_HD u32 masked_word(const Seg& sg, i64 rel) {
  u32 w = 0;
#pragma unroll
  for (u32 b = 0; b < 4; ++b) {
    const i64 q = rel + b;
    u32 v = q >= 0 && static_cast<u64>(q) < sg.length ? load_byte(sg, q) : 0u;
    if (q >= 0 && q < 4) v ^= 0xFFu;
    w |= v << (8 * b);
  }
  return w;
}

// x * x^1024 mod P for this lane: each nibble of x picks an entry of its table in the lane's own
// copy. Entry e of copy c is word e * 32 + c (bank c): for nibble k of value v the byte offset is
// k * 2048 + v * 128 + 4c, built with one shift and one and-or (lane_bytes = 4c).
ENDOR_CRC_HD u32 advance(u32 x, const u32* table, u32 lane_bytes) {
  const u8* t = reinterpret_cast<const u8*>(table);
  u32 r = 0;
#pragma unroll
  for (u32 k = 0; k < kNibbles; ++k) {
    const u32 v128 = (k == 0 ? x << 7 : k == 1 ? x << 3 : x >> (4 * k - 7)) & 0x780u;
    r ^= *reinterpret_cast<const u32*>(t + k * 16 * kRowBytes + (v128 | lane_bytes));
  }
  return r;
}

// Phase 1 (every thread of a block): the 32 copies of the tables (consts[0..128)).
ENDOR_CRC_HD void fill_table(u32 tid, const u32* consts, u32* table) {
  for (u32 i = tid; i < kTableWords; i += kThreads) table[i] = consts[i / kLanes];
}

// Phase 2 (lane `lane` of the warp given piece `pc`): the lane's register after its column of the
// piece. Rows holding the segment's first four bytes (one or two) or its last byte (the only rows
// where a word can be partly outside it) go through masked_word; the rows between are whole words.
ENDOR_CRC_HD u32 piece_register(const Seg& sg, const Piece& pc, u32 lane, const u32* table) {
  const i64 start = static_cast<i64>(reinterpret_cast<u64>(sg.data) % kRowBytes);  // in its first row
  const u32 n = pc.rows;
  const u64 head_rows = (start + 3) / kRowBytes + 1;  // the rows of the first four bytes
  u32 h = 0;  // this piece's rows among them
  if (head_rows > pc.first_row) h = head_rows - pc.first_row < n ? static_cast<u32>(head_rows - pc.first_row) : n;
  u32 m = n;  // the row of the last byte, where it is past the head rows in this piece
  if (sg.length > 0) {
    const u64 last_row = (start + sg.length - 1) / kRowBytes;
    if (last_row >= pc.first_row + static_cast<u64>(h) && last_row < pc.first_row + static_cast<u64>(n))
      m = static_cast<u32>(last_row - pc.first_row);
  }
  const u32 lane_bytes = 4 * lane;
  i64 rel = static_cast<i64>(pc.first_row) * kRowBytes - start + lane_bytes;  // this lane's word in row i
  u32 s = 0;
  u32 i = 0;
  for (; i < h; ++i, rel += kRowBytes) s = advance(s ^ masked_word(sg, rel), table, lane_bytes);
  for (; i + kUnroll <= m; i += kUnroll, rel += kUnroll * kRowBytes) {
    u32 w[kUnroll];
#pragma unroll
    for (u32 j = 0; j < kUnroll; ++j) w[j] = load_word(sg, rel + j * kRowBytes);
#pragma unroll
    for (u32 j = 0; j < kUnroll; ++j) s = advance(s ^ w[j], table, lane_bytes);
  }
  for (; i < m; ++i, rel += kRowBytes) s = advance(s ^ load_word(sg, rel), table, lane_bytes);
  for (; i < n; ++i, rel += kRowBytes) s = advance(s ^ masked_word(sg, rel), table, lane_bytes);
  return s;
}

ENDOR_CRC_HD void xor_into(u32* p, u32 v) {
#ifdef __CUDA_ARCH__
  atomicXor(p, v);  // result unused: a reduction (RED), no round trip
#else
  *p ^= v;
#endif
}

// Phase 2, whole: piece p's lane `lane` folds its column into its segment's accumulator.
ENDOR_CRC_HD void fold_piece(const Seg* segs, const Piece* pieces, u32 p, u32 lane, const u32* table,
                             u32* acc) {
  const Piece pc = pieces[p];
  const u32 s = piece_register(segs[pc.seg], pc, lane, table);
  xor_into(&acc[static_cast<u64>(pc.seg) * kLanes + lane], gf_mul(s, pc.shift));
}

// Verdict, per lane: acc's column c brought back from 4c bytes past the segment's last row.
ENDOR_CRC_HD u32 lane_term(const u32* acc, const u32* consts, u32 g, u32 lane) {
  return gf_mul(acc[static_cast<u64>(g) * kLanes + lane], consts[kTableEntries + lane]);
}

// Verdict, per segment: its CRC-32C from the XOR of its lanes' terms.
ENDOR_CRC_HD u32 segment_crc(const Seg& sg, u32 sum) { return ~gf_mul(sum, sg.unshift); }

ENDOR_CRC_HD u64 error_key(u32 g, u32 crc) { return (static_cast<u64>(g) << 32) | crc; }

ENDOR_CRC_HD void report_error(u64* error, u64 key) {
#ifdef __CUDA_ARCH__
  atomicMin(error, key);
#else
  if (key < *error) *error = key;
#endif
}

}  // namespace endor_crc

#ifndef ENDOR_EMULATE
// Launch 1. Grid: ceil(npieces / 8) blocks of 256 threads, a warp per piece; no dynamic shared
// memory. acc (32 words per segment) must be zero before the launch.
extern "C" __global__ void __launch_bounds__(endor_crc::kThreads, endor_crc::kMinBlocksPerSM)
    endor_crc_pieces(const endor_crc::Seg* __restrict__ segs,      // the table's segments
                     const endor_crc::Piece* __restrict__ pieces,  // every row of them, once
                     unsigned int npieces,                         // >= 1
                     const unsigned int* __restrict__ consts,      // gpu_crc.constants()
                     unsigned int* __restrict__ acc) {             // [segment][lane] registers
  using namespace endor_crc;
  __shared__ u32 table[kTableWords];
  fill_table(threadIdx.x, consts, table);
  __syncthreads();  // every copy of the tables is written before a lane reads its own
  const u32 p = blockIdx.x * kWarps + threadIdx.x / kLanes;
  if (p < npieces) fold_piece(segs, pieces, p, threadIdx.x % kLanes, table, acc);
}

// Launch 2, after launch 1 on the same stream. Grid: ceil(nsegs / 8) blocks of 256 threads, a
// warp per segment. *error must be ~0 before the launch.
extern "C" __global__ void __launch_bounds__(endor_crc::kThreads)
    endor_crc_verdict(const endor_crc::Seg* __restrict__ segs, unsigned int nsegs,
                      const unsigned int* __restrict__ consts, const unsigned int* __restrict__ acc,
                      unsigned long long* __restrict__ error) {  // first bad (segment, CRC)
  using namespace endor_crc;
  const u32 g = blockIdx.x * kWarps + threadIdx.x / kLanes;
  if (g >= nsegs) return;  // the whole warp: the shuffles below have all 32 lanes
  const u32 lane = threadIdx.x % kLanes;
  u32 v = lane_term(acc, consts, g, lane);
#pragma unroll
  for (u32 offset = kLanes / 2; offset > 0; offset /= 2) v ^= __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) {
    const u32 crc = segment_crc(segs[g], v);
    if (crc != segs[g].expected) report_error(error, error_key(g, crc));
  }
}
#endif  // ENDOR_EMULATE
