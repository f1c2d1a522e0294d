/* AMX kernel for bcnp._quant: Y = X W^T for a few tokens, straight from Q8_0 / Q4_0 blocks, computing exactly what
 * the GEMM's specification (bcnp_gemm_q8_0_scalar, quant_gemm.h) computes:
 *   y[t, r] = sum over blocks b, in order, of  float(isum) * (d[r, b] * dx[t, b])       (float32, one accumulator)
 * with isum the exact integer dot product of the block's codes with the rounded activation (int16 for Q8_0, int8
 * for Q4_0: bcnp_quantize_activation): the matvec's sums too (quant_group.h), so a token gets the same bits in a
 * batch as alone.
 *
 * Why AMX: the AVX-512 batched kernels paid a convert and an FMA for every (row, token, block) and were
 * compute-bound at 8 tokens; the tile unit does the integer products of 16 rows x 16 columns x 64 bytes in one
 * instruction.  It multiplies bytes, so for Q8_0 weights the int16 activation goes in as two byte planes,
 * x = 256 hi + lo (hi signed, lo unsigned: tdpbssd and tdpbsud against the int8 codes), two int32 tiles recombined
 * exactly (|256 hi-sum| <= 2^27); for Q4_0 (codes - 8 unpacked to a scratch) the int8 activation is one plane,
 * one tdpbssd, one C tile, and so is the int8 x that an int4 model's Q8_0 lm_head meets (bcnp.layout.activation_bits).
 *
 * Up to 4 tokens, two blocks per instruction (bcnp_amx_group): the per-block scales need each block's sum on its
 * own, but a tile row holds 64 bytes, two blocks of codes.  So A = 16 weight rows x blocks b, b + 1, and B is
 * block-diagonal: columns 0 .. P-1 hold the P tokens' bytes of block b in B's first 8 rows (zeros below), columns
 * P .. 2P-1 those of block b + 1 in its last 8 rows; C = 16 rows x (block b's P sums, block b + 1's).  That halves
 * the tile unit's work per block, whose slowest step is the store of C (measured, one 16-row step: 2 blocks in
 * 29 ns against 1 in 24).  P is the token count rounded up to 1, 2, 4 or 8 (the lanes of the float work repeat
 * every 16); padded tokens have zero bytes and scales.  The C tiles go to memory and come back as vectors;
 * accumulator vector v holds flat outputs 16 v .. 16 v + 15, output i = (row i / P, token i % P), whose C entries
 * are two vectors of C: a lane permute picks block b's, another block b + 1's, each meets its scales (the row's d
 * by a permute, the token's dx) in one FMA, b first.
 *
 * 5 to 16 tokens, one block per instruction (bcnp_amx_blocks): A = 16 rows x block b (32 bytes), B = 8 or 16
 * tokens' bytes of block b, C = 16 rows x 8 or 16 tokens, whose rows are the accumulators as they stand: no lane
 * moves, the scale one broadcast or permute times one vector.  At 9 to 16 tokens it replaced two passes of 8 over
 * each group of rows (the second from L2), which unpacked int4's codes and moved lanes twice: the 10 int4 linears
 * of 2 13B layers at 16 tokens took 47.1 and 73.5 ms against 80.6 and 103.9 (two runs), the int8 lm_head 42.0
 * against 65.1, the 10 int8 linears 98.0 against 135.5 (best of 4-5 alternated rounds); and int4 prompts now take
 * AMX at any length (csrc/quant.pyx).  At 5 to 8 tokens (N = 8) it replaced the pairs: the 10 int4 linears at 8
 * tokens 29.8, 35.7, 33.7, 31.1 ms against 34.6, 44.7, 36.0, 34.7 in four alternated runs (one more the other way,
 * 29.6 against 25.8), at 6 tokens 34.9 against 39.9; in the engine, both builds swapped step by step, B = 8 int8
 * 162.4 against 140.0 tok/s (medians 156.1, 134.9), int4 even (170.8, 171.1).  At 3 and 4 tokens the pairs stay,
 * 10% faster.
 *
 * Linux only: the kernel must be asked for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), once per process;
 * bcnp_amx_enable says whether that worked.
 */
#ifndef BCNP_QUANT_AMX_H
#define BCNP_QUANT_AMX_H

#include <stdlib.h>
#include "quant_group.h"

#define BCNP_AMX_TOKENS 8       /* lanes per row of the lane tables, accumulators of bcnp_amx_group (P <= 4 there) */
#define BCNP_AMX_MAX_TOKENS 16  /* tokens per set (bcnp_amx_rows takes several sets in turn) */
#define BCNP_AMX_ROWS 16        /* weight rows per group: an A tile's rows */
#define BCNP_AMX_CHUNK 16       /* Q4_0 blocks unpacked at a time (16 rows x 16 blocks x 32 bytes = 8 KiB, in L1) */
#define BCNP_AMX_PAIR_BYTES 2048        /* per pair of blocks: the B tiles of the high and the low bytes (Q8_0) */

/* A set of up to 16 tokens, prepared once for all row groups (bcnp_amx_prepare, bcnp_amx_prepare_blocks). */
typedef struct {
    const uint8_t *tiles;       /* (nb + 1) / 2 x BCNP_AMX_PAIR_BYTES: per pair of blocks the B tile of the high
                                   bytes, then of the low (Q8_0), or the one of the int8 activation (Q4_0);
                                   P = 16: per block (planes x 512 bytes) */
    const float *dxp;           /* nb x P x 16: dx of the token of each flat output lane (0 for padding); P = 16:
                                   nb x 16, the tokens' dx per block */
    const int32_t *ridx;        /* P x 16: the row (0..15) of each flat output lane (P <= 8) */
    const int32_t *pick;        /* 2 x 16: the lanes of two C vectors that hold block b's, block b + 1's sums (P <= 8) */
    int T, P;                   /* tokens, and P: T rounded up to 1, 2, 4 (two blocks an instruction), 8 or 16 (one) */
    int planes;                 /* byte planes of x: 2 for an int16 x (Q8_0 weights), 1 for an int8 x (Q4_0, or
                                   Q8_0 in an int4 model's lm_head) */
} bcnp_amx_tokens;

static inline int bcnp_amx_padded(int T) { return T <= 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : T <= 8 ? 8 : 16; }

#if defined(BCNP_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
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

/* Tiles 0 and 7: A of the even and the odd steps; 1, 2: B of the high and the low bytes; 3-4 and 5-6: C (high, low)
   of the even and the odd steps.  P <= 4 (bcnp_amx_group): a step is a pair of blocks, A 64 bytes wide, B 16 rows
   of 8P bytes; P = 8, 16 (bcnp_amx_blocks): a step is a block, A 32 bytes wide, B 8 rows of 4P bytes. */
static inline void bcnp_amx_configure(int P)
{
    bcnp_tile_config c;
    const int blocks = P >= 8;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int k = 0; k < 8; k++) c.rows[k] = 16, c.colsb[k] = (uint16_t)(blocks ? 4 * P : 8 * P);
    c.colsb[0] = c.colsb[7] = blocks ? 32 : 64;
    if (blocks) c.rows[1] = c.rows[2] = 8;
    _tile_loadconfig(&c);
}

/* Blocks b .. b + count - 1 of 16 Q4_0 rows (row stride 16 nb bytes) as int8 codes - 8:
   a[32 (BCNP_AMX_CHUNK r + k) + j] = code j of block b + k of row r. */
static inline void bcnp_amx_unpack_q4_0(const uint8_t *w, int64_t nb, int64_t b, int64_t count, int8_t *a)
{
    const __m512i nibble = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    for (int r = 0; r < 16; r++) {
        const uint8_t *src = w + r * 16 * nb + 16 * b;
        int8_t *dst = a + 32 * BCNP_AMX_CHUNK * r;
        int64_t k = 0;
        for (; k + 4 <= count; k += 4) {           /* 4 blocks: low nibbles are codes 0-15, high ones 16-31 */
            const __m512i v = _mm512_loadu_si512(src + 16 * k);
            const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            _mm512_store_si512(dst + 32 * k, _mm512_sub_epi8(_mm512_permutex2var_epi64(lo, first, hi), eight));
            _mm512_store_si512(dst + 32 * k + 64, _mm512_sub_epi8(_mm512_permutex2var_epi64(lo, second, hi), eight));
        }
        for (; k < count; k++)
            for (int j = 0; j < 16; j++) {
                dst[32 * k + j] = (int8_t)((src[16 * k + j] & 0x0F) - 8);
                dst[32 * k + j + 16] = (int8_t)((src[16 * k + j] >> 4) - 8);
            }
    }
}

/* The float work of the pair of blocks k, k + 1 (k + 1 only if two): its C tiles at c (high then low, 32 P int32
   each; one tile where planes = 1) into the accumulators. */
#define BCNP_AMX_SUMS(c, i) (planes == 2 ? _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512((c) + (i)), 8),        \
                                                            _mm512_load_si512((c) + 32 * P + (i)))                 \
                                         : _mm512_load_si512((c) + (i)))
#define BCNP_AMX_FINISH(c, k, two)                                                                                  \
    do {                                                                                                            \
        const __m512i first = _mm512_load_si512(x->pick), second = _mm512_load_si512(x->pick + 16);                \
        const __m512 dw0 = _mm512_load_ps(dw + 16 * ((k) % 32)), dw1 = _mm512_load_ps(dw + 16 * (((k) + 1) % 32));  \
        const float *dx0 = x->dxp + 16 * P * (k), *dx1 = dx0 + 16 * P;                                              \
        for (int v = 0; v < P; v++) {                                                                               \
            const __m512i s0 = BCNP_AMX_SUMS(c, 32 * v), s1 = BCNP_AMX_SUMS(c, 32 * v + 16);                        \
            const __m512i rows = _mm512_load_si512(x->ridx + 16 * v);                                               \
            acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(s0, first, s1)),                  \
                                     _mm512_mul_ps(_mm512_permutexvar_ps(rows, dw0), _mm512_load_ps(dx0 + 16 * v)), \
                                     acc[v]);                                                                       \
            if (two)                                                                                                \
                acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(s0, second, s1)),             \
                                         _mm512_mul_ps(_mm512_permutexvar_ps(rows, dw1), _mm512_load_ps(dx1 + 16 * v)), \
                                         acc[v]);                                                                   \
        }                                                                                                           \
    } while (0)

/* One pair's products: A tile a (loaded) with the B tiles 1 (high bytes, or the int8 activation) and 2 (low) into
   C tiles ch, cl. */
#define BCNP_AMX_PRODUCTS(a, ch, cl)                                                                                \
    do {                                                                                                            \
        _tile_zero(ch);                                                                                             \
        _tile_dpbssd(ch, a, 1);                                                                                     \
        if (planes == 2) {                                                                                          \
            _tile_zero(cl);                                                                                         \
            _tile_dpbsud(cl, a, 2);                                                                                 \
        }                                                                                                           \
    } while (0)

/* Step p's products (both pipelines): B tiles bhi (and blo, planes = 2; row stride bstride), A tile from a (row
   stride `stride`), into the C tiles of even or odd steps; and step p's C tiles to c (rows of `bytes`, the low plane's tile at c + lo). */
#define BCNP_AMX_MULTIPLY(p, bhi, blo, a, stride, bstride)                                                        \
    do {                                                                                                            \
        _tile_loadd(1, bhi, bstride);                                                                               \
        if (planes == 2) _tile_loadd(2, blo, bstride);                                                              \
        if ((p) & 1) {                                                                                              \
            _tile_loadd(7, a, stride);                                                                              \
            BCNP_AMX_PRODUCTS(7, 5, 6);                                                                             \
        } else {                                                                                                    \
            _tile_loadd(0, a, stride);                                                                              \
            BCNP_AMX_PRODUCTS(0, 3, 4);                                                                             \
        }                                                                                                           \
    } while (0)
#define BCNP_AMX_STORE(p, c, bytes, lo)                                                                             \
    do {                                                                                                            \
        if ((p) & 1) {                                                                                              \
            _tile_stored(5, c, bytes);                                                                              \
            if (planes == 2) _tile_stored(6, (c) + (lo), bytes);                                                    \
        } else {                                                                                                    \
            _tile_stored(3, c, bytes);                                                                              \
            if (planes == 2) _tile_stored(4, (c) + (lo), bytes);                                                    \
        }                                                                                                           \
    } while (0)

/* Block b of 16 Q4_0 rows as int8 codes - 8 in the scratch (unpacked a chunk at a time, at its first block). */
static inline const int8_t *bcnp_amx_codes(const uint8_t *q4, int64_t nb, int64_t b, int8_t *scratch)
{
    if (b % BCNP_AMX_CHUNK == 0)
        bcnp_amx_unpack_q4_0(q4, nb, b, nb - b < BCNP_AMX_CHUNK ? nb - b : BCNP_AMX_CHUNK, scratch);
    return scratch + 32 * (b % BCNP_AMX_CHUNK);
}

/* 16 rows (Q8_0 codes at q8, row stride 32 nb; or Q4_0 at q4) against x (planes = 2: int16, 1: int8): out[P * r + t].
   A software pipeline three pairs deep, because a tile store takes as long as the products and the vector loads
   after it wait for it: step p multiplies pair p (A tiles and C tiles alternate between even and odd pairs, so that
   pair p + 1 need not wait for pair p), stores pair p - 1's C tiles and adds up pair p - 2. */
static inline __attribute__((always_inline))
void bcnp_amx_group(const int8_t *q8, const uint8_t *q4, const uint16_t *d, int64_t nb, const bcnp_amx_tokens *x,
                    const int P, const int planes, const char *next, float *dw, int8_t *scratch, int8_t *tail,
                    int32_t *cbuf, float *out)
{
    const int64_t pairs = (nb + 1) / 2;
    /* The next group's 16 rows are fetched into L2 while this group computes.  Q8_0: in the order that group will
       read them, at step p the line each of its rows needs at its step p; fetching the rows as one contiguous run
       instead, a slice per step in address order (the first choice), left 8 tokens at 149-162 ns a step from memory,
       one thread, against 115-123 this way (88 from L2); the int8 lm_head at 8 tokens, 2 threads, 31.5-34.0 ms
       against 34.6-37.0.  Q4_0 (half the bytes a step) keeps the contiguous run: 5-9% faster than the interleaved
       order for the 10 int4 linears of 2 13B layers at 8 and 16 tokens.  Reading this group's rows as the tiles need
       them without either (16 streams, a block at a time) ran at 3.4 GB/s from memory in the engine. */
    const int64_t row_bytes = 32 * nb, ahead = next && !q8 ? 16 * 16 * nb : 0;
    const int64_t slice = (ahead / pairs + 63) / 64 * 64;
    __m512 acc[BCNP_AMX_TOKENS];
    for (int v = 0; v < P; v++) acc[v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs + 2; p++) {
        if (p < pairs) {
            const int64_t b = 2 * p;
            if (b % 16 == 0) bcnp_group_scales(d, nb, b, nb - b < 16 ? nb - b : 16, dw + 16 * (b % 32));
            const int8_t *a;
            int64_t stride;
            if (next && q8)
                for (int r = 0; r < 16; r++) _mm_prefetch(next + r * row_bytes + 64 * p, _MM_HINT_T1);
            for (int64_t l = p * slice; l < (p + 1) * slice && l < ahead; l += 64)
                _mm_prefetch(next + l, _MM_HINT_T1);
            if (q8) {
                if (b + 1 < nb) {
                    a = q8 + 32 * b, stride = 32 * nb;
                } else {                            /* the last block alone: its 32 bytes, and zeros past the row */
                    for (int r = 0; r < 16; r++) memcpy(tail + 64 * r, q8 + r * 32 * nb + 32 * b, 32);
                    a = tail, stride = 64;
                }
            } else
                a = bcnp_amx_codes(q4, nb, b, scratch), stride = 32 * BCNP_AMX_CHUNK;
            BCNP_AMX_MULTIPLY(p, x->tiles + BCNP_AMX_PAIR_BYTES * p,
                              x->tiles + BCNP_AMX_PAIR_BYTES * p + BCNP_AMX_PAIR_BYTES / 2, a, stride, 64);
        }
        if (p >= 1 && p <= pairs)                   /* pair p - 1's sums to memory */
            BCNP_AMX_STORE(p - 1, cbuf + 512 * ((p - 1) % 3), 8 * P, 32 * P);
        if (p >= 2) {                               /* pair p - 2, stored last time round */
            const int64_t k = 2 * (p - 2);
            BCNP_AMX_FINISH(cbuf + 512 * ((p - 2) % 3), k, k + 1 < nb);
        }
    }
    for (int v = 0; v < P; v++) _mm512_storeu_ps(out + 16 * v, acc[v]);
}

/* 5 to 16 tokens, one block per instruction (N = 8 or 16 columns): A = 16 weight rows x the 32 codes of block b
   (colsb 32), B = the 8 groups of 4 bytes of block b of the N tokens (8 rows x 4N bytes, padded tokens zero),
   C = 16 rows x N tokens.  N = 16: C's row r is row r's accumulator as it stands, the scale the tokens' dx for the
   block (one vector) times row r's d (a broadcast); N = 8: two C rows of 8 are one accumulator (rows 2v, 2v + 1),
   the scale a permute of the 16 rows' d times the block's dx.  No lane moves of the sums either way (the pairs of
   bcnp_amx_group need two per 16 outputs).  The same three-step pipeline as bcnp_amx_group, a block a step. */
static inline __attribute__((always_inline))
void bcnp_amx_blocks(const int8_t *q8, const uint8_t *q4, const uint16_t *d, int64_t nb, const bcnp_amx_tokens *x,
                      const int planes, const int N, const char *next, float *dw, int8_t *scratch, int32_t *cbuf,
                      float *out)
{
    const int64_t row_bytes = 32 * nb, ahead = next && !q8 ? 16 * 16 * nb : 0;   /* as in bcnp_amx_group */
    const int64_t slice = (ahead / nb + 63) / 64 * 64;
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < nb + 2; p++) {
        if (p < nb) {
            const int64_t b = p;
            if (b % 16 == 0) bcnp_group_scales(d, nb, b, nb - b < 16 ? nb - b : 16, dw + 16 * (b % 32));
            if (next && q8 && (b & 1) == 0)
                for (int r = 0; r < 16; r++) _mm_prefetch(next + r * row_bytes + 32 * b, _MM_HINT_T1);
            for (int64_t l = p * slice; l < (p + 1) * slice && l < ahead; l += 64)
                _mm_prefetch(next + l, _MM_HINT_T1);
            const int8_t *a;
            int64_t stride;
            if (q8)
                a = q8 + 32 * b, stride = 32 * nb;
            else
                a = bcnp_amx_codes(q4, nb, b, scratch), stride = 32 * BCNP_AMX_CHUNK;
            BCNP_AMX_MULTIPLY(p, x->tiles + 32 * N * planes * b, x->tiles + 32 * N * planes * b + 32 * N, a, stride, 4 * N);
        }
        if (p >= 1 && p <= nb)                      /* block p - 1's sums to memory */
            BCNP_AMX_STORE(p - 1, cbuf + 512 * ((p - 1) % 3), 4 * N, 16 * N);
        if (p >= 2) {                               /* block p - 2, stored last time round */
            const int64_t k = p - 2;
            const int32_t *c = cbuf + 512 * (k % 3);
            const __m512 dxv = _mm512_load_ps(x->dxp + 16 * k);
            const float *dk = dw + 16 * (k % 32);
            if (N == 16)
                for (int r = 0; r < 16; r++) {
                    const __m512i s = planes == 2 ? _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c + 16 * r), 8),
                                                                     _mm512_load_si512(c + 256 + 16 * r))
                                                  : _mm512_load_si512(c + 16 * r);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(_mm512_set1_ps(dk[r]), dxv), acc[r]);
                }
            else {
                const __m512 dwk = _mm512_load_ps(dk);
                for (int v = 0; v < 8; v++) {
                    const __m512i s = planes == 2 ? _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c + 16 * v), 8),
                                                                     _mm512_load_si512(c + 128 + 16 * v))
                                                  : _mm512_load_si512(c + 16 * v);
                    const __m512i rows = _mm512_load_si512(x->ridx + 16 * v);
                    acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(_mm512_permutexvar_ps(rows, dwk), dxv), acc[v]);
                }
            }
        }
    }
    for (int r = 0; r < 16; r++) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

/* Row groups g0 .. g1 - 1 (16 rows each, from row 16 g0 of the weight) against `chunks` sets of up to 16 tokens,
   xs[0 .. chunks - 1], set c's at rows 16 c of y: y[(16 c + t) * ys + r], one thread.  Each set's x->P = 1, 2, 4:
   two blocks an instruction (bcnp_amx_group); 8 or 16: one block (bcnp_amx_blocks).  q8 is NULL for Q4_0 weights
   (then q4 holds them).  A group takes the sets in turn, so its rows come from memory for the first (which also
   fetches the next group's) and from L2 for the others: each 16 tokens used to stream the whole weight again (the
   10 int4 linears of 2 13B layers, 2 threads: 17 tokens 55 ms against 34 at 16, 32 tokens 67). */
static void bcnp_amx_rows(const int8_t *q8, const uint8_t *q4, const uint16_t *d, int64_t nb, int64_t g0, int64_t g1,
                          const bcnp_amx_tokens *xs, int chunks, float *y, int64_t ys)
{
    float *dw = (float *)aligned_alloc(64, 32 * 16 * sizeof(float));
    int8_t *scratch = (int8_t *)aligned_alloc(64, 16 * 32 * BCNP_AMX_CHUNK + 64);
    int8_t *tail = (int8_t *)aligned_alloc(64, 16 * 64);
    int32_t *cbuf = (int32_t *)aligned_alloc(64, 3 * 512 * sizeof(int32_t));
    float out[16 * 16];
    int configured = 0;
    memset(tail, 0, 16 * 64);
    /* an odd last block's partner in the scratch holds zeros here or an earlier chunk's codes: either way it meets
       the zeros of B's second half */
    memset(scratch, 0, 16 * 32 * BCNP_AMX_CHUNK + 64);
    for (int64_t g = g0; g < g1; g++)
        for (int c = 0; c < chunks; c++) {
            const bcnp_amx_tokens *x = xs + c;
            const int T = x->T, P = x->P, planes = x->planes;
            const int64_t r0 = 16 * g;
            const int8_t *w8 = q8 ? q8 + r0 * 32 * nb : NULL;
            const uint8_t *w4 = q8 ? NULL : q4 + r0 * 16 * nb;
            const char *next = c > 0 || g + 1 >= g1 ? NULL
                               : q8 ? (const char *)(w8 + 16 * 32 * nb) : (const char *)(w4 + 16 * 16 * nb);
            float *yc = y + 16 * (int64_t)c * ys;
            if (P != configured) {          /* only a last, shorter set differs */
                bcnp_amx_configure(P);
                configured = P;
            }
#define BCNP_AMX_GROUP(P, planes) \
    bcnp_amx_group(w8, w4, d + r0 * nb, nb, x, P, planes, next, dw, scratch, tail, cbuf, out)
#define BCNP_AMX_BLOCKS(N, planes) bcnp_amx_blocks(w8, w4, d + r0 * nb, nb, x, planes, N, next, dw, scratch, cbuf, out)
            switch (P + planes * 32) {      /* each (P, planes) a function of its own: the loops unroll */
            case 1 + 64: BCNP_AMX_GROUP(1, 2); break;
            case 2 + 64: BCNP_AMX_GROUP(2, 2); break;
            case 4 + 64: BCNP_AMX_GROUP(4, 2); break;
            case 8 + 64: BCNP_AMX_BLOCKS(8, 2); break;
            case 16 + 64: BCNP_AMX_BLOCKS(16, 2); break;
            case 1 + 32: BCNP_AMX_GROUP(1, 1); break;
            case 2 + 32: BCNP_AMX_GROUP(2, 1); break;
            case 4 + 32: BCNP_AMX_GROUP(4, 1); break;
            case 8 + 32: BCNP_AMX_BLOCKS(8, 1); break;
            default: BCNP_AMX_BLOCKS(16, 1); break;
            }
#undef BCNP_AMX_GROUP
#undef BCNP_AMX_BLOCKS
            for (int i = 0; i < 16 * P; i++)    /* out[i]: row i / P, token i % P */
                if (i % P < T) yc[(i % P) * ys + r0 + i / P] = out[i];
        }
    if (configured) _tile_release();
    free(dw);
    free(scratch);
    free(tail);
    free(cbuf);
}

/* The B tiles and lane tables of T <= 8 tokens (xq, dx as bcnp_quantize_activation, natural layout, token t at
   xq + t n, dx + t nb), padded to P: for block b = 2 p + h (h = 0, 1) and token t, byte e (planes = 2, Q8_0's int16
   activation: 0 the high one, signed, 1 the low, unsigned; planes = 1, Q4_0's int8 activation: e = 0, the value)
   of x[t][32 b + 4 g + i] is at tiles[2048 p + 1024 e + 64 (8 h + g) + 4 (h P + t) + i]; everything else is zero.
   `tiles` holds (nb + 1) / 2 x 2048 bytes. */
static void bcnp_amx_prepare(const int16_t *xq, const float *dx, int64_t n, int T, int planes, uint8_t *tiles,
                             float *dxp, int32_t *ridx, int32_t *pick)
{
    const int64_t nb = n / 32;
    const int P = bcnp_amx_padded(T);
    const __m256i rows = _mm256_set_epi32(112, 96, 80, 64, 48, 32, 16, 0);   /* 64-byte rows, in int32 */
    memset(tiles, 0, (size_t)((nb + 1) / 2) * BCNP_AMX_PAIR_BYTES);
    for (int t = 0; t < T; t++)
        for (int64_t b = 0; b < nb; b++) {
            const __m512i v = _mm512_loadu_si512(xq + t * n + 32 * b);
            const int h = (int)(b & 1);
            uint8_t *tile = tiles + BCNP_AMX_PAIR_BYTES * (b / 2) + 64 * 8 * h + 4 * (h * P + t);
            if (planes == 2) {
                _mm256_i32scatter_epi32(tile, rows, _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)), 4);
                _mm256_i32scatter_epi32(tile + 1024, rows, _mm512_cvtepi16_epi8(v), 4);
            } else
                _mm256_i32scatter_epi32(tile, rows, _mm512_cvtepi16_epi8(v), 4);      /* |x| <= 127: exact */
        }
    for (int v = 0; v < P; v++)
        for (int j = 0; j < 16; j++) ridx[16 * v + j] = (16 * v + j) / P;
    /* output lane j of a vector: row j / P of the vector's rows, token j % P; in the two C vectors (32 lanes, rows
       of 2P: P sums of block b, then P of block b + 1) block b's is at 2P (j / P) + j % P */
    for (int j = 0; j < 16; j++) {
        pick[j] = 2 * P * (j / P) + j % P;
        pick[16 + j] = pick[j] + P;
    }
    for (int64_t b = 0; b < nb; b++)           /* lane 16 P b + P r + t: token t (no division: it was 60% of this) */
        for (int t = 0; t < P; t++) {
            const float v = t < T ? dx[t * nb + b] : 0.0f;
            for (int r = 0; r < 16; r++) dxp[16 * P * b + P * r + t] = v;
        }
}
/* The B tiles and scales of T <= N tokens (N = 8 or 16) for bcnp_amx_blocks (xq, dx as for bcnp_amx_prepare): byte
   e of x[t][32 b + 4 g + i] at tiles[32 N (planes b + e) + 4 N g + 4 t + i], padded tokens zero; dxp[16 b + j] = dx
   of token j % N for block b (0 for padding); ridx (128) the row pair's lanes of N = 8.  `tiles` holds
   planes x nb x 32 N bytes. */
static void bcnp_amx_prepare_blocks(const int16_t *xq, const float *dx, int64_t n, int T, int planes, uint8_t *tiles,
                               float *dxp, int N, int32_t *ridx)
{
    const int64_t nb = n / 32;
    const __m256i rows = N == 16 ? _mm256_set_epi32(112, 96, 80, 64, 48, 32, 16, 0) : _mm256_set_epi32(56, 48, 40, 32, 24, 16, 8, 0);
    if (T < N) memset(tiles, 0, (size_t)(planes * nb * 32 * N));
    for (int t = 0; t < T; t++)
        for (int64_t b = 0; b < nb; b++) {
            const __m512i v = _mm512_loadu_si512(xq + t * n + 32 * b);
            uint8_t *tile = tiles + 32 * N * planes * b + 4 * t;
            if (planes == 2) {
                _mm256_i32scatter_epi32(tile, rows, _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)), 4);
                _mm256_i32scatter_epi32(tile + 32 * N, rows, _mm512_cvtepi16_epi8(v), 4);
            } else
                _mm256_i32scatter_epi32(tile, rows, _mm512_cvtepi16_epi8(v), 4);
        }
    for (int64_t b = 0; b < nb; b++)
        for (int i = 0; i < 16; i++) dxp[16 * b + i] = i % N < T ? dx[(i % N) * nb + b] : 0.0f;
    for (int i = 0; i < 128; i++) ridx[i] = i / 8;
}
#else
#define BCNP_AMX_BUILT 0
static int bcnp_amx_enable(void) { return 0; }
static void bcnp_amx_rows(const int8_t *q8, const uint8_t *q4, const uint16_t *d, int64_t nb, int64_t g0, int64_t g1,
                          const bcnp_amx_tokens *xs, int chunks, float *y, int64_t ys) {}
static void bcnp_amx_prepare(const int16_t *xq, const float *dx, int64_t n, int T, int planes, uint8_t *tiles,
                             float *dxp, int32_t *ridx, int32_t *pick) {}
static void bcnp_amx_prepare_blocks(const int16_t *xq, const float *dx, int64_t n, int T, int planes, uint8_t *tiles,
                               float *dxp, int N, int32_t *ridx) {}
#endif

#endif
