/*
 * CPU decoder for format v1 (bitmap + packed values + tile offsets), see docs/format.md.
 *
 * Why C and SIMD: the per-element work is "next value or zero", a data-dependent choice. Scalar
 * code (numpy scatter, or a numba loop) runs at 0.3-1 GB/s of dense output per core, slower than
 * an NVMe drive, which would make the sparse file slower to stream than the dense one. With SSSE3
 * one bitmap byte selects a 16-byte shuffle mask from a 256-entry table; one unaligned 16-byte
 * load of the next values, one pshufb and one store then produce 8 fp16 outputs ("expand"), and
 * the byte's popcount advances the value cursor. That runs at memory speed (~6 GB/s per core).
 *
 * Safety: inputs come from a file. Nothing here reads or writes out of bounds whatever the
 * bitmap, values count or tile offsets say: the fast path only runs while a full word's worth of
 * values exists past the cursor, the scalar path checks the cursor before every read, and each
 * tile's final cursor must equal its end offset. A mismatch is reported (tile index + 1) and the
 * caller raises DecodeError; the output of a failed call must not be used.
 *
 * Threads: the caller splits tiles into ranges and calls from several threads; the function
 * keeps no state (the lookup tables are built once, before the first call returns).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <tmmintrin.h>
#define ENDOR_X86 1
#else
#define ENDOR_X86 0
#endif

#define WORD_BITS 32
#define TILE_ELEMS 4096 /* format.TILE_ELEMS: 128 bitmap words */

/* Shuffle masks: for a bitmap byte b, the 16 byte indices that expand the next popcount(b)
 * packed 2-byte values into 8 lanes (0x80 = zero the lane). The 4-byte variant works on nibbles. */
static uint8_t EXPAND16[256][16];
static uint8_t EXPAND32[16][16];
static uint8_t POP8[256];
static int tables_ready = 0;
static int use_simd = 0;

static void build_tables(void) {
    for (int b = 0; b < 256; b++) {
        int r = 0;
        for (int k = 0; k < 8; k++) {
            if ((b >> k) & 1) {
                EXPAND16[b][2 * k] = (uint8_t)(2 * r);
                EXPAND16[b][2 * k + 1] = (uint8_t)(2 * r + 1);
                r++;
            } else {
                EXPAND16[b][2 * k] = 0x80;
                EXPAND16[b][2 * k + 1] = 0x80;
            }
        }
        POP8[b] = (uint8_t)r;
    }
    for (int b = 0; b < 16; b++) {
        int r = 0;
        for (int k = 0; k < 4; k++) {
            for (int i = 0; i < 4; i++)
                EXPAND32[b][4 * k + i] = ((b >> k) & 1) ? (uint8_t)(4 * r + i) : 0x80;
            if ((b >> k) & 1) r++;
        }
    }
#if ENDOR_X86
    __builtin_cpu_init();
    use_simd = __builtin_cpu_supports("ssse3");
#endif
    tables_ready = 1;
}

/* Scalar decode of bits [0, m) of one word at out. Returns 0, or -1 when the tile runs out. */
#define SCALAR_WORD(T)                                                                   \
    static int scalar_word_##T(uint32_t word, int m, const T *vals, uint64_t *v,       \
                               uint64_t hi, T *out) {                                    \
        for (int j = 0; j < m; j++) {                                                    \
            if ((word >> j) & 1u) {                                                      \
                if (*v >= hi) return -1;                                                 \
                out[j] = vals[(*v)++];                                                   \
            } else {                                                                     \
                out[j] = 0;                                                              \
            }                                                                            \
        }                                                                                \
        return 0;                                                                        \
    }
SCALAR_WORD(uint16_t)
SCALAR_WORD(uint32_t)

#if ENDOR_X86
/* Non-temporal ("streaming") stores when the output is 16-byte aligned: a decoded layer is far
 * larger than the caches and is read back by the matmul only after the whole layer is done, so
 * pulling each destination line into the cache first (the read-for-ownership of ordinary stores)
 * is a third of the decoder's memory traffic spent for nothing. 10.4 -> 16.4 GB/s of dense fp16
 * output on 2 cores for an 88 MB layer (docs/performance.md). */
__attribute__((target("ssse3"))) static inline void store16(void *p, __m128i x, int nt) {
    if (nt)
        _mm_stream_si128((__m128i *)p, x);
    else
        _mm_storeu_si128((__m128i *)p, x);
}

/* 32 outputs from one bitmap word. Reads values [v, v+32) at most: caller guarantees v+32 <= nnz. */
__attribute__((target("ssse3"))) static inline uint64_t simd_word16(uint32_t word,
                                                                     const uint16_t *vals,
                                                                     uint64_t v, uint16_t *out,
                                                                     int nt) {
    for (int q = 0; q < 4; q++) {
        unsigned b = (word >> (8 * q)) & 0xFFu;
        __m128i x = _mm_loadu_si128((const __m128i *)(vals + v));
        __m128i m = _mm_loadu_si128((const __m128i *)EXPAND16[b]);
        store16(out + 8 * q, _mm_shuffle_epi8(x, m), nt);
        v += POP8[b];
    }
    return v;
}

__attribute__((target("ssse3"))) static inline uint64_t simd_word32(uint32_t word,
                                                                     const uint32_t *vals,
                                                                     uint64_t v, uint32_t *out,
                                                                     int nt) {
    for (int q = 0; q < 8; q++) {
        unsigned b = (word >> (4 * q)) & 0xFu;
        __m128i x = _mm_loadu_si128((const __m128i *)(vals + v));
        __m128i m = _mm_loadu_si128((const __m128i *)EXPAND32[b]);
        store16(out + 4 * q, _mm_shuffle_epi8(x, m), nt);
        v += (uint64_t)__builtin_popcount(b);
    }
    return v;
}
#endif

#define DECODE_TILES(T, SIMD_WORD)                                                             \
    static int64_t decode_##T(const uint32_t *bitmap, const T *vals, uint64_t nnz,            \
                              const uint32_t *offs, T *out, uint64_t n, uint64_t t0,          \
                              uint64_t t1, int simd, int nt) {                                 \
        for (uint64_t t = t0; t < t1; t++) {                                                   \
            uint64_t v = offs[t], hi = offs[t + 1];                                            \
            if (v > hi || hi > nnz) return (int64_t)t + 1;                                     \
            uint64_t start = t * TILE_ELEMS;                                                   \
            uint64_t end = start + TILE_ELEMS < n ? start + TILE_ELEMS : n;                    \
            uint64_t w = start / WORD_BITS, wfull = end / WORD_BITS;                           \
            for (; w < wfull; w++) {                                                           \
                uint32_t word = bitmap[w];                                                     \
                T *o = out + w * WORD_BITS;                                                    \
                if (simd && v + WORD_BITS <= nnz) {                                            \
                    v = SIMD_WORD(word, vals, v, o, nt);                                       \
                } else if (scalar_word_##T(word, WORD_BITS, vals, &v, hi, o)) {                \
                    return (int64_t)t + 1;                                                     \
                }                                                                              \
            }                                                                                  \
            if (end % WORD_BITS) { /* last, partial word: bits past n must be clear */         \
                uint32_t word = bitmap[w];                                                     \
                int m = (int)(end % WORD_BITS);                                                \
                if (word >> m) return (int64_t)t + 1;                                          \
                if (scalar_word_##T(word, m, vals, &v, hi, out + w * WORD_BITS))               \
                    return (int64_t)t + 1;                                                     \
            }                                                                                  \
            if (v != hi) return (int64_t)t + 1;                                                \
        }                                                                                      \
        return 0;                                                                              \
    }

#if ENDOR_X86
DECODE_TILES(uint16_t, simd_word16)
DECODE_TILES(uint32_t, simd_word32)
#else
static inline uint64_t no_simd16(uint32_t w, const uint16_t *p, uint64_t v, uint16_t *o, int nt) {
    (void)w; (void)p; (void)o; (void)nt; return v;
}
static inline uint64_t no_simd32(uint32_t w, const uint32_t *p, uint64_t v, uint32_t *o, int nt) {
    (void)w; (void)p; (void)o; (void)nt; return v;
}
DECODE_TILES(uint16_t, no_simd16)
DECODE_TILES(uint32_t, no_simd32)
#endif

/* Decode tiles [t0, t1) of one bitmap-encoded tensor of n elements of elem_bytes (2 or 4).
 * Returns 0 on success, t + 1 for the first inconsistent tile t, -1 for bad arguments. */
int64_t endor_decode_tiles(const uint32_t *bitmap, const void *values, uint64_t nnz,
                           const uint32_t *tile_offsets, void *out, uint64_t n,
                           uint32_t elem_bytes, uint64_t t0, uint64_t t1, int allow_simd) {
    if (!tables_ready) build_tables();
    uint64_t ntiles = (n + TILE_ELEMS - 1) / TILE_ELEMS;
    if (t0 > t1 || t1 > ntiles) return -1;
    int simd = allow_simd && use_simd;
    /* every word's 32 outputs start at out + 64 or 128 bytes * word: aligned iff out is */
    int nt = simd && ((uintptr_t)out % 16 == 0);
    int64_t rc = -1;
    if (elem_bytes == 2)
        rc = decode_uint16_t(bitmap, (const uint16_t *)values, nnz, tile_offsets,
                             (uint16_t *)out, n, t0, t1, simd, nt);
    else if (elem_bytes == 4)
        rc = decode_uint32_t(bitmap, (const uint32_t *)values, nnz, tile_offsets,
                             (uint32_t *)out, n, t0, t1, simd, nt);
#if ENDOR_X86
    if (nt)
        _mm_sfence(); /* streaming stores are weakly ordered: visible before the caller returns */
#endif
    return rc;
}

/* 1 when the SIMD path is in use on this CPU (reported by the benchmarks). */
int endor_decode_simd(void) {
    if (!tables_ready) build_tables();
    return use_simd;
}

/* An importable module only so setuptools builds, names and ships this library; Python calls
 * the functions above through ctypes, which releases the GIL for the duration of a call. */
static struct PyModuleDef endor_cpu_module = {PyModuleDef_HEAD_INIT, "_endor_cpu",
                                              "endor_gds CPU decoder (used via ctypes)", -1,
                                              NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__endor_cpu(void) {
    build_tables();
    return PyModule_Create(&endor_cpu_module);
}
