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
#include <immintrin.h>
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

/* Instruction-set features, as a mask: what this CPU has (cpu_features), and what a call may use
 * (its `features` argument, AND'ed with cpu_features), so that tests run every code path the CPU
 * can run, not only the fastest. Mirrored by cpu_decode.SIMD_FEATURES. */
enum {
    FEAT_SSSE3 = 1, /* pshufb: the expand, and the 4-byte expdict rebuild */
    FEAT_PDEP = 2,  /* BMI2 pdep, and fast: not on Zen 1/2, where it is microcoded (fields8_pdep) */
    FEAT_AVX2 = 4,  /* the 2-byte expdict rebuild, 32 values per step */
    FEAT_FMA = 8,   /* AVX2 + FMA + F16C: the fused product's 8-lane multiply-add */
};
static int cpu_features = 0;

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
    if (__builtin_cpu_supports("ssse3")) cpu_features |= FEAT_SSSE3;
    if (__builtin_cpu_supports("bmi2") && !__builtin_cpu_is("znver1") &&
        !__builtin_cpu_is("znver2"))
        cpu_features |= FEAT_PDEP;
    if (__builtin_cpu_supports("avx2")) cpu_features |= FEAT_AVX2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        cpu_features |= FEAT_FMA;
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
        v += POP8[b]; /* a table, not __builtin_popcount: without -mpopcnt that is a libgcc call */
    }
    return v;
}
#endif

/* Expand one tile: elements [start, end) of the tensor from values vals[v..hi), in bitmap order.
 * Full words take the SIMD path while a whole word's worth of values (32) is readable below
 * `avail` (a word may have up to 32 bits set), else the scalar path, which never reads at or past
 * hi. Returns 0, or -1 when the bitmap and [v, hi) disagree (bits past the tensor's end included).
 * The SIMD path may run v past hi on a corrupted tile; reads stay below avail and the final
 * v != hi check rejects the tile. */
#define EXPAND_TILE(T, SIMD_WORD)                                                              \
    static int expand_##T(const uint32_t *bitmap, const T *vals, uint64_t v, uint64_t hi,     \
                          uint64_t avail, T *out, uint64_t start, uint64_t end, int simd,      \
                          int nt) {                                                            \
        uint64_t w = start / WORD_BITS, wfull = end / WORD_BITS;                               \
        for (; w < wfull; w++) {                                                               \
            uint32_t word = bitmap[w];                                                         \
            T *o = out + w * WORD_BITS;                                                        \
            if (simd && v + WORD_BITS <= avail) {                                              \
                v = SIMD_WORD(word, vals, v, o, nt);                                           \
            } else if (scalar_word_##T(word, WORD_BITS, vals, &v, hi, o)) {                    \
                return -1;                                                                     \
            }                                                                                  \
        }                                                                                      \
        if (end % WORD_BITS) { /* last, partial word: bits past n must be clear */             \
            uint32_t word = bitmap[w];                                                         \
            int m = (int)(end % WORD_BITS);                                                    \
            if (word >> m) return -1;                                                          \
            if (scalar_word_##T(word, m, vals, &v, hi, out + w * WORD_BITS)) return -1;        \
        }                                                                                      \
        return v == hi ? 0 : -1;                                                               \
    }

#if ENDOR_X86
EXPAND_TILE(uint16_t, simd_word16)
EXPAND_TILE(uint32_t, simd_word32)
#else
static inline uint64_t no_simd16(uint32_t w, const uint16_t *p, uint64_t v, uint16_t *o, int nt) {
    (void)w; (void)p; (void)o; (void)nt; return v;
}
static inline uint64_t no_simd32(uint32_t w, const uint32_t *p, uint64_t v, uint32_t *o, int nt) {
    (void)w; (void)p; (void)o; (void)nt; return v;
}
EXPAND_TILE(uint16_t, no_simd16)
EXPAND_TILE(uint32_t, no_simd32)
#endif

/* The tile's element range [start, end), and whether its value range [lo, hi) is in bounds: the
 * first tile starts at value 0 and the last ends at nnz (a table shifted by k, or nnz declared
 * longer than the table, is consistent tile by tile and would decode k values off). */
static int tile_range(const uint32_t *offs, uint64_t t, uint64_t n, uint64_t nnz, uint64_t *lo,
                      uint64_t *hi, uint64_t *start, uint64_t *end) {
    *lo = offs[t];
    *hi = offs[t + 1];
    *start = t * TILE_ELEMS;
    *end = *start + TILE_ELEMS < n ? *start + TILE_ELEMS : n;
    return *lo <= *hi && *hi <= nnz && *hi - *lo <= TILE_ELEMS && (t > 0 || *lo == 0) &&
           (*end < n || *hi == nnz);
}


#define DECODE_TILES(T)                                                                        \
    static int64_t decode_##T(const uint32_t *bitmap, const T *vals, uint64_t nnz,            \
                              const uint32_t *offs, T *out, uint64_t n, uint64_t t0,          \
                              uint64_t t1, int simd, int nt) {                                 \
        for (uint64_t t = t0; t < t1; t++) {                                                   \
            uint64_t lo, hi, start, end;                                                       \
            if (!tile_range(offs, t, n, nnz, &lo, &hi, &start, &end) ||                        \
                expand_##T(bitmap, vals, lo, hi, nnz, out, start, end, simd, nt))              \
                return (int64_t)t + 1;                                                         \
        }                                                                                      \
        return 0;                                                                              \
    }
DECODE_TILES(uint16_t)
DECODE_TILES(uint32_t)

/* Decode tiles [t0, t1) of one bitmap-encoded tensor of n elements of elem_bytes (2 or 4), using
 * the FEAT_* features in `features` that this CPU has. Returns 0 on success, t + 1 for the first
 * inconsistent tile t, -1 for bad arguments. */
int64_t endor_decode_tiles(const uint32_t *bitmap, const void *values, uint64_t nnz,
                           const uint32_t *tile_offsets, void *out, uint64_t n,
                           uint32_t elem_bytes, uint64_t t0, uint64_t t1, int features) {
    if (!tables_ready) build_tables();
    uint64_t ntiles = (n + TILE_ELEMS - 1) / TILE_ELEMS;
    if (t0 > t1 || t1 > ntiles) return -1;
    int simd = (features & cpu_features & FEAT_SSSE3) != 0;
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

/* ---- Codec expdict (format v2): values rebuilt from residuals, exponent codes and escapes ----
 *
 * Value k of the tensor: residual r = its low residual_bytes bytes at residuals + k*rb, plus the
 * high bits of its w-bit field at bit k*w of codes (field = index | high << index_bits); the
 * value is sign << (8*eb - 1) | exponents[index] << M | mantissa, with sign = r >> M and
 * mantissa = r & (2^M - 1). Each tile's values are rebuilt into a buffer on this thread's stack,
 * its escapes (full bit patterns at value positions within the tile) are patched in, and the
 * buffer is expanded by the bitmap exactly like raw values. Splitting the value into a table
 * lookup on the field (exponent, and fp16's 3 high residual bits) OR'ed with a function of the
 * residual's low byte keeps the per-value work to a lookup and an OR, and makes it SIMD-able
 * (pshufb tables of 16 entries, one per field bit pattern). */

typedef struct { /* mirrored by cpu_decode._ExpDictArgs (ctypes) */
    const uint32_t *bitmap;
    const uint32_t *tile_offsets;
    const uint8_t *residuals;        /* nnz * residual_bytes */
    const uint8_t *codes;            /* codes_nbytes = ceil(nnz * field_bits / 8) */
    const uint32_t *escape_offsets;  /* ntiles + 1 */
    const uint16_t *escape_positions;/* escapes */
    const void *escape_values;       /* escapes elements */
    void *out;                       /* n elements */
    uint64_t n, nnz, codes_nbytes, escapes;
    uint32_t elem_bytes, man_bits, index_bits, reserved;
    uint8_t exponents[16];           /* 2^index_bits entries */
} endor_expdict;

#define MAX_FIELD_BITS 7 /* index_bits <= 4, plus fp16's 3 high residual bits */
#define TILE_BUF (TILE_ELEMS + WORD_BITS) /* the SIMD expand reads up to 32 values past the cursor */

/* Per-call tables. value = hi16[field] | lo16[residual byte] (2-byte elements), or
 * hi32[field] | low 3 residual bytes with the sign moved to bit 31 (4-byte elements). The
 * byte tables split hi16 for pshufb: field = index | high << b, so hi16[field] =
 * idx16[index] | high16[high], each with at most 16 entries. */
typedef struct {
    int rb, w, b;
    uint32_t fmask;
    uint16_t hi16[1 << MAX_FIELD_BITS], lo16[256];
    uint32_t hi32[1 << MAX_FIELD_BITS];
    uint8_t idx_lo[16], idx_hi[16], high_lo[16], high_hi[16], res_lo_mask, res_hi_mask;
    uint8_t idx_b2[16], idx_b3[16]; /* bytes 2 and 3 of a 4-byte value's exponent field */
} expdict_tables;

/* The value of residual r (R = M+1 bits) with exponent field e: pure bit placement. */
static uint32_t assemble(uint32_t r, uint32_t e, int m, int eb) {
    return ((r >> m) << (8 * eb - 1)) | (e << m) | (r & ((1u << m) - 1));
}

static int build_expdict_tables(const endor_expdict *a, expdict_tables *T) {
    int eb = (int)a->elem_bytes, m = (int)a->man_bits, b = (int)a->index_bits;
    if (!((eb == 2 && (m == 7 || m == 10)) || (eb == 4 && m == 23)) || b < 1 || b > 4) return -1;
    T->b = b;
    T->rb = (m + 1) / 8;
    T->w = b + (m + 1) % 8;
    T->fmask = (1u << T->w) - 1;
    for (uint32_t f = 0; f <= T->fmask; f++) { /* the field's high bits sit above the low bytes */
        uint32_t r_high = (f >> b) << (8 * T->rb);
        uint32_t v = assemble(r_high, a->exponents[f & ((1u << b) - 1)], m, eb);
        T->hi16[f] = (uint16_t)v;
        T->hi32[f] = v;
    }
    for (uint32_t r = 0; r < 256; r++) T->lo16[r] = (uint16_t)assemble(r, 0, m, eb);
    memset(T->idx_lo, 0, 16); memset(T->idx_hi, 0, 16);
    memset(T->high_lo, 0, 16); memset(T->high_hi, 0, 16);
    memset(T->idx_b2, 0, 16); memset(T->idx_b3, 0, 16);
    for (uint32_t i = 0; i < (1u << b); i++) {
        uint32_t v = assemble(0, a->exponents[i], m, eb);
        T->idx_lo[i] = (uint8_t)v;
        T->idx_hi[i] = (uint8_t)(v >> 8);
        T->idx_b2[i] = (uint8_t)(v >> 16);
        T->idx_b3[i] = (uint8_t)(v >> 24);
    }
    for (uint32_t h = 0; h < (1u << (T->w - b)); h++) {
        uint32_t v = assemble(h << 8, 0, m, eb);
        T->high_lo[h] = (uint8_t)v;
        T->high_hi[h] = (uint8_t)(v >> 8);
    }
    /* lo16[r] split by output byte: which bits of r land in the low and the high byte (bf16: the
     * sign, bit 7 of r, is bit 7 of the high byte; fp16: r is the low byte as is) */
    T->res_lo_mask = (uint8_t)(T->lo16[0xFF] & 0xFF);
    T->res_hi_mask = (uint8_t)(T->lo16[0xFF] >> 8);
    return 0;
}

/* Field of value k (bits [k*w, k*w + w) of the stream); reads stay below codes_nbytes. */
static inline uint32_t field_at(const endor_expdict *a, const expdict_tables *T, uint64_t k) {
    uint64_t bit = k * (uint64_t)T->w, byte = bit / 8;
    uint32_t x = a->codes[byte];
    if (byte + 1 < a->codes_nbytes) x |= (uint32_t)a->codes[byte + 1] << 8;
    return (x >> (bit % 8)) & T->fmask;
}

static inline uint32_t residual_at(const endor_expdict *a, int rb, uint64_t k) {
    const uint8_t *p = a->residuals + k * (uint64_t)rb;
    return rb == 1 ? p[0] : (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
}

static inline uint32_t value_at(const endor_expdict *a, const expdict_tables *T, uint64_t k) {
    uint32_t f = field_at(a, T, k), r = residual_at(a, T->rb, k);
    if (T->rb == 1) return T->hi16[f] | T->lo16[r];
    return T->hi32[f] | (r & 0x7FFFFFu) | ((r >> 23) << 31);
}

/* The fields of values 8g..8g+7 (8 fields of w bits fill exactly w bytes starting at byte g*w)
 * as one byte each. Only called when 8 bytes are readable there. */
static inline uint64_t fields8_scalar(const uint8_t *p, int w, uint32_t fmask) {
    uint64_t x, out = 0;
    memcpy(&x, p, 8);
    for (int j = 0; j < 8; j++) out |= ((x >> (j * w)) & fmask) << (8 * j);
    return out;
}

#if ENDOR_X86
/* pdep deposits the 8 fields into the 8 bytes in one instruction (fast on Intel and Zen 3+;
 * microcoded and slow on Zen 1/2, which take the scalar spread instead). */
__attribute__((target("bmi2"))) static inline uint64_t fields8_pdep(const uint8_t *p, int w,
                                                                     uint32_t fmask) {
    uint64_t x;
    (void)w;
    memcpy(&x, p, 8);
    return _pdep_u64(x, 0x0101010101010101ull * fmask);
}

/* Values k.. (k a multiple of 8) into out[k - lo], 32 at a time while their residuals lie below
 * hi and 8 code bytes per group of 8 are readable; returns the first value not done. Per output
 * byte: two pshufb lookups (exponent by index, fp16's high residual bits; the 16-entry tables
 * repeated in both 128-bit lanes, as AVX2's pshufb works within a lane) OR'ed with the residual
 * byte's own bits. Built twice, with the pdep and the scalar field spread: a BMI2 instruction
 * must not be reachable on a CPU without it. AVX2, not SSSE3: 1.13x the 16-value SSSE3 loop on
 * one core (docs/performance.md); a CPU without AVX2 takes the 8-value scalar loop. */
#define BROADCAST16(p) _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p)))
#define REBUILD16_RUN(NAME, TARGET, FIELDS8)                                                   \
    __attribute__((target(TARGET))) static uint64_t NAME(const endor_expdict *a,              \
                                                         const expdict_tables *T, uint64_t k,  \
                                                         uint64_t lo, uint64_t hi,            \
                                                         uint16_t *out) {                      \
        const __m256i imask = _mm256_set1_epi8((char)((1 << T->b) - 1));                       \
        const __m128i shift = _mm_cvtsi32_si128(T->b);                                         \
        const __m256i idx_lo = BROADCAST16(T->idx_lo), idx_hi = BROADCAST16(T->idx_hi);        \
        const __m256i high_lo = BROADCAST16(T->high_lo), high_hi = BROADCAST16(T->high_hi);    \
        const __m256i rlo = _mm256_set1_epi8((char)T->res_lo_mask);                            \
        const __m256i rhi = _mm256_set1_epi8((char)T->res_hi_mask);                            \
        const uint64_t w = (uint64_t)T->w;                                                     \
        for (; k + 32 <= hi && (k / 8 + 3) * w + 8 <= a->codes_nbytes; k += 32) {              \
            const uint8_t *c = a->codes + (k / 8) * w;                                         \
            __m256i f = _mm256_set_epi64x((long long)FIELDS8(c + 3 * w, T->w, T->fmask),       \
                                          (long long)FIELDS8(c + 2 * w, T->w, T->fmask),       \
                                          (long long)FIELDS8(c + w, T->w, T->fmask),           \
                                          (long long)FIELDS8(c, T->w, T->fmask));              \
            __m256i r = _mm256_loadu_si256((const __m256i *)(a->residuals + k));               \
            __m256i idx = _mm256_and_si256(f, imask);                                          \
            /* f >> b per byte: a 16-bit shift brings bits of the next byte in above bit       \
             * 7 - b >= 3, which the 3-bit mask drops */                                       \
            __m256i high = _mm256_and_si256(_mm256_srl_epi16(f, shift), _mm256_set1_epi8(7));  \
            __m256i vlo = _mm256_or_si256(_mm256_or_si256(_mm256_shuffle_epi8(idx_lo, idx),   \
                                                          _mm256_shuffle_epi8(high_lo, high)), \
                                          _mm256_and_si256(r, rlo));                           \
            __m256i vhi = _mm256_or_si256(_mm256_or_si256(_mm256_shuffle_epi8(idx_hi, idx),   \
                                                          _mm256_shuffle_epi8(high_hi, high)), \
                                          _mm256_and_si256(r, rhi));                           \
            /* the byte interleave works per lane: values 0-7 | 16-23 and 8-15 | 24-31 */      \
            __m256i v0 = _mm256_unpacklo_epi8(vlo, vhi), v1 = _mm256_unpackhi_epi8(vlo, vhi);  \
            _mm256_storeu_si256((__m256i *)(out + (k - lo)),                                   \
                                _mm256_permute2x128_si256(v0, v1, 0x20));                      \
            _mm256_storeu_si256((__m256i *)(out + (k - lo) + 16),                              \
                                _mm256_permute2x128_si256(v0, v1, 0x31));                      \
        }                                                                                      \
        return k;                                                                              \
    }
REBUILD16_RUN(rebuild16_pdep, "avx2,bmi2", fields8_pdep)
REBUILD16_RUN(rebuild16_spread, "avx2", fields8_scalar)

/* The same for 4-byte values (fp32, 3 residual bytes), 16 at a time, 4 per vector: pshufb widens
 * 3-byte residuals to 32-bit lanes (one 16-byte load covers 12 bytes, hence the 4 spare bytes
 * required past the group), the sign moves from bit 23 to 31, and the exponent comes from two
 * pshufb lookups (bytes 2 and 3 of exponent << 23) on the index spread to each lane. */
#define REBUILD32_RUN(NAME, TARGET, FIELDS8)                                                   \
    __attribute__((target(TARGET))) static uint64_t NAME(const endor_expdict *a,              \
                                                         const expdict_tables *T, uint64_t k,  \
                                                         uint64_t lo, uint64_t hi,            \
                                                         uint32_t *out) {                      \
        const __m128i widen = _mm_setr_epi8(0, 1, 2, -128, 3, 4, 5, -128, 6, 7, 8, -128, 9, 10,\
                                            11, -128);                                         \
        const __m128i e2 = _mm_loadu_si128((const __m128i *)T->idx_b2);                        \
        const __m128i e3 = _mm_loadu_si128((const __m128i *)T->idx_b3);                        \
        const __m128i m2 = _mm_set1_epi32(0x00FF0000), m3 = _mm_set1_epi32((int)0xFF000000u);  \
        const __m128i mant = _mm_set1_epi32(0x7FFFFF), sign = _mm_set1_epi32(0x800000);        \
        const uint64_t w = (uint64_t)T->w;                                                     \
        for (; k + 16 <= hi && (k / 8 + 1) * w + 8 <= a->codes_nbytes &&                       \
               3 * (k + 16) + 4 <= 3 * a->nnz; k += 16) {                                      \
            const uint8_t *c = a->codes + (k / 8) * w;                                         \
            __m128i f = _mm_set_epi64x((long long)FIELDS8(c + w, T->w, T->fmask),              \
                                       (long long)FIELDS8(c, T->w, T->fmask));                 \
            for (int q = 0; q < 4; q++) {                                                      \
                /* index byte 4q + j to bytes 2 and 3 of lane j */                             \
                __m128i spread = _mm_shuffle_epi8(f, _mm_setr_epi8(                            \
                    -128, -128, (char)(4 * q), (char)(4 * q), -128, -128, (char)(4 * q + 1),   \
                    (char)(4 * q + 1), -128, -128, (char)(4 * q + 2), (char)(4 * q + 2), -128, \
                    -128, (char)(4 * q + 3), (char)(4 * q + 3)));                              \
                __m128i e = _mm_or_si128(_mm_and_si128(_mm_shuffle_epi8(e2, spread), m2),      \
                                         _mm_and_si128(_mm_shuffle_epi8(e3, spread), m3));     \
                __m128i r = _mm_shuffle_epi8(                                                  \
                    _mm_loadu_si128((const __m128i *)(a->residuals + 3 * (k + 4 * q))), widen);\
                __m128i v = _mm_or_si128(_mm_or_si128(_mm_and_si128(r, mant), e),              \
                                         _mm_slli_epi32(_mm_and_si128(r, sign), 8));           \
                _mm_storeu_si128((__m128i *)(out + (k - lo) + 4 * q), v);                      \
            }                                                                                  \
        }                                                                                      \
        return k;                                                                              \
    }
REBUILD32_RUN(rebuild32_pdep, "ssse3,bmi2", fields8_pdep)
REBUILD32_RUN(rebuild32_spread, "ssse3", fields8_scalar)
#endif

/* Rebuild values [lo, hi) of the tensor into buf[0, hi - lo), with the features in feat. */
static void rebuild_values(const endor_expdict *a, const expdict_tables *T, uint64_t lo,
                           uint64_t hi, void *buf, int feat) {
    uint64_t k = lo;
    if (T->rb == 1) {
        uint16_t *out = (uint16_t *)buf;
        for (; k < hi && k % 8; k++) out[k - lo] = (uint16_t)value_at(a, T, k);
#if ENDOR_X86
        if (feat & FEAT_AVX2)
            k = (feat & FEAT_PDEP) ? rebuild16_pdep(a, T, k, lo, hi, out)
                                   : rebuild16_spread(a, T, k, lo, hi, out);
#else
        (void)feat;
#endif
        for (; k + 8 <= hi && (k / 8) * (uint64_t)T->w + 8 <= a->codes_nbytes; k += 8) {
            uint64_t f = fields8_scalar(a->codes + (k / 8) * (uint64_t)T->w, T->w, T->fmask);
            const uint8_t *r = a->residuals + k;
            for (int j = 0; j < 8; j++)
                out[k - lo + j] = T->hi16[(f >> (8 * j)) & 0xFF] | T->lo16[r[j]];
        }
        for (; k < hi; k++) out[k - lo] = (uint16_t)value_at(a, T, k);
    } else {
        uint32_t *out = (uint32_t *)buf;
#if ENDOR_X86
        if (feat & FEAT_SSSE3) {
            for (; k < hi && k % 8; k++) out[k - lo] = value_at(a, T, k);
            k = (feat & FEAT_PDEP) ? rebuild32_pdep(a, T, k, lo, hi, out)
                                   : rebuild32_spread(a, T, k, lo, hi, out);
        }
#endif
        for (; k < hi; k++) out[k - lo] = value_at(a, T, k);
    }
}

/* Tile t's escapes [*q0, *q1), and whether they are in bounds: at most one per value, from 0 for
 * the first tile, to the last escape for the last tile (ntiles tiles, value range [lo, hi)). */
static int escape_range(const endor_expdict *a, uint64_t t, uint64_t ntiles, uint64_t lo,
                        uint64_t hi, uint64_t *q0, uint64_t *q1) {
    *q0 = a->escape_offsets[t];
    *q1 = a->escape_offsets[t + 1];
    return *q0 <= *q1 && *q1 <= a->escapes && *q1 - *q0 <= hi - lo && (t > 0 || *q0 == 0) &&
           (t + 1 < ntiles || *q1 == a->escapes);
}

/* Patch the escapes of tile t into buf (count values). -1 when a position is not strictly above
 * the previous one of the tile or not below count (the escape table disagrees with the tile). */
static int patch_escapes(const endor_expdict *a, uint64_t e0, uint64_t e1, uint64_t count,
                         void *buf) {
    for (uint64_t e = e0; e < e1; e++) {
        uint64_t pos = a->escape_positions[e];
        if (pos >= count || (e > e0 && pos <= a->escape_positions[e - 1])) return -1;
        if (a->elem_bytes == 2)
            ((uint16_t *)buf)[pos] = ((const uint16_t *)a->escape_values)[e];
        else
            ((uint32_t *)buf)[pos] = ((const uint32_t *)a->escape_values)[e];
    }
    return 0;
}

/* Decode tiles [t0, t1) of one expdict tensor (features: as endor_decode_tiles). Returns 0,
 * t + 1 for the first tile t whose tile offsets, escape offsets, escape positions or bitmap are
 * inconsistent, -1 for bad arguments. */
int64_t endor_decode_expdict_tiles(const endor_expdict *a, uint64_t t0, uint64_t t1,
                                   int features) {
    if (!tables_ready) build_tables();
    uint64_t ntiles = (a->n + TILE_ELEMS - 1) / TILE_ELEMS;
    expdict_tables T;
    if (t0 > t1 || t1 > ntiles || build_expdict_tables(a, &T)) return -1;
    int feat = features & cpu_features, simd = (feat & FEAT_SSSE3) != 0;
    int nt = simd && ((uintptr_t)a->out % 16 == 0);
    /* zeroed once: the SIMD expand may read (and discard) entries past the tile's values */
    uint32_t buf32[TILE_BUF] __attribute__((aligned(16)));
    memset(buf32, 0, sizeof buf32);
    int64_t rc = 0;
    for (uint64_t t = t0; t < t1 && !rc; t++) {
        uint64_t lo, hi, start, end, e0, e1;
        if (!tile_range(a->tile_offsets, t, a->n, a->nnz, &lo, &hi, &start, &end) ||
            !escape_range(a, t, ntiles, lo, hi, &e0, &e1)) {
            rc = (int64_t)t + 1;
            break;
        }
        rebuild_values(a, &T, lo, hi, buf32, feat);
        if (patch_escapes(a, e0, e1, hi - lo, buf32)) {
            rc = (int64_t)t + 1;
            break;
        }
        int bad = a->elem_bytes == 2
            ? expand_uint16_t(a->bitmap, (const uint16_t *)buf32, 0, hi - lo, TILE_BUF,
                              (uint16_t *)a->out, start, end, simd, nt)
            : expand_uint32_t(a->bitmap, buf32, 0, hi - lo, TILE_BUF, (uint32_t *)a->out, start,
                              end, simd, nt);
        if (bad) rc = (int64_t)t + 1;
    }
#if ENDOR_X86
    if (nt) _mm_sfence();
#endif
    return rc;
}

/* ---- Codec exphuff (format v3): entropy-coded exponents ----
 *
 * Value k: its residual's low residual_bytes bytes at residuals + k*rb; in the MSB-first `bits`
 * stream, from tile_bits[t] for the first value of tile t, the canonical Huffman code of its
 * exponent (at most HUFF_BITS bits, found by one lookup on the next HUFF_BITS bits), then the
 * residual's high bits (fp16: 3). Chunk c (values [512c, 512c + 512) of the tile, c = 1..7)
 * starts chunk_bits[7t + c - 1] bits after the tile; chunks are decoded two at a time, each from
 * its own offset, and each must end where the next starts. Reference: endor_gds/codec/exphuff.py.
 * A dense tensor has no bitmap: every element is a value, tile t holds elements [t*TILE_ELEMS, ...). */

#define HUFF_BITS 12 /* exphuff.MAX_CODE_BITS */
#define HUFF_CHUNK 512 /* exphuff.CHUNK_VALUES */
#define HUFF_CHUNKS (TILE_ELEMS / HUFF_CHUNK)

typedef struct { /* mirrored by cpu_decode._ExpHuffArgs (ctypes) */
    const uint32_t *bitmap;       /* NULL: a dense tensor */
    const uint32_t *tile_offsets; /* the bitmap's (ignored for a dense tensor) */
    const uint8_t *residuals;     /* nnz * residual_bytes */
    const uint8_t *bits;          /* bits_nbytes */
    const uint32_t *tile_bits;    /* ntiles + 1 */
    const uint16_t *chunk_bits;   /* (HUFF_CHUNKS - 1) * ntiles, from each tile's start */
    void *out;                    /* n elements */
    uint64_t n, nnz, bits_nbytes;
    uint32_t elem_bytes, man_bits, exp_bits, nbits; /* nbits: the stream's length in bits */
    uint8_t lengths[256];         /* code length per exponent (2^exp_bits used), 0 = no code */
} endor_exphuff;

/* The decode table: for each value of the next HUFF_BITS bits, exponent << 4 | code length
 * (0: no code starts with those bits). Canonical order: by (length, exponent). -1 when the
 * lengths over-subscribe the code space or exceed HUFF_BITS. */
static int build_huff_table(const endor_exphuff *a, uint16_t *table) {
    uint32_t nsym = 1u << a->exp_bits, code = 0, prev = 0;
    memset(table, 0, sizeof(uint16_t) << HUFF_BITS);
    for (uint32_t s = 0; s < nsym; s++)
        if (a->lengths[s] > HUFF_BITS) return -1;
    for (uint32_t len = 1; len <= HUFF_BITS; len++) {
        for (uint32_t s = 0; s < nsym; s++) {
            if (a->lengths[s] != len) continue;
            code <<= len - prev;
            prev = len;
            if (code >= (1u << len)) return -1;
            uint32_t lo = code << (HUFF_BITS - len), span = 1u << (HUFF_BITS - len);
            for (uint32_t i = 0; i < span; i++) table[lo + i] = (uint16_t)(s << 4 | len);
            code++;
        }
    }
    return 0;
}

/* An MSB-first bit reader: the next `have` bits of the stream at the top of `acc`, bytes from
 * `byte` on not yet loaded. Refilled to 56-63 bits with one 8-byte load where 8 bytes remain
 * (Giesen's "variant 4"), byte by byte near the end of the stream. */
typedef struct {
    uint64_t acc, byte;
    int have;
} huff_reader;

static inline void huff_refill(const uint8_t *bits, uint64_t nbytes, huff_reader *r) {
    if (r->byte + 8 <= nbytes) {
        uint64_t w;
        memcpy(&w, bits + r->byte, 8);
        r->acc |= __builtin_bswap64(w) >> r->have;
        r->byte += (uint64_t)((63 - r->have) >> 3);
        r->have |= 56;
    } else {
        while (r->have <= 56 && r->byte < nbytes) {
            r->acc |= (uint64_t)bits[r->byte++] << (56 - r->have);
            r->have += 8;
        }
    }
}

/* A reader at bit `pos` of the stream. */
static inline void huff_seek(const uint8_t *bits, uint64_t nbytes, huff_reader *r, uint64_t pos) {
    r->acc = 0;
    r->have = 0;
    r->byte = pos / 8;
    huff_refill(bits, nbytes, r);
    r->acc <<= pos % 8;
    r->have -= (int)(pos % 8);
}

/* The bit position a reader has reached. */
static inline uint64_t huff_pos(const huff_reader *r) { return r->byte * 8 - (uint64_t)r->have; }

/* The multi-unit table: for each value of the next HUFF_BITS bits, the units (a unit: an
 * exponent's code, then the value's high residual bits) that lie whole within them, up to four:
 * byte u = unit u as exponent | high << exp_bits, bits 32-34 their count (0: the first unit does
 * not fit, decode it alone), bits 40-43 the bits they take. The common exponents have 2-3-bit
 * codes, so one lookup yields two or three values: one lookup per value (table, then a shift by
 * its length, each waiting for the last) ran at ~0.5 G values/s per core. */
static void build_unit_table(const endor_exphuff *a, const uint16_t *table, uint64_t *units) {
    const uint32_t hb = (a->man_bits + 1) % 8, mask = (1u << HUFF_BITS) - 1;
    for (uint32_t w = 0; w <= mask; w++) {
        uint64_t packed = 0;
        uint32_t n = 0, used = 0;
        while (n < 4) {
            uint16_t e = table[(w << used) & mask]; /* zeros shifted in: checked to lie within w */
            uint32_t len = e & 15;
            if (len == 0 || used + len + hb > HUFF_BITS) break;
            uint32_t high = hb ? (w >> (HUFF_BITS - used - len - hb)) & ((1u << hb) - 1) : 0;
            packed |= (uint64_t)((uint32_t)(e >> 4) | high << a->exp_bits) << (8 * n);
            n++;
            used += len + hb;
        }
        units[w] = packed | (uint64_t)n << 32 | (uint64_t)used << 40;
    }
}

/* The units of one tile's cnt values from reader r into syms (one byte each: exponent | high <<
 * exp_bits), cnt <= TILE_ELEMS, syms holding TILE_ELEMS + 4 bytes. -1 when a code is missing or
 * the stream ends. */
static int huff_units(const endor_exphuff *a, const uint16_t *table, const uint64_t *units,
                      huff_reader *r, uint64_t i, uint64_t cnt, uint8_t *syms) {
    const uint8_t *bits = a->bits;
    const uint64_t nbytes = a->bits_nbytes;
    const int hb = (int)((a->man_bits + 1) % 8), eb = (int)a->exp_bits;
    uint64_t acc = r->acc;
    int have = r->have;
    while (i < cnt) {
        if (have < HUFF_BITS + 3) {
            r->acc = acc, r->have = have;
            huff_refill(bits, nbytes, r);
            acc = r->acc, have = r->have;
        }
        uint64_t u = units[acc >> (64 - HUFF_BITS)];
        uint32_t n = (uint32_t)(u >> 32) & 7, used = (uint32_t)(u >> 40);
        if (n && cnt - i >= 4 && (int)used <= have) { /* up to four values at once */
            memcpy(syms + i, &u, 4); /* bytes past the n-th: overwritten by the next step */
            i += n;
            acc <<= used;
            have -= (int)used;
            continue;
        }
        uint16_t e = table[acc >> (64 - HUFF_BITS)]; /* one unit: the tile's last, or a long code */
        int len = e & 15;
        if (len == 0 || len + hb > have) return -1;
        acc <<= len;
        uint32_t high = hb ? (uint32_t)(acc >> (64 - (hb ? hb : 1))) : 0;
        acc <<= hb;
        have -= len + hb;
        syms[i++] = (uint8_t)((uint32_t)(e >> 4) | high << eb);
    }
    r->acc = acc, r->have = have;
    return 0;
}

/* Two chunks' units in lockstep while both take the fast path (four units per lookup at most),
 * then each chunk's rest alone: two independent lookup-and-shift chains for the core. */
static void huff_units2(const endor_exphuff *a, const uint16_t *table, const uint64_t *units,
                        huff_reader *r0, uint64_t cnt0, uint8_t *s0, int *bad0,
                        huff_reader *r1, uint64_t cnt1, uint8_t *s1, int *bad1) {
    const uint8_t *bits = a->bits;
    const uint64_t nbytes = a->bits_nbytes;
    uint64_t i0 = 0, i1 = 0;
    /* the readers in locals: the byte stores to s0/s1 may alias anything a pointer reaches */
    huff_reader q0 = *r0, q1 = *r1;
    while (i0 + 4 <= cnt0 && i1 + 4 <= cnt1) {
        if (q0.have < HUFF_BITS + 3) huff_refill(bits, nbytes, &q0);
        if (q1.have < HUFF_BITS + 3) huff_refill(bits, nbytes, &q1);
        uint64_t u0 = units[q0.acc >> (64 - HUFF_BITS)], u1 = units[q1.acc >> (64 - HUFF_BITS)];
        uint32_t n0 = (uint32_t)(u0 >> 32) & 7, used0 = (uint32_t)(u0 >> 40);
        uint32_t n1 = (uint32_t)(u1 >> 32) & 7, used1 = (uint32_t)(u1 >> 40);
        if (!n0 || !n1 || (int)used0 > q0.have || (int)used1 > q1.have) break;
        memcpy(s0 + i0, &u0, 4);
        memcpy(s1 + i1, &u1, 4);
        i0 += n0, i1 += n1;
        q0.acc <<= used0, q1.acc <<= used1;
        q0.have -= (int)used0, q1.have -= (int)used1;
    }
    *r0 = q0, *r1 = q1;
    *bad0 = huff_units(a, table, units, r0, i0, cnt0, s0);
    *bad1 = huff_units(a, table, units, r1, i1, cnt1, s1);
}

/* Values from units and residuals: out[i] for value lo + i, the layout fixed at compile time (T
 * the element type, M mantissa bits, RB residual bytes, EB exponent bits): a loop the compiler
 * vectorises, built twice: for the baseline (16-byte vectors) and for AVX2 (32-byte), chosen by
 * the features of the call (a third of a dense bf16 decode's time at 16 bytes). */
#define HUFF_ASSEMBLE(NAME, TARGET, T, M, RB, EB)                                              \
    __attribute__((target(TARGET))) static void NAME(const uint8_t *restrict syms,             \
                     const uint8_t *restrict residuals, uint64_t lo, uint64_t cnt,             \
                     T *restrict out) {                                                        \
        const uint8_t *rp = residuals + lo * (RB);                                             \
        for (uint64_t i = 0; i < cnt; i++) {                                                   \
            uint32_t res = (RB) == 1 ? rp[i]                                                   \
                : (uint32_t)rp[3 * i] | (uint32_t)rp[3 * i + 1] << 8 | (uint32_t)rp[3 * i + 2] << 16; \
            uint32_t sym = syms[i], exp = sym & ((1u << (EB)) - 1);                            \
            res |= (sym >> (EB)) << (8 * (RB));                                                \
            out[i] = (T)((res >> (M)) << (8 * sizeof(T) - 1) | exp << (M) | (res & ((1u << (M)) - 1))); \
        }                                                                                      \
    }
HUFF_ASSEMBLE(huff_assemble_bf16, "sse2", uint16_t, 7, 1, 8)
HUFF_ASSEMBLE(huff_assemble_f16, "sse2", uint16_t, 10, 1, 5)
HUFF_ASSEMBLE(huff_assemble_f32, "sse2", uint32_t, 23, 3, 8)
HUFF_ASSEMBLE(huff_assemble_bf16_avx2, "avx2", uint16_t, 7, 1, 8)
HUFF_ASSEMBLE(huff_assemble_f16_avx2, "avx2", uint16_t, 10, 1, 5)
HUFF_ASSEMBLE(huff_assemble_f32_avx2, "avx2", uint32_t, 23, 3, 8)

/* The decode tables of one exphuff tensor (table: 2^HUFF_BITS entries, units: 2^HUFF_BITS), after
 * checking its layout: -1 for a layout or code lengths the decoder does not take. Built once per
 * tensor by the fused product (endor_gds/decode/fused.py), per call by the decoder. */
int endor_exphuff_tables(const endor_exphuff *a, uint16_t *table, uint64_t *units) {
    int bf16 = a->elem_bytes == 2 && a->man_bits == 7, f16 = a->elem_bytes == 2 && a->man_bits == 10;
    int f32 = a->elem_bytes == 4 && a->man_bits == 23;
    if (!(bf16 || f16 || f32) || a->exp_bits != (f16 ? 5u : 8u) || (!a->bitmap && a->nnz != a->n) ||
        a->nbits > a->bits_nbytes * 8 || build_huff_table(a, table))
        return -1;
    build_unit_table(a, table, units);
    return 0;
}

/* Values [lo, hi) of tile t (cnt = hi - lo <= TILE_ELEMS values) into dst: the tile's and its
 * chunks' bit offsets checked, the chunks' units decoded two at a time (huff_units2), then the
 * values assembled from units and residuals. syms: TILE_ELEMS + 4 bytes of scratch. Nonzero when
 * the tile's bits, chunk bits or codes are inconsistent. */
static int huff_tile_values(const endor_exphuff *a, const uint16_t *table, const uint64_t *units,
                            uint64_t t, uint64_t lo, uint64_t hi, uint8_t *syms, void *dst, int avx2) {
    const uint64_t ntiles = (a->n + TILE_ELEMS - 1) / TILE_ELEMS, end_bit = a->nbits;
    /* edge[c]: where chunk c starts, edge[HUFF_CHUNKS] where the tile ends; an empty chunk
     * (past the tile's values) starts at the tile's end */
    uint64_t edge[HUFF_CHUNKS + 1], cnt = hi - lo;
    edge[0] = a->tile_bits[t];
    edge[HUFF_CHUNKS] = a->tile_bits[t + 1];
    /* the stream starts with tile 0, ends with the last tile, and a tile without values
     * spans no bits (chunk 0 is checked by its decode only when it has values) */
    if (edge[0] > edge[HUFF_CHUNKS] || edge[HUFF_CHUNKS] > end_bit || (t == 0 && edge[0] != 0) ||
        (t + 1 == ntiles && edge[HUFF_CHUNKS] != end_bit) || (cnt == 0 && edge[0] != edge[HUFF_CHUNKS]))
        return -1;
    for (int c = 1; c < HUFF_CHUNKS; c++) {
        edge[c] = edge[0] + a->chunk_bits[(uint64_t)(HUFF_CHUNKS - 1) * t + (uint64_t)(c - 1)];
        if (edge[c] < edge[c - 1] || edge[c] > edge[HUFF_CHUNKS] ||
            ((uint64_t)c * HUFF_CHUNK >= cnt && edge[c] != edge[HUFF_CHUNKS]))
            return -1;
    }
    uint64_t nchunks = (cnt + HUFF_CHUNK - 1) / HUFF_CHUNK;
    for (uint64_t c = 0; c < nchunks; c += 2) {
        const int g = c + 1 < nchunks ? 2 : 1;
        huff_reader r[2];
        uint64_t n[2];
        int bad[2] = {0, 0};
        for (int j = 0; j < g; j++) {
            uint64_t first = (c + (uint64_t)j) * HUFF_CHUNK;
            n[j] = cnt - first < HUFF_CHUNK ? cnt - first : HUFF_CHUNK;
            huff_seek(a->bits, a->bits_nbytes, &r[j], edge[c + (uint64_t)j]);
        }
        if (g == 2)
            huff_units2(a, table, units, &r[0], n[0], syms + c * HUFF_CHUNK, &bad[0], &r[1], n[1],
                        syms + (c + 1) * HUFF_CHUNK, &bad[1]);
        else
            bad[0] = huff_units(a, table, units, &r[0], 0, n[0], syms + c * HUFF_CHUNK);
        for (int j = 0; j < g; j++)
            if (bad[j] || huff_pos(&r[j]) != edge[c + (uint64_t)j + 1]) return -1;
    }
    if (a->elem_bytes == 4)
        (avx2 ? huff_assemble_f32_avx2 : huff_assemble_f32)(syms, a->residuals, lo, cnt, dst);
    else if (a->man_bits == 7)
        (avx2 ? huff_assemble_bf16_avx2 : huff_assemble_bf16)(syms, a->residuals, lo, cnt, dst);
    else
        (avx2 ? huff_assemble_f16_avx2 : huff_assemble_f16)(syms, a->residuals, lo, cnt, dst);
    return 0;
}

/* Decode tiles [t0, t1) of one exphuff tensor (features: as endor_decode_tiles): per tile, its
 * values (huff_tile_values), then, for a sparse tensor, the bitmap expand. Returns 0, t + 1 for
 * the first tile t whose tile offsets, tile or chunk bits, codes or bitmap are inconsistent, -1
 * for bad arguments. */
int64_t endor_decode_exphuff_tiles(const endor_exphuff *a, uint64_t t0, uint64_t t1, int features) {
    if (!tables_ready) build_tables();
    uint64_t ntiles = (a->n + TILE_ELEMS - 1) / TILE_ELEMS;
    uint16_t table[1 << HUFF_BITS];
    uint64_t units[1 << HUFF_BITS];
    if (t0 > t1 || t1 > ntiles || endor_exphuff_tables(a, table, units)) return -1;
    int simd = (features & cpu_features & FEAT_SSSE3) != 0;
    const int avx2 = (features & cpu_features & FEAT_AVX2) != 0;
    uint8_t syms[TILE_ELEMS + 4];
    uint32_t buf32[TILE_BUF] __attribute__((aligned(16)));
    if (a->bitmap) memset(buf32, 0, sizeof buf32); /* the SIMD expand reads past a tile's values */
    for (uint64_t t = t0; t < t1; t++) {
        uint64_t lo, hi, start = t * TILE_ELEMS, end = start + TILE_ELEMS < a->n ? start + TILE_ELEMS : a->n;
        if (a->bitmap) {
            if (!tile_range(a->tile_offsets, t, a->n, a->nnz, &lo, &hi, &start, &end)) return (int64_t)t + 1;
        } else {
            lo = start;
            hi = end;
        }
        void *dst = a->bitmap ? (void *)buf32 : (void *)((uint8_t *)a->out + start * a->elem_bytes);
        if (huff_tile_values(a, table, units, t, lo, hi, syms, dst, avx2)) return (int64_t)t + 1;
        if (a->bitmap) {
            int wrong = a->elem_bytes == 2
                ? expand_uint16_t(a->bitmap, (const uint16_t *)buf32, 0, hi - lo, TILE_BUF,
                                  (uint16_t *)a->out, start, end, simd, 0)
                : expand_uint32_t(a->bitmap, buf32, 0, hi - lo, TILE_BUF, (uint32_t *)a->out, start, end, simd, 0);
            if (wrong) return (int64_t)t + 1;
        }
    }
    return 0;
}

/* ---- Fused product y = x · Wᵀ straight from bitmap + values (CPU hosts, few rows of x) ----
 *
 * Why: at batch 1 every weight is used once per token. Decoding first writes the dense matrix
 * (2x the compressed bytes of a 50 % fp16 tensor) and the matmul reads it back: on a 2-core host
 * that round trip through memory, not the drive, set the time per token. Here each group of 8
 * elements is expanded in a register (the decoder's pshufb), widened to fp32 and multiplied into
 * 8-lane fp32 accumulators, one per row of x: the dense matrix never exists.
 *
 * Order of additions: per output row and piece (the part of the row inside one tile; a row that
 * crosses a tile boundary has two), elements before the piece's first multiple of 8 one by one,
 * then 8 lanes in two chains (even and odd groups of 8) summed lane-wise and then across lanes,
 * then the rest one by one; the pieces of a row are added in order. The portable path adds in the
 * same order (it differs only by FMA's single rounding). The order depends on the shape alone,
 * never on the thread split (a task owns whole rows) or the other rows of x, so results are
 * reproducible; it is not the dense matmul's order, which is why the runtime keeps the decode path
 * for bit-identical output (docs/design.md).
 *
 * Safety: as the decoder. Vector loads read 16 values past the cursor only while they lie below
 * the readable end, the scalar path checks the tile's end before each value, and every tile that
 * ends inside a task's rows is checked: cursor == its end offset (a task starting mid-tile counts
 * the bits before its first row from the tile's offset), no bits past n in the last word. */

typedef struct { /* mirrored by decode.fused._MatvecArgs (ctypes) */
    const uint32_t *bitmap;
    const uint32_t *tile_offsets;
    const void *values;           /* codec raw: nnz element bit patterns; else NULL */
    const endor_expdict *expdict; /* codec expdict: its streams (its out is unused); else NULL */
    const endor_exphuff *exphuff; /* codec exphuff: its streams (out unused; a dense tensor comes
                                   * with an all-ones bitmap and one tile offset per tile here) */
    const uint16_t *huff_table;   /* exphuff: endor_exphuff_tables' tables, built once */
    const uint64_t *huff_units;
    const void *x;                /* m x cols, row-major, in the weight's dtype */
    float *y;                     /* m x rows, row-major */
    uint64_t rows, cols, nnz;
    uint32_t m, dtype;            /* DT_*: how an element's bits become a float */
} endor_matvec;

enum { DT_F16 = 0, DT_BF16 = 1, DT_F32 = 2 };
#define MATVEC_MAX_M 16 /* rows of x: accumulators per output row */

static float f16_to_f32(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    float f;
    if (e == 0x1F)
        bits = sign | 0x7F800000u | (man << 13);
    else if (e)
        bits = sign | ((e + 112) << 23) | (man << 13);
    else { /* zero or subnormal: man * 2^-24, exact in fp32 */
        f = (float)man * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline float elem_float(const void *vals, uint64_t k, uint32_t dtype) {
    uint32_t bits;
    float f;
    if (dtype == DT_F32)
        bits = ((const uint32_t *)vals)[k];
    else if (dtype == DT_F16)
        return f16_to_f32(((const uint16_t *)vals)[k]);
    else
        bits = (uint32_t)((const uint16_t *)vals)[k] << 16;
    memcpy(&f, &bits, 4);
    return f;
}

/* Where one tile's values are read: cursor, the tile's end, the readable end (all in elements). */
typedef struct {
    const void *vals;
    uint64_t v, hiv, avail;
} value_cursor;

/* Elements [p, q) of one row, column c of p, one by one into sums. -1 when the tile runs out. */
static int scalar_piece(const endor_matvec *a, value_cursor *cur, uint64_t p, uint64_t q,
                        uint64_t c, float *sums) {
    for (; p < q; p++, c++) {
        if (!((a->bitmap[p / WORD_BITS] >> (p % WORD_BITS)) & 1u)) continue;
        if (cur->v >= cur->hiv) return -1;
        float w = elem_float(cur->vals, cur->v++, a->dtype);
        for (uint32_t j = 0; j < a->m; j++) sums[j] += w * elem_float(a->x, j * a->cols + c, a->dtype);
    }
    return 0;
}

#if ENDOR_X86
#define FMA_TARGET "avx2,fma,f16c"
/* 8 elements of bitmap byte b as fp32 lanes (0 where the bit is clear), from values at v.
 * Reads 8 values (fp32: 4 + 4 from two cursors) at most past v. */
__attribute__((target(FMA_TARGET))) static inline __m128i expand8x16(const void *vals, uint64_t v,
                                                                     unsigned b) {
    return _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((const uint16_t *)vals + v)),
                            _mm_loadu_si128((const __m128i *)EXPAND16[b]));
}
__attribute__((target(FMA_TARGET))) static inline __m256 widen_f16(const void *vals, uint64_t v,
                                                                   unsigned b) {
    return _mm256_cvtph_ps(expand8x16(vals, v, b));
}
__attribute__((target(FMA_TARGET))) static inline __m256 widen_bf16(const void *vals, uint64_t v,
                                                                    unsigned b) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(expand8x16(vals, v, b)), 16));
}
__attribute__((target(FMA_TARGET))) static inline __m256 widen_f32(const void *vals, uint64_t v,
                                                                   unsigned b) {
    const uint32_t *p = (const uint32_t *)vals + v;
    __m128i lo = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)p),
                                  _mm_loadu_si128((const __m128i *)EXPAND32[b & 15]));
    __m128i hi = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + POP8[b & 15])),
                                  _mm_loadu_si128((const __m128i *)EXPAND32[b >> 4]));
    return _mm256_castsi256_ps(_mm256_set_m128i(hi, lo));
}

/* x[k..k+8) as fp32 lanes: x is in the weight's dtype (widening fp16 or bf16 is exact), which
 * halves its cache footprint: with an fp32 copy of x, 11008-wide rows (Llama-7B's down_proj) ran
 * at half the speed of 4096-wide ones, x and the streams no longer fitting in L1 together. */
__attribute__((target(FMA_TARGET))) static inline __m256 x8_f16(const void *x, uint64_t k) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + k)));
}
__attribute__((target(FMA_TARGET))) static inline __m256 x8_bf16(const void *x, uint64_t k) {
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
__attribute__((target(FMA_TARGET))) static inline __m256 x8_f32(const void *x, uint64_t k) {
    return _mm256_loadu_ps((const float *)x + k);
}

__attribute__((target(FMA_TARGET))) static inline float hsum8(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* Groups of 8 elements [p, q) of one row (p a multiple of 8, column c), 16 per step while 16
 * values are readable past the cursor, for rows j0..j0+m-1 of x, into sums; returns the first
 * element not done. Built with m a constant 1 to 4, so that the 2m accumulators stay in registers
 * (with m a variable, or m = 8 at once, they spilled: 3-4x slower per row); more rows go 4 at a
 * time over the same values (from L1: a piece is at most one tile). A row's additions are the
 * same whatever the rows beside it. */
#define FMA_GROUPS(NAME, WIDEN, X8)                                                            \
    __attribute__((target(FMA_TARGET), always_inline)) static inline uint64_t NAME##_m(       \
        const endor_matvec *a, value_cursor *cur, uint64_t p, uint64_t q, uint64_t c,         \
        float *sums, const uint32_t m, const uint32_t j0) {                                    \
        __m256 acc0[4], acc1[4];                                                               \
        for (uint32_t j = 0; j < m; j++) acc0[j] = acc1[j] = _mm256_setzero_ps();              \
        const uint8_t *bm = (const uint8_t *)a->bitmap; /* little-endian words: byte p / 8 */ \
        /* locals: read through a and cur, the loop reloaded them every step (aliasing) */     \
        const void *vals = cur->vals, *x = a->x;                                               \
        const uint64_t avail = cur->avail, cols = a->cols, xrow = j0 * cols;                   \
        uint64_t v = cur->v;                                                                   \
        for (; p + 16 <= q && v + 16 <= avail; p += 16, c += 16) {                            \
            unsigned b0 = bm[p / 8], b1 = bm[p / 8 + 1];                                       \
            __m256 w0 = WIDEN(vals, v, b0);                                                    \
            v += POP8[b0];                                                                     \
            __m256 w1 = WIDEN(vals, v, b1);                                                    \
            v += POP8[b1];                                                                     \
            for (uint32_t j = 0; j < m; j++) {                                                 \
                acc0[j] = _mm256_fmadd_ps(w0, X8(x, xrow + j * cols + c), acc0[j]);           \
                acc1[j] = _mm256_fmadd_ps(w1, X8(x, xrow + j * cols + c + 8), acc1[j]);       \
            }                                                                                  \
        }                                                                                      \
        if (p + 8 <= q && v + 8 <= avail) {                                                    \
            unsigned b0 = bm[p / 8];                                                           \
            __m256 w0 = WIDEN(vals, v, b0);                                                    \
            v += POP8[b0];                                                                     \
            for (uint32_t j = 0; j < m; j++)                                                   \
                acc0[j] = _mm256_fmadd_ps(w0, X8(x, xrow + j * cols + c), acc0[j]);           \
            p += 8;                                                                            \
        }                                                                                      \
        for (uint32_t j = 0; j < m; j++) sums[j0 + j] += hsum8(_mm256_add_ps(acc0[j], acc1[j])); \
        cur->v = v;                                                                            \
        return p;                                                                              \
    }                                                                                          \
    __attribute__((target(FMA_TARGET))) static uint64_t NAME(                                  \
        const endor_matvec *a, value_cursor *cur, uint64_t p, uint64_t q, uint64_t c,         \
        float *sums) {                                                                         \
        uint64_t v0 = cur->v, end = p;                                                         \
        for (uint32_t j0 = 0; j0 < a->m; j0 += 4) {                                            \
            cur->v = v0;                                                                       \
            switch (a->m - j0 < 4 ? a->m - j0 : 4) {                                           \
            case 1: end = NAME##_m(a, cur, p, q, c, sums, 1, j0); break;                       \
            case 2: end = NAME##_m(a, cur, p, q, c, sums, 2, j0); break;                       \
            case 3: end = NAME##_m(a, cur, p, q, c, sums, 3, j0); break;                       \
            default: end = NAME##_m(a, cur, p, q, c, sums, 4, j0); break;                      \
            }                                                                                  \
        }                                                                                      \
        return end;                                                                            \
    }
FMA_GROUPS(fma_f16, widen_f16, x8_f16)
FMA_GROUPS(fma_bf16, widen_bf16, x8_bf16)
FMA_GROUPS(fma_f32, widen_f32, x8_f32)

#endif

/* One group of 8 elements at p (column c) into the lanes of `chain`, one value per set bit. */
static uint64_t scalar_group(const endor_matvec *a, const value_cursor *cur, uint64_t v, uint64_t p,
                             uint64_t c, float acc[MATVEC_MAX_M][8]) {
    unsigned b = ((const uint8_t *)a->bitmap)[p / 8];
    for (int k = 0; k < 8; k++) {
        if (!((b >> k) & 1u)) continue;
        float w = elem_float(cur->vals, v++, a->dtype);
        for (uint32_t j = 0; j < a->m; j++) acc[j][k] += w * elem_float(a->x, j * a->cols + c + k, a->dtype);
    }
    return v;
}

/* The portable groups: the vector path's steps and order of additions, lane by lane (16 elements
 * per step into two chains of 8 lanes while 16 values are readable, one more group into the first
 * chain, then chains added lane-wise, lanes 0-3 + 4-7, 0-1 + 2-3, 0 + 1), so that both paths add
 * the same way and differ only in FMA's single rounding. A running sum instead was 2-4x less
 * accurate than torch on fp32. */
static uint64_t scalar_groups(const endor_matvec *a, value_cursor *cur, uint64_t p, uint64_t q,
                              uint64_t c, float *sums) {
    float acc[2][MATVEC_MAX_M][8];
    memset(acc, 0, sizeof acc);
    uint64_t v = cur->v;
    for (; p + 16 <= q && v + 16 <= cur->avail; p += 16, c += 16) {
        v = scalar_group(a, cur, v, p, c, acc[0]);
        v = scalar_group(a, cur, v, p + 8, c + 8, acc[1]);
    }
    if (p + 8 <= q && v + 8 <= cur->avail) {
        v = scalar_group(a, cur, v, p, c, acc[0]);
        p += 8;
    }
    for (uint32_t j = 0; j < a->m; j++) {
        float l[8];
        for (int k = 0; k < 8; k++) l[k] = acc[0][j][k] + acc[1][j][k];
        for (int k = 0; k < 4; k++) l[k] += l[k + 4];
        sums[j] += (l[0] + l[2]) + (l[1] + l[3]);
    }
    cur->v = v;
    return p;
}

/* Elements [s, e) of one row into sums: one by one up to a multiple of 8, groups of 8, the rest
 * one by one. -1 when the tile runs out of values. */
static int row_piece(const endor_matvec *a, value_cursor *cur, uint64_t s, uint64_t e, int feat,
                     float *sums) {
    uint64_t c = s % a->cols, p = (s + 7) / 8 * 8;
    if (p > e) p = e;
    if (scalar_piece(a, cur, s, p, c, sums)) return -1;
    if (e - p >= 8) {
        uint64_t q = p + (e - p) / 8 * 8, cp = c + (p - s);
#if ENDOR_X86
        if (feat & FEAT_FMA)
            p = a->dtype == DT_F16 ? fma_f16(a, cur, p, q, cp, sums)
              : a->dtype == DT_BF16 ? fma_bf16(a, cur, p, q, cp, sums)
                                    : fma_f32(a, cur, p, q, cp, sums);
        else
#else
        (void)feat;
#endif
            p = scalar_groups(a, cur, p, q, cp, sums);
    }
    return scalar_piece(a, cur, p, e, c + (p - s), sums);
}

static inline uint32_t pop32(uint32_t w) {
    return (uint32_t)POP8[w & 0xFF] + POP8[(w >> 8) & 0xFF] + POP8[(w >> 16) & 0xFF] + POP8[w >> 24];
}

/* Bits set in [start, s) of the bitmap; start is a multiple of WORD_BITS (a tile's start). */
static uint64_t bits_before(const uint32_t *bitmap, uint64_t start, uint64_t s) {
    uint64_t count = 0, w = start / WORD_BITS;
    for (; w < s / WORD_BITS; w++) count += pop32(bitmap[w]);
    if (s % WORD_BITS) count += pop32(bitmap[w] & ((1u << (s % WORD_BITS)) - 1));
    return count;
}

/* Rows [r0, r1) of y = x · Wᵀ (W: rows x cols, bitmap-encoded, codec raw, expdict or exphuff), with the
 * FEAT_* features in `features` that this CPU has (FEAT_FMA: the vector path). Returns 0, t + 1
 * for the first inconsistent tile t (as endor_decode_tiles), -1 for bad arguments. */
int64_t endor_matvec_rows(const endor_matvec *a, uint64_t r0, uint64_t r1, int features) {
    if (!tables_ready) build_tables();
    const uint64_t rows = a->rows, cols = a->cols, n = rows * cols;
    const uint32_t eb = a->dtype == DT_F32 ? 4 : 2;
    if (a->m == 0 || a->m > MATVEC_MAX_M || cols == 0 || r0 > r1 || r1 > rows ||
        a->dtype > DT_F32 || (a->values != NULL) + (a->expdict != NULL) + (a->exphuff != NULL) != 1)
        return -1;
    const endor_expdict *ed = a->expdict;
    const endor_exphuff *hf = a->exphuff;
    int feat = features & cpu_features;
    expdict_tables T;
    if (ed && (ed->n != n || ed->nnz != a->nnz || ed->elem_bytes != eb || build_expdict_tables(ed, &T)))
        return -1;
    if (hf && (hf->n != n || hf->nnz != a->nnz || hf->elem_bytes != eb || !a->huff_table || !a->huff_units ||
               hf->man_bits != (a->dtype == DT_F16 ? 10u : a->dtype == DT_BF16 ? 7u : 23u)))
        return -1;
    /* zeroed once: the vector loads may read (and discard) entries past a tile's values */
    uint32_t buf32[TILE_BUF] __attribute__((aligned(32)));
    uint8_t syms[TILE_ELEMS + 4];
    if (ed || hf) memset(buf32, 0, sizeof buf32);
    for (uint32_t j = 0; j < a->m; j++)
        for (uint64_t r = r0; r < r1; r++) a->y[j * rows + r] = 0.0f;
    const uint64_t e0 = r0 * cols, e1 = r1 * cols;
    for (uint64_t t = e0 / TILE_ELEMS; t * TILE_ELEMS < e1; t++) {
        uint64_t lo, hi, start, end;
        if (!tile_range(a->tile_offsets, t, n, a->nnz, &lo, &hi, &start, &end)) return (int64_t)t + 1;
        value_cursor cur = {a->values, lo, hi, a->nnz};
        if (ed) {
            uint64_t q0, q1;
            if (!escape_range(ed, t, (n + TILE_ELEMS - 1) / TILE_ELEMS, lo, hi, &q0, &q1))
                return (int64_t)t + 1;
            rebuild_values(ed, &T, lo, hi, buf32, feat);
            if (patch_escapes(ed, q0, q1, hi - lo, buf32)) return (int64_t)t + 1;
            cur = (value_cursor){buf32, 0, hi - lo, TILE_BUF};
        } else if (hf) {
            if (huff_tile_values(hf, a->huff_table, a->huff_units, t, lo, hi, syms, buf32,
                                 (feat & FEAT_AVX2) != 0))
                return (int64_t)t + 1;
            cur = (value_cursor){buf32, 0, hi - lo, TILE_BUF};
        }
        uint64_t s = start > e0 ? start : e0, e = end < e1 ? end : e1;
        cur.v += bits_before(a->bitmap, start, s);
        for (uint64_t p = s; p < e;) {
            uint64_t r = p / cols, q = (r + 1) * cols < e ? (r + 1) * cols : e;
            float sums[MATVEC_MAX_M] = {0};
            if (row_piece(a, &cur, p, q, feat, sums)) return (int64_t)t + 1;
            for (uint32_t j = 0; j < a->m; j++) a->y[j * rows + r] += sums[j];
            p = q;
        }
        if (e == end && (cur.v != cur.hiv ||
                         (end == n && n % WORD_BITS && a->bitmap[n / WORD_BITS] >> (n % WORD_BITS))))
            return (int64_t)t + 1;
    }
    return 0;
}

/* ---- CRC-32C combine ----
 *
 * The CRC-32C of A‖B from crc(A), crc(B) and len(B): crc(A‖B) = crc(A)·x^(8·len(B)) ⊕ crc(B) in
 * GF(2)[x] mod P (the pre- and post-inversions cancel, as in zlib's crc32_combine, whose
 * multmodp / x2nmodp method this is, with Castagnoli's reflected polynomial). It lets the reader
 * threads check the pieces of a segment as each arrives, in any order, and fold the pieces'
 * CRCs into the segment's when its last piece lands (endor_gds/stream/integrity.py). */
#define CRC32C_POLY 0x82F63B78u /* reflected */

/* a·b mod P, bit-reflected (bit 31 is x^0). */
static uint32_t crc_multmodp(uint32_t a, uint32_t b) {
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ CRC32C_POLY : b >> 1;
    }
    return p;
}

/* x^(2^k) mod P for k = 0..31 (x^(2^k·n) repeats with the order of x, so k wraps mod 32). */
static uint32_t crc_x2n[32];
static int crc_ready = 0;

static void crc_tables(void) {
    uint32_t p = 1u << 30; /* x^1 */
    crc_x2n[0] = p;
    for (int k = 1; k < 32; k++) crc_x2n[k] = p = crc_multmodp(p, p);
    crc_ready = 1;
}

uint32_t endor_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2) {
    if (!crc_ready) crc_tables();
    uint32_t p = 1u << 31; /* x^0: x^(8·len2) = Π x^(2^k) over the set bits of len2 << 3 */
    for (unsigned k = 3; len2; len2 >>= 1, k++)
        if (len2 & 1) p = crc_multmodp(crc_x2n[k & 31], p);
    return crc_multmodp(p, crc1) ^ crc2;
}

/* The FEAT_* mask of this CPU: what a call's `features` argument can enable. */
int endor_cpu_features(void) {
    if (!tables_ready) build_tables();
    return cpu_features;
}

/* An importable module only so setuptools builds, names and ships this library; Python calls
 * the functions above through ctypes, which releases the GIL for the duration of a call. */
static struct PyModuleDef endor_cpu_module = {PyModuleDef_HEAD_INIT, "_endor_cpu",
                                              "endor_gds CPU decoder (used via ctypes)", -1,
                                              NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__endor_cpu(void) {
    build_tables();
    crc_tables();
    return PyModule_Create(&endor_cpu_module);
}
