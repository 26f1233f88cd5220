// Host emulation of cuda/endor_decode.cu: runs the kernel's own __host__ __device__ functions for
// every thread of every block, sequentially, in the same phase order as the kernel (the barriers
// become "all threads finish this phase"; the warp scan runs lane by lane in lock-step with the
// same scan_step; the block's __syncthreads_or is an OR over threads; atomicMin is a min).
// Built with nvcc by tests/decode/test_cuda_emulated.py; no GPU and no CUDA runtime needed.
//
//   endor_decode_emulate layout              sizeof/offsetof of endor::Desc, one "name value" a line
//   endor_decode_emulate run IN OUT [--malloc]
//
// IN  (little-endian): "EMU2", u32 ntables, then per table: u32 ndesc, ndesc 200-byte Desc
//     records (pointers ignored except whether bitmap and tile_offsets are null, every other
//     field used), then per descriptor its bitmap (4*ceil(n/32) bytes; none when null), values
//     (values_capacity bytes), tile offsets (4*(ntiles+1) bytes; none when null), for codec
//     expdict its codes (codes_capacity bytes), escape offsets (4*(ntiles+1)), escape positions
//     (2*escapes) and escape values (elem_bytes*escapes), for codec exphuff its bits
//     (bits_capacity bytes), tile bits (4*(ntiles+1)), chunk bits (2*7*ntiles) and decode table
//     (8192 bytes).
// OUT: per table: u64 error word, then per descriptor its n*elem_bytes output bytes.
//
// Memory checking (emulate_memory.h): every buffer the kernel touches (descriptors, bitmap, values,
// offsets, codes, escape tables, bits, tile and chunk bits, decode table, output, shared memory)
// is its own allocation of exactly its size, 16-byte aligned against a trailing guard page, its
// slack a canary verified afterwards; --malloc: plain posix_memalign, for running under valgrind,
// which checks every byte read and written. tests/decode/test_cuda_emulated.py builds it with the
// undefined-behaviour sanitizer, so a misaligned access or a shift by 32 (fine on x86, a fault
// or a different result on the GPU) stops it too.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "emulate_memory.h"

#include "../../cuda/endor_decode.cu"

using endor::Desc;
using endor::u32;
using endor::u64;
using endor::u8;

namespace {

using emulate::alloc;
using emulate::Buffer;
using emulate::die;
using emulate::intact;
using emulate::read_exact;
using emulate::read_u32;
using emulate::release;

const u8 kPoison = 0xA5;   // output before the decode: an unwritten element fails the comparison
const u8 kStale = 0xEE;    // shared memory before each block: reading unstaged bytes shows

struct Tensor {
  Buffer bitmap, values, offsets, out, codes, escape_offsets, escape_positions, escape_values;
  Buffer bits, tile_bits, chunk_bits, huff_table;  // exphuff
};

// Every buffer of a tensor that was allocated (a dense tensor has no bitmap and no offsets).
std::vector<Buffer*> buffers(Tensor& t) {
  std::vector<Buffer*> all;
  for (Buffer* b : {&t.bitmap, &t.values, &t.offsets, &t.out, &t.codes, &t.escape_offsets,
                    &t.escape_positions, &t.escape_values, &t.bits, &t.tile_bits, &t.chunk_bits,
                    &t.huff_table})
    if (b->p) all.push_back(b);
  return all;
}

// One launch of the kernel, emulated: grid = total tiles, block = kThreads, dynamic shared
// memory = the largest smem_bytes of the table (as kernels.py passes it) + the static arrays.
u64 emulate_launch(const Desc* descs, u32 ndesc, u64 total_tiles, u32 smem_size) {
  using namespace endor;
  Buffer staged = alloc(smem_size);
  Buffer words_buf = alloc(kThreads * 4), prefix_buf = alloc(kThreads * 4);
  Buffer totals_buf = alloc(kWarps * 4);
  u32* words = reinterpret_cast<u32*>(words_buf.p);
  u32* prefix = reinterpret_cast<u32*>(prefix_buf.p);
  u32* warp_totals = reinterpret_cast<u32*>(totals_buf.p);
  u64 error = ~0ull;
  std::vector<Tile> tl(kThreads);
  std::vector<u32> word(kThreads), reason(kThreads), count(kThreads), inclusive(kThreads);
  std::vector<u32> up(32);

  for (u64 g = 0; g < total_tiles; ++g) {
    std::memset(staged.p, kStale, staged.size);
    std::memset(words, kStale, kThreads * 4);
    std::memset(prefix, kStale, kThreads * 4);
    std::memset(warp_totals, kStale, kWarps * 4);
    // Phase 1: open the tile, load the word, stage values (per thread, as in the kernel).
    for (u32 tid = 0; tid < kThreads; ++tid) {
      tl[tid] = open_tile(descs, ndesc, g);
      reason[tid] = tl[tid].reason;
      word[tid] = load_word(tl[tid], tid, &reason[tid]);
      if (tl[tid].reason == kOk) stage_values(tl[tid], tid, staged.p);
      count[tid] = popc32(word[tid]);
      inclusive[tid] = count[tid];
    }
    // Phase 2: warp scans in lock-step (__shfl_up_sync gives lanes below `offset` their own value).
    for (u32 w = 0; w < kWarps; ++w) {
      for (u32 offset = 1; offset < 32; offset *= 2) {
        for (u32 lane = 0; lane < 32; ++lane)
          up[lane] = inclusive[w * 32 + (lane >= offset ? lane - offset : lane)];
        for (u32 lane = 0; lane < 32; ++lane)
          inclusive[w * 32 + lane] = scan_step(inclusive[w * 32 + lane], up[lane], lane, offset);
      }
      warp_totals[w] = inclusive[w * 32 + 31];
    }
    // __syncthreads(); then prefixes, words, verdicts.
    bool any_bad = false;
    for (u32 tid = 0; tid < kThreads; ++tid) {
      u32 total;
      prefix[tid] = block_prefix(inclusive[tid] - count[tid], warp_totals, tid / 32, &total);
      words[tid] = word[tid];
      reason[tid] = tile_verdict(tl[tid], reason[tid], total);
      any_bad = any_bad || reason[tid] != kOk;
    }
    // __syncthreads_or(reason != kOk)
    if (any_bad) {
      for (u32 tid = 0; tid < kThreads; ++tid)
        if (reason[tid] != kOk) report_error(&error, error_key(tl[tid].desc, tl[tid].t, reason[tid]));
      continue;
    }
    if (tl[0].d->codec == kExpHuff) {
      // Phase 3a: the chunk threads decode; __syncthreads_or(reason != kOk); phase 3b: rebuild;
      // __syncthreads().
      for (u32 tid = 0; tid < kThreads; ++tid) {
        reason[tid] = huff_decode(tl[tid], tid, staged.p);
        any_bad = any_bad || reason[tid] != kOk;
      }
      if (any_bad) {
        for (u32 tid = 0; tid < kThreads; ++tid)
          if (reason[tid] != kOk) report_error(&error, error_key(tl[tid].desc, tl[tid].t, reason[tid]));
        continue;
      }
      for (u32 tid = 0; tid < kThreads; ++tid) assemble_values(tl[tid], tid, staged.p);
    }
    if (tl[0].d->codec == kExpDict) {
      // Phase 3b: rebuild; __syncthreads(); phase 3c, in a tile with escapes: escapes;
      // __syncthreads_or(reason != kOk).
      for (u32 tid = 0; tid < kThreads; ++tid) rebuild_values(tl[tid], tid, staged.p);
      for (u32 tid = 0; tid < kThreads && has_escapes(tl[0]); ++tid) {
        reason[tid] = patch_escapes(tl[tid], tid, staged.p);
        any_bad = any_bad || reason[tid] != kOk;
      }
      if (any_bad) {
        for (u32 tid = 0; tid < kThreads; ++tid)
          if (reason[tid] != kOk) report_error(&error, error_key(tl[tid].desc, tl[tid].t, reason[tid]));
        continue;
      }
    }
    // Phase 4: outputs.
    for (u32 tid = 0; tid < kThreads; ++tid) write_outputs(tl[tid], tid, words, prefix, staged.p);
  }
  bool ok = intact(staged) && intact(words_buf) && intact(prefix_buf) && intact(totals_buf);
  release(staged);
  release(words_buf);
  release(prefix_buf);
  release(totals_buf);
  if (!ok) die("shared-memory canary overwritten");
  return error;
}

int run(const char* in_path, const char* out_path) {
  FILE* in = std::fopen(in_path, "rb");
  if (!in) die("cannot open input");
  FILE* out = std::fopen(out_path, "wb");
  if (!out) die("cannot open output");
  char magic[4];
  read_exact(in, magic, 4);
  if (std::memcmp(magic, "EMU2", 4)) die("bad magic");
  const u32 ntables = read_u32(in);
  for (u32 ti = 0; ti < ntables; ++ti) {
    const u32 ndesc = read_u32(in);
    if (ndesc == 0) die("empty table");
    Buffer desc_buf = alloc(sizeof(Desc) * ndesc);
    Desc* descs = reinterpret_cast<Desc*>(desc_buf.p);
    read_exact(in, descs, sizeof(Desc) * ndesc);
    std::vector<Tensor> ts(ndesc);
    u64 total_tiles = 0;
    u32 smem_size = 0;
    for (u32 k = 0; k < ndesc; ++k) {
      Desc& d = descs[k];
      const u64 ntiles = (d.n + endor::kTileElems - 1) / endor::kTileElems;
      const bool expdict = d.codec == endor::kExpDict, exphuff = d.codec == endor::kExpHuff;
      const bool dense = d.bitmap == nullptr;
      // Preconditions the host side guarantees (kernels.check_items / pack_descriptors).
      const u64 value_bytes = d.codec == endor::kRaw ? d.elem_bytes : endor::residual_bytes(d);
      if (d.n == 0 || d.nnz > d.n || d.nnz * value_bytes > d.values_capacity ||
          (d.elem_bytes != 2 && d.elem_bytes != 4) || d.first_tile != total_tiles ||
          (d.codec != endor::kRaw && !expdict && !exphuff) || dense != (d.tile_offsets == nullptr) ||
          (dense && (!exphuff || d.nnz != d.n)))
        die("descriptor breaks the host-side preconditions");
      if (exphuff && ((d.elem_bytes == 2) != (d.man_bits == 7 || d.man_bits == 10) ||
                      (d.elem_bytes == 4) != (d.man_bits == 23) ||
                      d.exp_bits != (d.man_bits == 10 ? 5u : 8u) || (d.nbits + 7) / 8 > d.bits_capacity))
        die("exphuff descriptor breaks the host-side preconditions");
      if (expdict && (d.index_bits < 1 || d.index_bits > endor::kMaxIndexBits ||
                      (d.elem_bytes == 2) != (d.man_bits == 7 || d.man_bits == 10) ||
                      (d.elem_bytes == 4) != (d.man_bits == 23) || d.escapes > d.nnz ||
                      (d.nnz * endor::field_bits(d) + 7) / 8 > d.codes_capacity))
        die("expdict descriptor breaks the host-side preconditions");
      total_tiles += ntiles;
      smem_size = endor::smem_bytes(d) > smem_size ? endor::smem_bytes(d) : smem_size;
      Tensor& t = ts[k];
      if (!dense) t.bitmap = alloc((d.n + 31) / 32 * 4);
      t.values = alloc(d.values_capacity);
      if (!dense) t.offsets = alloc((ntiles + 1) * 4);
      t.out = alloc(d.n * d.elem_bytes);
      read_exact(in, t.bitmap.p, t.bitmap.size);
      read_exact(in, t.values.p, t.values.size);
      read_exact(in, t.offsets.p, t.offsets.size);
      if (exphuff) {
        t.bits = alloc(d.bits_capacity);
        t.tile_bits = alloc((ntiles + 1) * 4);
        t.chunk_bits = alloc(ntiles * (endor::kHuffChunks - 1) * 2);
        t.huff_table = alloc((1u << endor::kHuffBits) * 2);
        read_exact(in, t.bits.p, t.bits.size);
        read_exact(in, t.tile_bits.p, t.tile_bits.size);
        read_exact(in, t.chunk_bits.p, t.chunk_bits.size);
        read_exact(in, t.huff_table.p, t.huff_table.size);
        d.bits = t.bits.p;
        d.tile_bits = reinterpret_cast<const u32*>(t.tile_bits.p);
        d.chunk_bits = reinterpret_cast<const endor::u16*>(t.chunk_bits.p);
        d.huff_table = reinterpret_cast<const endor::u16*>(t.huff_table.p);
      }
      if (expdict) {
        t.codes = alloc(d.codes_capacity);
        t.escape_offsets = alloc((ntiles + 1) * 4);
        t.escape_positions = alloc(d.escapes * 2);
        t.escape_values = alloc(d.escapes * d.elem_bytes);
        read_exact(in, t.codes.p, t.codes.size);
        read_exact(in, t.escape_offsets.p, t.escape_offsets.size);
        read_exact(in, t.escape_positions.p, t.escape_positions.size);
        read_exact(in, t.escape_values.p, t.escape_values.size);
        d.codes = t.codes.p;
        d.escape_offsets = reinterpret_cast<const u32*>(t.escape_offsets.p);
        d.escape_positions = reinterpret_cast<const endor::u16*>(t.escape_positions.p);
        d.escape_values = t.escape_values.p;
      }
      std::memset(t.out.p, kPoison, t.out.size);
      d.bitmap = reinterpret_cast<const u32*>(t.bitmap.p);  // null for a dense tensor
      d.values = t.values.p;
      d.tile_offsets = reinterpret_cast<const u32*>(t.offsets.p);
      d.out = t.out.p;
    }
    const u64 error = emulate_launch(descs, ndesc, total_tiles, smem_size);
    std::fwrite(&error, 8, 1, out);
    bool ok = intact(desc_buf);
    for (Tensor& t : ts) {
      std::fwrite(t.out.p, 1, t.out.size, out);
      for (Buffer* b : buffers(t)) {
        ok = ok && intact(*b);
        release(*b);
      }
    }
    release(desc_buf);
    if (!ok) die("a canary next to a tensor buffer was overwritten");
  }
  std::fclose(in);
  if (std::fclose(out)) die("cannot write output");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && !std::strcmp(argv[1], "layout")) {
    std::printf("sizeof %zu\n", sizeof(Desc));
    std::printf("bitmap %zu\nvalues %zu\nvalues_capacity %zu\ntile_offsets %zu\nout %zu\n",
                offsetof(Desc, bitmap), offsetof(Desc, values), offsetof(Desc, values_capacity),
                offsetof(Desc, tile_offsets), offsetof(Desc, out));
    std::printf("n %zu\nnnz %zu\nfirst_tile %zu\nelem_bytes %zu\ncodec %zu\n", offsetof(Desc, n),
                offsetof(Desc, nnz), offsetof(Desc, first_tile), offsetof(Desc, elem_bytes),
                offsetof(Desc, codec));
    std::printf("codes %zu\ncodes_capacity %zu\nescape_offsets %zu\nescape_positions %zu\n",
                offsetof(Desc, codes), offsetof(Desc, codes_capacity),
                offsetof(Desc, escape_offsets), offsetof(Desc, escape_positions));
    std::printf("escape_values %zu\nescapes %zu\nindex_bits %zu\nman_bits %zu\nexponents %zu\n",
                offsetof(Desc, escape_values), offsetof(Desc, escapes), offsetof(Desc, index_bits),
                offsetof(Desc, man_bits), offsetof(Desc, exponents));
    std::printf("bits %zu\nbits_capacity %zu\ntile_bits %zu\nchunk_bits %zu\nhuff_table %zu\n",
                offsetof(Desc, bits), offsetof(Desc, bits_capacity), offsetof(Desc, tile_bits),
                offsetof(Desc, chunk_bits), offsetof(Desc, huff_table));
    std::printf("nbits %zu\nexp_bits %zu\nreserved %zu\n", offsetof(Desc, nbits),
                offsetof(Desc, exp_bits), offsetof(Desc, reserved));
    std::printf("stage_bytes_2 %u\nstage_bytes_4 %u\nthreads %u\n", endor::stage_bytes(2),
                endor::stage_bytes(4), endor::kThreads);
    // smem_bytes of each (codec, element bytes, mantissa bits) the format has
    const unsigned combos[][3] = {{0, 2, 0}, {0, 4, 0}, {1, 2, 7}, {1, 2, 10}, {1, 4, 23},
                                  {2, 2, 7}, {2, 2, 10}, {2, 4, 23}};
    for (const auto& c : combos) {
      Desc d{};
      d.codec = c[0];
      d.elem_bytes = c[1];
      d.man_bits = c[2];
      std::printf("smem_%u_%u_%u %u\n", c[0], c[1], c[2], endor::smem_bytes(d));
    }
    return 0;
  }
  if ((argc == 4 || argc == 5) && !std::strcmp(argv[1], "run")) {
    if (argc == 5) {
      if (std::strcmp(argv[4], "--malloc")) die("unknown option");
      emulate::g_malloc = true;
    }
    return run(argv[2], argv[3]);
  }
  std::fprintf(stderr, "usage: %s layout | run IN OUT [--malloc]\n", argv[0]);
  return 2;
}
