/* Batched decode kernels for bcnp._quant: Y = X W^T for a few tokens at once (X (T, n), T <= ~16), each weight row
 * read from memory once for all T tokens.
 *
 * Every token's activation is quantized exactly as for the single-vector matvec (bcnp_quantize_activation, int16 per
 * block of 32), and every token's row sum is formed by the same operations in the same order as bcnp_dot_q8_0 /
 * bcnp_dot_q4_0: the same 16-lane integer partial sums per block, the same float32 scale products, the same
 * accumulator (even / odd step) and the same final reduction.  So row t of the result equals the matvec of x_t bit
 * for bit: a sequence's logits do not depend on which other sequences share its step.
 *
 * AVX-512 VNNI: a block of weights is loaded (and, for Q4_0, unpacked) once and dotted with up to BCNP_TOKENS
 * tokens' blocks held in L1/L2; each token keeps its own two accumulators.  Other builds run the single-vector kernel
 * once per token on the same row, which stays in L1 between tokens, so the weights still come from memory once.
 */
#ifndef BCNP_QUANT_BATCH_H
#define BCNP_QUANT_BATCH_H

#include "quant_kernels.h"

/* Tokens per pass over a weight row: two float accumulators each take 16 of the 32 vector registers, leaving room
   for the (unpacked) weights; more tokens go in further passes over the row, which is then in L1. */
#define BCNP_TOKENS 8

/* Where token t's quantized activation lives: xq + t * xs (n int16, 64-byte aligned), dx + t * ds (n/32 floats),
   bias + t * bs (Q4_0 only). */
typedef struct {
    const int16_t *xq;
    const float *dx;
    const int32_t *bias;
    int64_t xs, ds, bs;
} bcnp_tokens;

#if defined(BCNP_AVX512)
#define BCNP_INLINE static inline __attribute__((always_inline))

/* One Q8_0 block (index b, step k of its chunk of 16, scales s[t][k]) into the accumulators acc[t]. */
#define BCNP_Q8_STEP(acc, k)                                                                                        \
    do {                                                                                                            \
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + 32 * (b + (k)))));        \
        for (int t = 0; t < nt; t++) {                                                                              \
            const __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv,                                     \
                                                    _mm512_load_si512(x.xq + t * x.xs + 32 * (b + (k))));            \
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(s[t][k]), acc[t]);                     \
        }                                                                                                           \
    } while (0)

/* bcnp_dot_q8_0 for nt tokens: y[t * ys] = row . x_t */
BCNP_INLINE void bcnp_dot_q8_0_tokens(const int8_t *w, const uint16_t *d, bcnp_tokens x, int64_t nb, const int nt,
                                      float *y, int64_t ys)
{
    __m512 acc0[BCNP_TOKENS], acc1[BCNP_TOKENS];
    for (int t = 0; t < nt; t++) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ) {
        const int64_t count = nb - b < 16 ? nb - b : 16;
        float s[BCNP_TOKENS][16];
        int64_t k = 0;
        for (int t = 0; t < nt; t++)
            _mm512_storeu_ps(s[t], bcnp_block_scales16(d + b, x.dx + t * x.ds + b, count));
        for (; k + 2 <= count; k += 2) {           /* even steps into acc0, odd into acc1, as bcnp_dot_q8_0 */
            _mm_prefetch((const char *)(w + 32 * (b + k) + 1024), _MM_HINT_T0);
            BCNP_Q8_STEP(acc0, k);
            BCNP_Q8_STEP(acc1, k + 1);
        }
        if (k < count) BCNP_Q8_STEP(acc0, k);
        b += count;
    }
    for (int t = 0; t < nt; t++)
        y[t * ys] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
}

/* One group of four Q4_0 blocks (b + p .. b + p + 3) into the accumulators acc[t]. */
#define BCNP_Q4_STEP(acc, p)                                                                                        \
    do {                                                                                                            \
        const __m512i wv = _mm512_loadu_si512(w + 16 * (b + (p)));                                                  \
        const __m512i c0 = _mm512_and_si512(wv, nibble), c1 = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nibble);   \
        const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(wv, 8), nibble), c3 = _mm512_srli_epi16(wv, 12);      \
        const __m512i at = _mm512_add_epi32(quarter, _mm512_set1_epi32((int)(p)));                                  \
        for (int t = 0; t < nt; t++) {                                                                              \
            const int16_t *xg = x.xq + t * x.xs + 32 * (b + (p));                                                   \
            __m512i dot = _mm512_loadu_si512(x.bias + t * x.bs + 4 * (b + (p)));                                    \
            dot = _mm512_dpwssd_epi32(dot, c0, _mm512_load_si512(xg));                                              \
            dot = _mm512_dpwssd_epi32(dot, c1, _mm512_load_si512(xg + 32));                                         \
            dot = _mm512_dpwssd_epi32(dot, c2, _mm512_load_si512(xg + 64));                                         \
            dot = _mm512_dpwssd_epi32(dot, c3, _mm512_load_si512(xg + 96));                                         \
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(at, _mm512_loadu_ps(s[t])),    \
                                     acc[t]);                                                                       \
        }                                                                                                           \
    } while (0)

/* Blocks b .. end - 1 of one row for nt tokens (end a multiple of 16, or nb), their accumulators kept in st between
   calls (st[2t] the even groups', st[2t + 1] the odd ones'): called chunk after chunk along the row, this is
   bcnp_dot_q4_0's loop for each token, step for step. Returns the first block it did not take (the tail's). */
BCNP_INLINE int64_t bcnp_chunk_q4_0_tokens(const uint8_t *w, const uint16_t *d, bcnp_tokens x, int64_t b, int64_t end,
                                           int64_t nb, const int nt, __m512 *st)
{
    __m512 acc0[BCNP_TOKENS], acc1[BCNP_TOKENS];
    const __m512i nibble = _mm512_set1_epi16(0x0F);
    const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int t = 0; t < nt; t++) {
        acc0[t] = st[2 * t];
        acc1[t] = st[2 * t + 1];
    }
    while (b < end && nb - b >= 4) {
        const int64_t count = nb - b < 16 ? nb - b : 16;
        float s[BCNP_TOKENS][16];
        int64_t p = 0;
        for (int t = 0; t < nt; t++)
            _mm512_storeu_ps(s[t], bcnp_block_scales16(d + b, x.dx + t * x.ds + b, count));
        for (; p + 8 <= count; p += 8) {           /* groups alternate between acc0 and acc1, as bcnp_dot_q4_0 */
            _mm_prefetch((const char *)(w + 16 * (b + p) + 1024), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + 16 * (b + p) + 1088), _MM_HINT_T0);
            BCNP_Q4_STEP(acc0, p);
            BCNP_Q4_STEP(acc1, p + 4);
        }
        if (p + 4 <= count) {
            BCNP_Q4_STEP(acc0, p);
            p += 4;
        }
        b += p;
    }
    for (int t = 0; t < nt; t++) {
        st[2 * t] = acc0[t];
        st[2 * t + 1] = acc1[t];
    }
    return b;
}

/* The token count as a compile-time constant, so that the accumulator arrays live in registers. */
#define BCNP_FOR_TOKEN_COUNT(nt, call)                                                                              \
    switch (nt) {                                                                                                   \
    case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; case 4: call(4); break;                 \
    case 5: call(5); break; case 6: call(6); break; case 7: call(7); break; default: call(8); break;                \
    }
#endif

static inline bcnp_tokens bcnp_tokens_from(bcnp_tokens x, int64_t t)
{
    x.xq += t * x.xs;
    x.dx += t * x.ds;
    if (x.bias) x.bias += t * x.bs;
    return x;
}

/* One weight row against T tokens: y[t * ys] = row . x_t, t < T. */
static void bcnp_row_q8_0_tokens(const int8_t *w, const uint16_t *d, bcnp_tokens x, int64_t nb, int64_t T,
                                 float *y, int64_t ys)
{
    for (int64_t t0 = 0; t0 < T; t0 += BCNP_TOKENS) {
        const bcnp_tokens xt = bcnp_tokens_from(x, t0);
        const int nt = T - t0 < BCNP_TOKENS ? (int)(T - t0) : BCNP_TOKENS;
#if defined(BCNP_AVX512)
#define BCNP_CALL(n) bcnp_dot_q8_0_tokens(w, d, xt, nb, n, y + t0 * ys, ys)
        BCNP_FOR_TOKEN_COUNT(nt, BCNP_CALL)
#undef BCNP_CALL
#else
        for (int t = 0; t < nt; t++)
            y[(t0 + t) * ys] = bcnp_dot_q8_0(w, d, xt.xq + t * xt.xs, xt.dx + t * xt.ds, nb);
#endif
    }
}

/* Q4_0 rows r < R (R <= BCNP_TILE, row r at w + 16 r nb) against T tokens: y[t * ys + r] = row r . x_t, each equal to
 * bcnp_dot_q4_0 of that row and token bit for bit.
 *
 * A whole row against 8 tokens reads their 80 kB (at 5120 columns) of int16 activations from L2 for every row;
 * here the rows of a tile go through the columns in chunks of BCNP_CHUNK blocks, so a chunk of the 8 tokens'
 * activations (16 kB + 4 kB of block sums) is read once per tile and stays in L1 while the tile's rows meet it,
 * each row's accumulators waiting in `st` between chunks.  Measured at 27392 x 5120, 8 tokens, one thread (a C
 * harness, thread CPU time on a busy machine): 0.72-0.78 ns per token and block against 0.81-0.95 row by row,
 * 10-18% less.  (Q8_0 rows went the other way, 1.03 against 0.78: they stay whole.) */
#define BCNP_TILE 8
#define BCNP_CHUNK 32

static void bcnp_tile_q4_0_tokens(const uint8_t *w, const uint16_t *d, int64_t nb, int64_t R, bcnp_tokens x,
                                  int64_t T, float *y, int64_t ys)
{
#if defined(BCNP_AVX512)
    __m512 st[BCNP_TILE][2 * BCNP_TOKENS];
    for (int64_t t0 = 0; t0 < T; t0 += BCNP_TOKENS) {
        const bcnp_tokens xt = bcnp_tokens_from(x, t0);
        const int nt = T - t0 < BCNP_TOKENS ? (int)(T - t0) : BCNP_TOKENS;
        int64_t tail = 0;
        for (int64_t r = 0; r < R; r++)
            for (int j = 0; j < 2 * BCNP_TOKENS; j++) st[r][j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < nb; c += BCNP_CHUNK) {
            const int64_t end = nb - c < BCNP_CHUNK ? nb : c + BCNP_CHUNK;
            for (int64_t r = 0; r < R; r++) {
#define BCNP_CALL(n) tail = bcnp_chunk_q4_0_tokens(w + r * 16 * nb, d + r * nb, xt, c, end, nb, n, st[r])
                BCNP_FOR_TOKEN_COUNT(nt, BCNP_CALL)
#undef BCNP_CALL
            }
        }
        for (int64_t r = 0; r < R; r++)
            for (int t = 0; t < nt; t++)
                y[(t0 + t) * ys + r] = bcnp_dot_q4_0_tail(w + r * 16 * nb, d + r * nb, xt.xq + t * xt.xs,
                                                          xt.dx + t * xt.ds, tail, nb,
                                                          _mm512_reduce_add_ps(_mm512_add_ps(st[r][2 * t],
                                                                                             st[r][2 * t + 1])));
    }
#else
    for (int64_t r = 0; r < R; r++)
        for (int64_t t = 0; t < T; t++)
            y[t * ys + r] = bcnp_dot_q4_0(w + r * 16 * nb, d + r * nb, x.xq + t * x.xs, x.dx + t * x.ds,
                                          x.bias + t * x.bs, nb);
#endif
}

/* ---- the Q8_0 matvec, four rows at a time ---------------------------------------------------------------------
 * One row streamed at a time leaves memory idle: on this machine's cores (Xeon, Emerald Rapids) bcnp_dot_q8_0 row
 * by row read 10 GB/s per core, where four rows in flight together -- four streams, each block of x loaded once for
 * all of them -- read 13-14 GB/s (27392 x 5120 Q8_0, one thread: 1.37x in a C harness, 1.14-1.30x through
 * matvec_q8_0 against matmul_q8_0 at T = 1 on a busy machine).  Each row's sum is formed by the same operations in
 * the same order as bcnp_dot_q8_0, so the result is that function's bit for bit.  Q4_0 does not
 * gain (its single-row kernel does twice the arithmetic per byte): it stays one row at a time. */
#define BCNP_ROWS 4

#if defined(BCNP_AVX512)
BCNP_INLINE void bcnp_rows_q8_0_n(const int8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb,
                                  const int R, float *y)
{
    __m512 acc0[BCNP_ROWS], acc1[BCNP_ROWS];
    for (int r = 0; r < R; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ) {
        const int64_t count = nb - b < 16 ? nb - b : 16;
        float s[BCNP_ROWS][16];
        for (int r = 0; r < R; r++) _mm512_storeu_ps(s[r], bcnp_block_scales16(d + r * nb + b, dx + b, count));
        for (int64_t k = 0; k < count; k++, b++) {
            const __m512i xv = _mm512_loadu_si512(xq + 32 * b);
            for (int r = 0; r < R; r++) {
                const int8_t *wr = w + r * 32 * nb + 32 * b;
                if (k & 1) _mm_prefetch((const char *)(wr + 1024), _MM_HINT_T0);
                const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)wr));
                const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), wv, xv));
                if (k & 1) acc1[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(s[r][k]), acc1[r]);
                else acc0[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(s[r][k]), acc0[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}
#endif

/* y[r] = row r of W . x for the R <= BCNP_ROWS consecutive rows at w (row r at w + 32 r nb, its scales at d + r nb). */
static void bcnp_rows_q8_0(const int8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb,
                           int64_t R, float *y)
{
#if defined(BCNP_AVX512)
    switch (R) {
    case 1: bcnp_rows_q8_0_n(w, d, xq, dx, nb, 1, y); break;
    case 2: bcnp_rows_q8_0_n(w, d, xq, dx, nb, 2, y); break;
    case 3: bcnp_rows_q8_0_n(w, d, xq, dx, nb, 3, y); break;
    default: bcnp_rows_q8_0_n(w, d, xq, dx, nb, BCNP_ROWS, y); break;
    }
#else
    for (int64_t r = 0; r < R; r++) y[r] = bcnp_dot_q8_0(w + r * 32 * nb, d + r * nb, xq, dx, nb);
#endif
}

#endif
