/* AMX kernel for bcnp._quant: Y = X W^T for up to 16 tokens per pass, straight from Q8_0 / Q4_0 blocks, computing
 * exactly what the GEMM's specification (bcnp_gemm_q8_0_scalar, quant_gemm.h) computes:
 *   y[t, r] = sum over blocks b, in order, of  float(isum) * (d[r, b] * dx[t, b])       (float32, one accumulator)
 * with isum the exact integer dot product of the block's codes with the int16 activation: the matvec's sums too
 * (quant_group.h), so a token gets the same bits in a batch as alone.
 *
 * Why AMX: the AVX-512 batched kernels paid a convert and an FMA for every (row, token, block) and were
 * compute-bound at 8 tokens.  The tile unit does the integer products of 16 rows x 16 tokens x one block in two
 * instructions; what is left on the vector units is one FMA per 16 outputs.  The tile unit multiplies bytes or
 * bfloat16, not int16, so the activation goes in as two pieces, x = 256 hi + lo (hi in -128..127, lo in 0..255):
 * - Q8_0: int8 codes against the two byte planes (tdpbssd, tdpbsud), two int32 tiles recombined exactly
 *   (|256 hi-sum| <= 2^27);
 * - Q4_0: the codes - 8 and the pieces 256 hi, lo as bfloat16 (all exact), both products into one float32 tile:
 *   every partial sum is an integer below 32 * 8 * (32768 + 255) < 2^24, so float32 holds it exactly, whatever the
 *   order -- one tile store per block instead of two, and the store is the tile unit's slowest step.
 *
 * Layout: A = 16 weight rows x one block of codes (Q8_0 read in place; Q4_0 unpacked to a small scratch), B = the
 * block of the T tokens' pieces in the tile unit's groups (4 bytes per token and row of B: bcnp_amx_prepare), C =
 * 16 x T.  C goes to memory and comes back as T vectors; lane j of vector v is flat output 16 v + j = (row
 * (16 v + j) / T, token (16 v + j) % T), whose scale is its row's d (a lane permute) times its token's dx.
 *
 * Linux only: the kernel must be asked for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), once per process;
 * bcnp_amx_enable says whether that worked.
 */
#ifndef BCNP_QUANT_AMX_H
#define BCNP_QUANT_AMX_H

#include <stdlib.h>
#include "quant_group.h"

#define BCNP_AMX_TOKENS 16      /* tokens per pass: a C tile holds 16 values per row */
#define BCNP_AMX_ROWS 16        /* weight rows per group: an A tile's rows */
#define BCNP_AMX_CHUNK 16       /* Q4_0 blocks unpacked at a time (16 rows x 16 blocks x 64 bytes = 16 KiB, in L1) */
#define BCNP_AMX_TILE_BYTES 2048        /* per block: the two pieces' B tiles, 16 rows x 64 bytes each at most */

/* One pass's tokens, prepared once for all row groups (bcnp_amx_prepare). */
typedef struct {
    const uint8_t *tiles;       /* nb x BCNP_AMX_TILE_BYTES: per block the B tile of the high piece, then the low */
    const float *dxp;           /* nb x T x 16: dx of the token of each flat output lane */
    const int32_t *ridx;        /* T x 16: the row (0..15) of each flat output lane */
    int T;
} bcnp_amx_tokens;

#if defined(BCNP_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && \
    defined(__AVX512BF16__) && defined(__linux__)
#define BCNP_AMX_BUILT 1
#include <sys/syscall.h>
#include <unistd.h>

static int bcnp_amx_enable(void)
{
    /* ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18: fails where the CPU or the kernel has no AMX */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} bcnp_tile_config;

/* Tiles 0 and 7: A of the even and the odd blocks; 1, 2: B of the high and the low piece; 3-4 and 5-6: C of the
   even and the odd blocks (Q8_0: high and low; Q4_0 uses 3 and 5 only). */
static inline void bcnp_amx_configure(int T, int bits)
{
    const int k_bytes = bits == 8 ? 32 : 64;               /* one block: 32 int8 or 32 bfloat16 */
    bcnp_tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = c.rows[7] = 16, c.colsb[0] = c.colsb[7] = (uint16_t)k_bytes;
    for (int k = 1; k < 3; k++) c.rows[k] = (uint8_t)(k_bytes / 4), c.colsb[k] = (uint16_t)(4 * T);
    for (int k = 3; k < 7; k++) c.rows[k] = 16, c.colsb[k] = (uint16_t)(4 * T);
    _tile_loadconfig(&c);
}

/* Blocks b .. b + count - 1 of 16 Q4_0 rows (row stride 16 nb bytes) as bfloat16 codes - 8:
   a[64 (BCNP_AMX_CHUNK r + k) + 2 j] = code j of block b + k of row r. */
static inline void bcnp_amx_unpack_q4_0(const uint8_t *w, int64_t nb, int64_t b, int64_t count, uint8_t *a)
{
    /* bfloat16 of c - 8 for c = 0..15 */
    const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                           0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,
                                           (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080,
                                           (short)0xC0A0, (short)0xC0C0, (short)0xC0E0, (short)0xC100);
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    const __m128i nibble16 = _mm_set1_epi8(0x0F);
    for (int r = 0; r < 16; r++) {
        const uint8_t *src = w + r * 16 * nb + 16 * b;
        uint8_t *dst = a + 64 * BCNP_AMX_CHUNK * r;
        int64_t k = 0;
        /* sixteen streams of 256 bytes: without a prefetch two chunks ahead this loop waits on memory (measured
           in a C harness: twice the time of the whole kernel without it) */
        if (b + 3 * BCNP_AMX_CHUNK <= nb)
            for (int l = 0; l < 16 * BCNP_AMX_CHUNK; l += 64) _mm_prefetch((const char *)(src + 32 * BCNP_AMX_CHUNK + l), _MM_HINT_T0);
        for (; k + 4 <= count; k += 4) {           /* 4 blocks: low nibbles are codes 0-15, high ones 16-31 */
            const __m512i v = _mm512_loadu_si512(src + 16 * k);
            const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            const __m512i c01 = _mm512_permutex2var_epi64(lo, first, hi), c23 = _mm512_permutex2var_epi64(lo, second, hi);
            _mm512_store_si512(dst + 64 * k, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(c01)), table));
            _mm512_store_si512(dst + 64 * k + 64, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(c01, 1)), table));
            _mm512_store_si512(dst + 64 * k + 128, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(c23)), table));
            _mm512_store_si512(dst + 64 * k + 192, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(c23, 1)), table));
        }
        for (; k < count; k++) {
            const __m128i q = _mm_loadu_si128((const __m128i *)(src + 16 * k));
            const __m256i c = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), nibble16), _mm_and_si128(q, nibble16));
            _mm512_store_si512(dst + 64 * k, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(c), table));
        }
    }
}

/* The float work of block k: its C tiles (at c: Q8_0 high then low as int32, 16 T each; Q4_0 one float32 tile)
   into the accumulators. */
#define BCNP_AMX_FINISH(c, dwk, dxk)                                                                                \
    do {                                                                                                            \
        const __m512 dwv = _mm512_load_ps(dwk);                                                                     \
        for (int v = 0; v < T; v++) {                                                                               \
            const __m512 sum = bits == 8                                                                            \
                ? _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512((c) + 16 * v), 8),         \
                                                      _mm512_load_si512((c) + 16 * T + 16 * v)))                    \
                : _mm512_load_ps((const float *)(c) + 16 * v);                                                      \
            const __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_load_si512(x->ridx + 16 * v), dwv),         \
                                           _mm512_load_ps((dxk) + 16 * v));                                         \
            acc[v] = _mm512_fmadd_ps(sum, s, acc[v]);                                                               \
        }                                                                                                           \
    } while (0)

/* One block's products: A tile a (loaded) with the B tiles 1 (high piece) and 2 (low) into C tiles ch, cl. */
#define BCNP_AMX_PRODUCTS(a, ch, cl)                                                                                \
    do {                                                                                                            \
        if (bits == 8) {                                                                                            \
            _tile_zero(ch);                                                                                         \
            _tile_zero(cl);                                                                                         \
            _tile_dpbssd(ch, a, 1);                                                                                 \
            _tile_dpbsud(cl, a, 2);                                                                                 \
        } else {                                                                                                    \
            _tile_zero(ch);                                                                                         \
            _tile_dpbf16ps(ch, a, 1);                                                                               \
            _tile_dpbf16ps(ch, a, 2);                                                                               \
        }                                                                                                           \
    } while (0)

#define BCNP_AMX_STORE(ch, cl, c)                                                                                   \
    do {                                                                                                            \
        _tile_stored(ch, (c), 4 * T);                                                                               \
        if (bits == 8) _tile_stored(cl, (c) + 16 * T, 4 * T);                                                       \
    } while (0)

/* 16 rows (Q8_0 codes at q8, row stride 32 nb, or Q4_0 at q4) against x: out[T * r + t].
   A software pipeline three blocks deep, because a tile store takes as long as the products and the vector loads
   after it wait for it: step b multiplies block b (A tiles and C tiles alternate between even and odd blocks, so
   that block b + 1 need not wait for block b), stores block b - 1's C tiles and adds up block b - 2. */
static inline __attribute__((always_inline))
void bcnp_amx_group(const int8_t *q8, const uint8_t *q4, const uint16_t *d, int64_t nb, const bcnp_amx_tokens *x,
                    const int T, const int bits, float *dw, uint8_t *scratch, int32_t *cbuf, float *out)
{
    __m512 acc[BCNP_AMX_TOKENS];
    for (int v = 0; v < T; v++) acc[v] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb + 2; b++) {
        if (b < nb) {
            if (b % 16 == 0) bcnp_group_scales(d, nb, b, nb - b < 16 ? nb - b : 16, dw + 16 * (b % 32));
            const void *a;
            int64_t stride;
            if (bits == 8) {
                if ((b & 1) == 0 && b + 8 < nb)         /* 16 streams: the hardware prefetcher alone falls behind */
                    for (int r = 0; r < 16; r++) _mm_prefetch((const char *)(q8 + r * 32 * nb + 32 * (b + 8)), _MM_HINT_T0);
                a = q8 + 32 * b, stride = 32 * nb;
            } else {
                if (b % BCNP_AMX_CHUNK == 0)
                    bcnp_amx_unpack_q4_0(q4, nb, b, nb - b < BCNP_AMX_CHUNK ? nb - b : BCNP_AMX_CHUNK, scratch);
                a = scratch + 64 * (b % BCNP_AMX_CHUNK), stride = 64 * BCNP_AMX_CHUNK;
            }
            _tile_loadd(1, x->tiles + BCNP_AMX_TILE_BYTES * b, 64);
            _tile_loadd(2, x->tiles + BCNP_AMX_TILE_BYTES * b + BCNP_AMX_TILE_BYTES / 2, 64);
            if (b & 1) {
                _tile_loadd(7, a, stride);
                BCNP_AMX_PRODUCTS(7, 5, 6);
            } else {
                _tile_loadd(0, a, stride);
                BCNP_AMX_PRODUCTS(0, 3, 4);
            }
        }
        if (b >= 1 && b <= nb) {                    /* block b - 1's sums to memory */
            int32_t *c = cbuf + 512 * ((b - 1) % 3);
            if ((b - 1) & 1) BCNP_AMX_STORE(5, 6, c);
            else BCNP_AMX_STORE(3, 4, c);
        }
        if (b >= 2) {                               /* block b - 2, stored last time round */
            const int64_t k = b - 2;
            BCNP_AMX_FINISH(cbuf + 512 * (k % 3), dw + 16 * (k % 32), x->dxp + 16 * T * k);
        }
    }
    for (int v = 0; v < T; v++) _mm512_storeu_ps(out + 16 * v, acc[v]);
}

/* Row groups g0 .. g1 - 1 (16 rows each, from row 16 g0 of the weight) against x: y[t * ys + r], one thread.
   q8 is NULL for Q4_0 weights (then q4 holds them). */
static void bcnp_amx_rows(const int8_t *q8, const uint8_t *q4, const uint16_t *d, int64_t nb, int64_t g0, int64_t g1,
                          const bcnp_amx_tokens *x, float *y, int64_t ys)
{
    const int T = x->T, bits = q8 ? 8 : 4;
    float *dw = (float *)aligned_alloc(64, 32 * 16 * sizeof(float));
    uint8_t *scratch = (uint8_t *)aligned_alloc(64, 16 * 64 * BCNP_AMX_CHUNK);
    int32_t *cbuf = (int32_t *)aligned_alloc(64, 3 * 512 * sizeof(int32_t));
    float out[16 * BCNP_AMX_TOKENS];
    bcnp_amx_configure(T, bits);
    for (int64_t g = g0; g < g1; g++) {
        const int64_t r0 = 16 * g;
        const int8_t *w8 = bits == 8 ? q8 + r0 * 32 * nb : NULL;
        const uint8_t *w4 = bits == 8 ? NULL : q4 + r0 * 16 * nb;
#define BCNP_CALL(n)                                                                                                \
    if (bits == 8) bcnp_amx_group(w8, NULL, d + r0 * nb, nb, x, n, 8, dw, scratch, cbuf, out);                      \
    else bcnp_amx_group(NULL, w4, d + r0 * nb, nb, x, n, 4, dw, scratch, cbuf, out)
        switch (T) {
        case 1: BCNP_CALL(1); break; case 2: BCNP_CALL(2); break; case 3: BCNP_CALL(3); break;
        case 4: BCNP_CALL(4); break; case 5: BCNP_CALL(5); break; case 6: BCNP_CALL(6); break;
        case 7: BCNP_CALL(7); break; case 8: BCNP_CALL(8); break; case 9: BCNP_CALL(9); break;
        case 10: BCNP_CALL(10); break; case 11: BCNP_CALL(11); break; case 12: BCNP_CALL(12); break;
        case 13: BCNP_CALL(13); break; case 14: BCNP_CALL(14); break; case 15: BCNP_CALL(15); break;
        default: BCNP_CALL(16); break;
        }
#undef BCNP_CALL
        for (int i = 0; i < 16 * T; i++) y[(i % T) * ys + r0 + i / T] = out[i];
    }
    _tile_release();
    free(dw);
    free(scratch);
    free(cbuf);
}

/* The B tiles and lane tables of T <= 16 tokens (xq, dx as bcnp_quantize_activation, natural layout, token t at
   xq + t n, dx + t nb), for bits = 8 or 4:
   Q8_0: tiles[2048 b + 1024 h + 64 g + 4 t + i] = byte h (0: the high one, signed; 1: the low, unsigned) of
         x[t][32 b + 4 g + i];
   Q4_0: the bfloat16 pieces 256 hi and lo of x[t][32 b + 2 g + i] at tiles[2048 b + 1024 h + 64 g + 4 t + 2 i]. */
static void bcnp_amx_prepare(const int16_t *xq, const float *dx, int64_t n, int T, int bits, uint8_t *tiles,
                             float *dxp, int32_t *ridx)
{
    const int64_t nb = n / 32;
    const __m512i rows = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
    for (int t = 0; t < T; t++)
        for (int64_t b = 0; b < nb; b++) {
            const __m512i v = _mm512_loadu_si512(xq + t * n + 32 * b);
            uint8_t *tile = tiles + BCNP_AMX_TILE_BYTES * b + 4 * t;
            if (bits == 8) {
                _mm256_i32scatter_epi32(tile, _mm512_castsi512_si256(rows), _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)), 4);
                _mm256_i32scatter_epi32(tile + 1024, _mm512_castsi512_si256(rows), _mm512_cvtepi16_epi8(v), 4);
            } else {
                const __m512i hi = _mm512_srai_epi16(v, 8), lo = _mm512_and_si512(v, _mm512_set1_epi16(0xFF));
                for (int half = 0; half < 2; half++) {    /* elements 16 half .. 16 half + 15: B rows 8 half .. */
                    const __m512 h = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(half ? _mm512_extracti64x4_epi64(hi, 1) : _mm512_castsi512_si256(hi))), _mm512_set1_ps(256.0f));
                    const __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(half ? _mm512_extracti64x4_epi64(lo, 1) : _mm512_castsi512_si256(lo)));
                    const __m256i hb = (__m256i)_mm512_cvtneps_pbh(h), lb = (__m256i)_mm512_cvtneps_pbh(l);
                    /* 16 bfloat16 = 8 pairs: pair p goes to B row 8 half + p */
                    _mm256_i32scatter_epi32(tile + 512 * half, _mm512_castsi512_si256(rows), hb, 4);
                    _mm256_i32scatter_epi32(tile + 1024 + 512 * half, _mm512_castsi512_si256(rows), lb, 4);
                }
            }
        }
    for (int v = 0; v < T; v++)
        for (int j = 0; j < 16; j++) ridx[16 * v + j] = (16 * v + j) / T;
    for (int64_t b = 0; b < nb; b++)
        for (int i = 0; i < 16 * T; i++) dxp[16 * T * b + i] = dx[(i % T) * nb + b];
}
#else
#define BCNP_AMX_BUILT 0
static int bcnp_amx_enable(void) { return 0; }
static void bcnp_amx_rows(const int8_t *q8, const uint8_t *q4, const uint16_t *d, int64_t nb, int64_t g0, int64_t g1,
                          const bcnp_amx_tokens *x, float *y, int64_t ys) {}
static void bcnp_amx_prepare(const int16_t *xq, const float *dx, int64_t n, int T, int bits, uint8_t *tiles,
                             float *dxp, int32_t *ridx) {}
#endif

#endif
