// Host emulation of cuda/endor_crc.cu: runs the kernels' own __host__ __device__ functions for
// every thread of every block, sequentially, in the kernels' phase order (the barrier after the
// tables becomes "all threads finish this phase"; the verdict's warp XOR is an XOR over the 32
// lanes; the atomics are plain read-modify-writes). Built with nvcc by
// tests/decode/test_crc_emulated.py; no GPU and no CUDA runtime needed.
//
//   endor_crc_emulate layout      sizeof/offsetof of Seg and Piece, the constants, threads, lanes
//   endor_crc_emulate run IN OUT
//
// IN (little-endian): "CRC1", the 160 u32 constants (gpu_crc.constants()), u32 ntables, then per
//     table: u32 nsegs, u32 npieces, nsegs 24-byte Seg records (of `data` only its value mod 128
//     is used: the harness places the segment at an address with the same remainder, as the row
//     layout depends on it), npieces 16-byte Piece records, then each segment's `length` bytes.
// OUT: per table: the u64 error word, then per segment the u32 CRC-32C its verdict computed.
//
// Memory checking (emulate_memory.h): every buffer the kernels touch (segments, pieces, constants,
// accumulators, the block's shared tables, each segment's bytes) is its own allocation with an
// inaccessible page on each side, as close to the trailing one as its alignment allows, its slack
// a canary verified afterwards; the kernel's loads assert byte-exactly that they read inside
// their segment (ENDOR_CRC_INVARIANT). tests/decode/test_crc_emulated.py builds it with the
// undefined-behaviour sanitizer: a misaligned word load stops it, as it would fault on the GPU.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "emulate_memory.h"

#include "../../cuda/endor_crc.cu"

using endor_crc::Piece;
using endor_crc::Seg;
using endor_crc::u32;
using endor_crc::u64;
using endor_crc::u8;

namespace {

using emulate::alloc;
using emulate::Buffer;
using emulate::die;
using emulate::intact;
using emulate::read_exact;
using emulate::read_u32;
using emulate::release;

const u8 kStale = 0xEE;  // shared memory and accumulators' neighbours before use

// Both launches, emulated. Launch 1: grid ceil(npieces / 8), block 256 threads, its static shared
// tables; launch 2: a warp per segment. acc is zeroed first (the launcher's memset).
u64 emulate_launches(const Seg* segs, u32 nsegs, const Piece* pieces, u32 npieces, const u32* consts,
                     u32* acc, u32* crcs) {
  using namespace endor_crc;
  std::memset(acc, 0, static_cast<size_t>(nsegs) * kLanes * 4);
  Buffer table = alloc(kTableWords * 4);
  u32* t = reinterpret_cast<u32*>(table.p);
  const u32 blocks = (npieces + kWarps - 1) / kWarps;
  for (u32 b = 0; b < blocks; ++b) {
    std::memset(t, kStale, kTableWords * 4);
    for (u32 tid = 0; tid < kThreads; ++tid) fill_table(tid, consts, t);
    // __syncthreads()
    for (u32 tid = 0; tid < kThreads; ++tid) {
      const u32 p = b * kWarps + tid / kLanes;
      if (p < npieces) fold_piece(segs, pieces, p, tid % kLanes, t, acc);
    }
  }
  const bool ok = intact(table);
  release(table);
  if (!ok) die("shared-memory canary overwritten");
  u64 error = ~0ull;
  for (u32 g = 0; g < nsegs; ++g) {
    u32 v = 0;  // the warp's __shfl_xor_sync butterfly: every lane ends with the XOR of all
    for (u32 lane = 0; lane < kLanes; ++lane) v ^= lane_term(acc, consts, g, lane);
    crcs[g] = segment_crc(segs[g], v);
    if (crcs[g] != segs[g].expected) report_error(&error, error_key(g, crcs[g]));
  }
  return error;
}

int run(const char* in_path, const char* out_path) {
  using namespace endor_crc;
  FILE* in = std::fopen(in_path, "rb");
  if (!in) die("cannot open input");
  FILE* out = std::fopen(out_path, "wb");
  if (!out) die("cannot open output");
  char magic[4];
  read_exact(in, magic, 4);
  if (std::memcmp(magic, "CRC1", 4)) die("bad magic");
  Buffer consts = alloc(kConsts * 4);
  read_exact(in, consts.p, consts.size);
  const u32 ntables = read_u32(in);
  for (u32 ti = 0; ti < ntables; ++ti) {
    const u32 nsegs = read_u32(in), npieces = read_u32(in);
    if (nsegs == 0) die("empty table");
    Buffer seg_buf = alloc(sizeof(Seg) * nsegs), piece_buf = alloc(sizeof(Piece) * npieces);
    Seg* segs = reinterpret_cast<Seg*>(seg_buf.p);
    Piece* pieces = reinterpret_cast<Piece*>(piece_buf.p);
    read_exact(in, segs, seg_buf.size);
    read_exact(in, pieces, piece_buf.size);
    // Preconditions the host side guarantees (gpu_crc.pack_segments): pieces in table order, each
    // of its segment's rows covered once, from its first row.
    std::vector<u64> covered(nsegs, 0);
    for (u32 p = 0; p < npieces; ++p) {
      const Piece& pc = pieces[p];
      if (pc.seg >= nsegs || pc.rows == 0 || pc.first_row != covered[pc.seg] ||
          (p > 0 && pieces[p - 1].seg > pc.seg))
        die("pieces break the host-side preconditions");
      covered[pc.seg] += pc.rows;
    }
    std::vector<Buffer> data(nsegs);
    for (u32 g = 0; g < nsegs; ++g) {
      const u64 start = reinterpret_cast<u64>(segs[g].data) % kRowBytes;
      const u64 ends = segs[g].length > 4 ? segs[g].length : 4;  // the inverted bytes' rows too
      if (covered[g] != (start + ends - 1) / kRowBytes + 1) die("a segment's rows are not all covered");
      data[g] = alloc(segs[g].length, kRowBytes, start);
      read_exact(in, data[g].p, data[g].size);
      segs[g].data = data[g].p;
    }
    Buffer acc = alloc(static_cast<size_t>(nsegs) * kLanes * 4);
    std::vector<u32> crcs(nsegs);
    const u64 error = emulate_launches(segs, nsegs, pieces, npieces, reinterpret_cast<const u32*>(consts.p),
                                       reinterpret_cast<u32*>(acc.p), crcs.data());
    std::fwrite(&error, 8, 1, out);
    std::fwrite(crcs.data(), 4, nsegs, out);
    bool ok = intact(seg_buf) && intact(piece_buf) && intact(acc) && intact(consts);
    for (Buffer& b : data) {
      ok = ok && intact(b);
      release(b);
    }
    release(seg_buf);
    release(piece_buf);
    release(acc);
    if (!ok) die("a canary next to a buffer was overwritten");
  }
  release(consts);
  std::fclose(in);
  if (std::fclose(out)) die("cannot write output");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && !std::strcmp(argv[1], "layout")) {
    std::printf("seg_size %zu\ndata %zu\nlength %zu\nexpected %zu\nunshift %zu\n", sizeof(Seg),
                offsetof(Seg, data), offsetof(Seg, length), offsetof(Seg, expected), offsetof(Seg, unshift));
    std::printf("piece_size %zu\nseg %zu\nfirst_row %zu\nrows %zu\nshift %zu\n", sizeof(Piece),
                offsetof(Piece, seg), offsetof(Piece, first_row), offsetof(Piece, rows), offsetof(Piece, shift));
    std::printf("consts %u\nthreads %u\nrow_bytes %u\npoly %u\n", endor_crc::kConsts, endor_crc::kThreads,
                endor_crc::kRowBytes, endor_crc::kPoly);
    return 0;
  }
  if (argc == 4 && !std::strcmp(argv[1], "run")) return run(argv[2], argv[3]);
  std::fprintf(stderr, "usage: %s layout | run IN OUT\n", argv[0]);
  return 2;
}
