/* A few tokens at once without AMX (AVX-512 VNNI; AVX2 below, for prompts): y[t][r] for 16 rows of Q8_0 / Q4_0
 * weights and T <= 16 tokens, with the GEMM's sums (bcnp_gemm_q8_0_scalar): every (row, token, block) gets its
 * exact integer block sum, and
 *   y[t, r] = sum over blocks b, in order, of  float(isum) * (d[r, b] * dx[t, b])        (float32, one accumulator)
 * -- the bits of the group matvec, the AMX kernel and the prefill GEMM, so a sequence's logits do not depend on
 * what shares its step.
 *
 * Why another kernel: the group matvec (quant_group.h) ends every block with sixteen rows' partial sums spread over
 * the lanes of sixteen vectors and adds them across lanes -- for every token.  Here the sixteen rows' weights are
 * transposed once, in registers, so that one vector holds the same four codes (Q4_0) or the same int16 pair (Q8_0)
 * of a block for the sixteen rows, one row a lane; a product with one token's matching x broadcast from memory then
 * adds into the sixteen rows' block sums directly, and nothing is added across lanes.  The transpose is paid once
 * per group of rows for all T tokens, as the prefill GEMM pays its packing (quant_gemm.h), but without writing a
 * panel to memory and reading it back: a batch of a few tokens is too small to repay that.
 *
 * The tokens' x from bcnp_quantize_activation's natural order (q4_layout = 0), token t at t n: Q8_0 int16 x with
 * the middle two of every four swapped (bcnp_tokens_x16); int8 x (bcnp_tokens_x8) for Q4_0, and for Q8_0 where x
 * is rounded to int8 (an int4 model's lm_head), with bias[t nb + b] = -offset * (the sum of token t's block b):
 * vpdpbusd multiplies unsigned bytes by signed ones, so the codes go in as unsigned c = q + offset (Q4_0's own
 * codes, offset 8; Q8_0's codes with the top bit flipped, offset 128) and sum c x + bias = sum q x exactly.
 */
#ifndef BCNP_QUANT_TOKENS_H
#define BCNP_QUANT_TOKENS_H

#include "quant_group.h"

#define BCNP_TOKENS_MAX 16
/* Tokens whose products are interleaved: each token's block sum is a chain of 16 (Q8_0) or 8 (Q4_0) dependent
   products, so four chains at a time keep the multiplier busy.  Eight were 2-16% slower in 10 of 12 cases (one
   core, rows in L2, 4, 8 and 16 tokens, int4 and int8, two alternated rounds; int8 at 4 tokens 3% faster).  The unrolled copies matter: with the token count a run-time loop bound, GCC kept
   the sums in memory and Q8_0 ran at a third of the speed. */
#define BCNP_TOKENS_STEP 4
/* Each token's block sum is also split over two chains (products 0-3 and 4-7 of Q4_0, 0-7 and 8-15 of Q8_0),
   added at the end: the same integers, half the chain to wait for.  An Intel Xeon (family 6 model 207),
   alternated, best of 300 in L2 on one core / best of 24 from memory on 2 threads (one 13696 x 5120 int4
   weight, 12 copies in turn): int4 8 tokens 0.066 / 2.20 ms against 0.070-0.072 / 2.24 in one chain, 16 tokens
   0.104 / 3.24 against 0.113 / 3.38; int8 (int16 x) 8 tokens in L2 0.117-0.122 against 0.135.  Through
   bcnp._quant.matmul_q4_0 from memory, three alternated rounds, 8 tokens 2.53-2.60 against 2.70-2.75 ms, 16
   tokens 3.91-4.02 against 4.05-4.33; the engine's step of 8 sequences (2 layers, best of 20) 35.3 and 32.4 ms
   against 41.3 and 43.1, a 128-token prompt 460 and 469 ms against 498 and 536. */

/* int8 x for this kernel: int16 natural x (|x| <= 127) as int8, and the blocks' biases for codes stored as
   q + offset (8 for Q4_0, 128 for Q8_0). */
static void bcnp_tokens_x8(const int16_t *xq, int64_t n, int offset, int8_t *x8, int32_t *bias)
{
    for (int64_t b = 0; b < n / 32; b++) {
        int32_t s = 0;
        for (int j = 0; j < 32; j++) {
            x8[32 * b + j] = (int8_t)xq[32 * b + j];
            s += xq[32 * b + j];
        }
        bias[b] = -offset * s;
    }
}

/* Q8_0's x for this kernel: int16 natural x with the middle two of every four swapped (x0, x2, x1, x3, ...), the
   order in which the kernel pairs a row's codes. */
static void bcnp_tokens_x16(const int16_t *xq, int64_t n, int16_t *x16)
{
    for (int64_t i = 0; i < n; i += 4) {
        x16[i] = xq[i];
        x16[i + 1] = xq[i + 2];
        x16[i + 2] = xq[i + 1];
        x16[i + 3] = xq[i + 3];
    }
}

#if defined(BCNP_AVX512)
#define BCNP_TOKENS 1

/* One block's float step for tokens t0 .. t0 + NT - 1: f[t] += float(s[t]) * (dw * dx[t, b]). */
static inline __attribute__((always_inline))
void bcnp_tokens_scale(__m512 *f, const __m512i *s, const float *dw, const float *dx, int64_t nb, int64_t b, const int NT)
{
    const __m512 scale = _mm512_load_ps(dw);
    for (int t = 0; t < NT; t++)
        f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), _mm512_mul_ps(scale, _mm512_set1_ps(dx[t * nb + b])), f[t]);
}

/* Q8_0 block b for tokens t0 .. t0 + NT - 1: v[2i] lane r holds row r's codes 4i and 4i + 2 as an int16 pair,
   v[2i + 1] codes 4i + 1 and 4i + 3, and xq is in that order (bcnp_tokens_x16). */
static inline __attribute__((always_inline))
void bcnp_tokens_block_q8_0(const __m512i *v, const int16_t *xq, const float *dx, int64_t nb, int64_t b,
                            const float *dw, __m512 *f, const int NT)
{
    __m512i s[BCNP_TOKENS_STEP], u[BCNP_TOKENS_STEP];
    for (int t = 0; t < NT; t++) s[t] = u[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int p = 0; p < 8; p++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const int32_t *x = (const int32_t *)(xq + t * 32 * nb + 32 * b);
            s[t] = _mm512_dpwssd_epi32(s[t], v[p], _mm512_set1_epi32(x[p]));
            u[t] = _mm512_dpwssd_epi32(u[t], v[8 + p], _mm512_set1_epi32(x[8 + p]));
        }
    for (int t = 0; t < NT; t++) s[t] = _mm512_add_epi32(s[t], u[t]);
    bcnp_tokens_scale(f, s, dw, dx, nb, b, NT);
}

/* A block b of unsigned codes for tokens t0 .. t0 + NT - 1 against int8 x (bcnp_tokens_x8): c[i] lane r holds
   codes 4i .. 4i + 3 of row r as bytes (code + offset), i < 8. */
static inline __attribute__((always_inline))
void bcnp_tokens_block_bytes(const __m512i *c, const int8_t *x8, const int32_t *bias, const float *dx, int64_t nb,
                             int64_t b, const float *dw, __m512 *f, const int NT)
{
    __m512i s[BCNP_TOKENS_STEP], u[BCNP_TOKENS_STEP];
    for (int t = 0; t < NT; t++) {
        s[t] = _mm512_set1_epi32(bias[t * nb + b]);
        u[t] = _mm512_setzero_si512();
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const int32_t *x = (const int32_t *)(x8 + t * 32 * nb + 32 * b);
            s[t] = _mm512_dpbusd_epi32(s[t], c[i], _mm512_set1_epi32(x[i]));
            u[t] = _mm512_dpbusd_epi32(u[t], c[4 + i], _mm512_set1_epi32(x[4 + i]));
        }
    for (int t = 0; t < NT; t++) s[t] = _mm512_add_epi32(s[t], u[t]);
    bcnp_tokens_scale(f, s, dw, dx, nb, b, NT);
}

/* The tokens BCNP_TOKENS_STEP at a time, the last 1-3 by their own unrolled copy: step(t0, NT). */
#define BCNP_TOKENS_EACH(T, step)                                                                                   \
    do {                                                                                                            \
        int t0_ = 0;                                                                                                \
        for (; t0_ + BCNP_TOKENS_STEP <= (T); t0_ += BCNP_TOKENS_STEP) step(t0_, BCNP_TOKENS_STEP);                 \
        switch ((T) - t0_) {                                                                                        \
        case 3: step(t0_, 3); break;                                                                                \
        case 2: step(t0_, 2); break;                                                                                \
        case 1: step(t0_, 1); break;                                                                                \
        }                                                                                                           \
    } while (0)

/* y[t * ys + r], r < 16, t < T: the 16 Q8_0 rows at w (row stride 32 nb) against T tokens' int16 x in the order
   of bcnp_tokens_x16, or (xq NULL) int8 x and biases for offset 128 (bcnp_tokens_x8).  Two blocks at a time: the
   16 rows' 64 bytes are transposed as bytes (a 16 x 16 transpose of 32-bit words); each word's four codes then
   become two int16 pairs by shifts, or four unsigned bytes by flipping their top bits (half the products). */
static void bcnp_tokens_q8_0(const int8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const int8_t *x8,
                             const int32_t *bias, const float *dx, int T, float *y, int64_t ys, int next)
{
    const char *ahead = (const char *)(w + 16 * 32 * nb), *ahead_d = (const char *)(d + 16 * nb);
    __attribute__((aligned(64))) float dw[16 * 16];
    __m512 f[BCNP_TOKENS_MAX];
    const int64_t n = 32 * nb;
    for (int t = 0; t < T; t++) f[t] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int64_t count = nb - b0 < 16 ? nb - b0 : 16;
        bcnp_group_scales(d, nb, b0, count, dw);
        for (int64_t k = 0; k < count; k += 2) {
            const int64_t b = b0 + k, blocks = count - k < 2 ? 1 : 2;
            const __mmask64 m = blocks == 2 ? ~(__mmask64)0 : ((__mmask64)1 << 32) - 1;
            if (next) bcnp_fetch_next(&ahead, 1024, &ahead_d, 64);
            __m512i raw[16];
            for (int r = 0; r < 16; r++) {
                const int8_t *wr = w + r * n + 32 * b;
                _mm_prefetch((const char *)(wr + BCNP_GROUP_AHEAD), _MM_HINT_T0);
                raw[r] = _mm512_maskz_loadu_epi8(m, wr);
            }
            bcnp_transpose16(raw);                   /* raw[8j + i] lane r: codes 4i .. 4i + 3 of row r's block b + j */
            for (int64_t j = 0; j < blocks; j++) {
                __m512i v[16];
                if (!xq) {
                    for (int i = 0; i < 8; i++) v[i] = _mm512_xor_si512(raw[8 * j + i], _mm512_set1_epi8((char)0x80));
#define BCNP_STEP(t0, NT) bcnp_tokens_block_bytes(v, x8 + (t0) * n, bias + (t0) * nb, dx + (t0) * nb, nb, b + j, \
                                                  dw + 16 * (k + j), f + (t0), NT)
                    BCNP_TOKENS_EACH(T, BCNP_STEP);
#undef BCNP_STEP
                    continue;
                }
                for (int i = 0; i < 8; i++) {
                    v[2 * i] = _mm512_srai_epi16(_mm512_slli_epi16(raw[8 * j + i], 8), 8);
                    v[2 * i + 1] = _mm512_srai_epi16(raw[8 * j + i], 8);
                }
#define BCNP_STEP(t0, NT) bcnp_tokens_block_q8_0(v, xq + (t0) * n, dx + (t0) * nb, nb, b + j, dw + 16 * (k + j), \
                                                 f + (t0), NT)
                BCNP_TOKENS_EACH(T, BCNP_STEP);
#undef BCNP_STEP
            }
        }
    }
    for (int t = 0; t < T; t++) _mm512_storeu_ps(y + t * ys, f[t]);
}

/* y[t * ys + r], r < 16, t < T: the 16 Q4_0 rows at w (row stride 16 nb) against T tokens' int8 x (x8, bias). */
static void bcnp_tokens_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int8_t *x8, const int32_t *bias,
                             const float *dx, int T, float *y, int64_t ys, int next)
{
    const char *ahead = (const char *)(w + 16 * 16 * nb), *ahead_d = (const char *)(d + 16 * nb);
    __attribute__((aligned(64))) float dw[16 * 16];
    __m512 f[BCNP_TOKENS_MAX];
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const int64_t n = 32 * nb;
    for (int t = 0; t < T; t++) f[t] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int64_t count = nb - b0 < 16 ? nb - b0 : 16;
        bcnp_group_scales(d, nb, b0, count, dw);
        for (int64_t k = 0; k < count; k += 4) {      /* four blocks: 64 bytes of each row */
            const int64_t b = b0 + k, blocks = count - k < 4 ? count - k : 4;
            const __mmask64 m = blocks == 4 ? ~(__mmask64)0 : ((__mmask64)1 << (16 * blocks)) - 1;
            if (next) bcnp_fetch_next(&ahead, 1024, &ahead_d, 128);
            __m512i raw[16];
            for (int r = 0; r < 16; r++) {
                const uint8_t *wr = w + r * (n / 2) + 16 * b;
                _mm_prefetch((const char *)(wr + BCNP_GROUP_AHEAD), _MM_HINT_T0);
                raw[r] = _mm512_maskz_loadu_epi8(m, wr);
            }
            bcnp_transpose16(raw);                   /* raw[4j + i] lane r: bytes 4i .. 4i + 3 of row r's block b + j */
            for (int64_t j = 0; j < blocks; j++) {
                __m512i c[8];                        /* codes 4i .. 4i + 3: the low nibbles, then the high */
                for (int i = 0; i < 4; i++) {
                    c[i] = _mm512_and_si512(raw[4 * j + i], nibble);
                    c[4 + i] = _mm512_and_si512(_mm512_srli_epi16(raw[4 * j + i], 4), nibble);
                }
#define BCNP_STEP(t0, NT) bcnp_tokens_block_bytes(c, x8 + (t0) * n, bias + (t0) * nb, dx + (t0) * nb, nb, b + j, \
                                                  dw + 16 * (k + j), f + (t0), NT)
                BCNP_TOKENS_EACH(T, BCNP_STEP);
#undef BCNP_STEP
            }
        }
    }
    for (int t = 0; t < T; t++) _mm512_storeu_ps(y + t * ys, f[t]);
}
#elif defined(BCNP_AVX2)
/* AVX2 (no VNNI): the same idea for 8 rows a vector.  A row's 32 bytes (two Q4_0 blocks, one Q8_0 block) are read
 * as 8 words, and 8 rows' words transposed 8 x 8, so that a vector holds the same four codes of 8 rows, one row a
 * lane.  vpmaddubsw multiplies them as unsigned bytes by a token's four matching int8 x broadcast, into int16
 * pairs: Q4_0's codes (<= 15) against |x| <= 127 make at most 3810 a pair, so a block's 8 products add up in
 * int16 (at most 30480) before one vpmaddwd by ones turns them into the 8 rows' int32 block sums; Q8_0's codes go in
 * as |q| with x given q's sign (vpsignb; at most 32512 a pair), each product widened at once; Q8_0 against int16 x
 * takes int16 pairs of codes by shifts and vpmaddwd, as the AVX-512 kernel does.
 *
 * AVX2 builds use it for prompts only (up to TOKENS_KERNEL_PROMPT tokens, csrc/quant.pyx): its sums are the panel
 * GEMM's, not the lane-wise matvec's that one token and a decode batch share there, and at one token it read memory
 * at 0.7-0.8x of that matvec's speed (8 rows read at once; one 13696 x 5120 int4 weight, 2 threads, on a 2-core
 * Zen 3: 3.2-4.1 ms against 2.4-3.0).  The 5 linears of a 13B layer on that machine, best of 3, against the panel
 * GEMM (the same bits): int4 16 / 32 / 64 / 128 / 512 tokens 90 / 129 / 248 / 493 / 2290 ms against 237 / 227 /
 * 305 / 576 / 2511; int8 with int16 x 113 / 233 / 470 / 833 against 313 / 335 / 442 / 661 (so up to 32 tokens);
 * with int8 x 98 / 194 / 390 / 731 / 2920 against 461 / 428 / 640 / 748 / 2707. */
#define BCNP_TOKENS 1
/* call(NT) with NT the constant equal to count (1 .. 8): one copy of a kernel per token count. */
#define BCNP_BY_COUNT(count, call)                                                                                  \
    do {                                                                                                            \
        switch (count) {                                                                                            \
        case 1: call(1); break;                                                                                     \
        case 2: call(2); break;                                                                                     \
        case 3: call(3); break;                                                                                     \
        case 4: call(4); break;                                                                                     \
        case 5: call(5); break;                                                                                     \
        case 6: call(6); break;                                                                                     \
        case 7: call(7); break;                                                                                     \
        default: call(8); break;                                                                                    \
        }                                                                                                           \
    } while (0)

/* 8 vectors of 8 int32 transposed in place: v[c] lane r <- v[r] lane c. */
static inline __attribute__((always_inline)) void bcnp_transpose8(__m256i v[8])
{
    __m256 a[8], b[8];
    for (int i = 0; i < 4; i++) {
        a[2 * i] = _mm256_unpacklo_ps(_mm256_castsi256_ps(v[2 * i]), _mm256_castsi256_ps(v[2 * i + 1]));
        a[2 * i + 1] = _mm256_unpackhi_ps(_mm256_castsi256_ps(v[2 * i]), _mm256_castsi256_ps(v[2 * i + 1]));
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            b[4 * i + 2 * j] = _mm256_shuffle_ps(a[4 * i + j], a[4 * i + j + 2], 0x44);
            b[4 * i + 2 * j + 1] = _mm256_shuffle_ps(a[4 * i + j], a[4 * i + j + 2], 0xEE);
        }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_castps_si256(_mm256_permute2f128_ps(b[i], b[i + 4], 0x20));
        v[i + 4] = _mm256_castps_si256(_mm256_permute2f128_ps(b[i], b[i + 4], 0x31));
    }
}

/* The scales of 8 rows (d, row stride nb) for blocks b .. b + count - 1 (count <= 8), transposed: dw[8 k + r] =
   d[r][b + k]. */
static inline void bcnp_scales8(const uint16_t *d, int64_t nb, int64_t b, int64_t count, float *dw)
{
    __m256i v[8];
    for (int r = 0; r < 8; r++) {
        const uint16_t *dr = d + r * nb + b;
        uint16_t part[8] = {0};
        if (count < 8) memcpy(part, dr, 2 * (size_t)count);
        v[r] = _mm256_castps_si256(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(count < 8 ? part : dr))));
    }
    bcnp_transpose8(v);
    for (int k = 0; k < 8; k++) _mm256_store_si256((__m256i *)(dw + 8 * k), v[k]);
}

/* 8 rows' 32 bytes at w + offset (row stride `stride` bytes), transposed: raw[i] lane r = word i of row r.  `words`
   < 8: only the first `words` words are read (a row's end). */
static inline __attribute__((always_inline))
void bcnp_load8(const char *w, int64_t stride, int words, __m256i raw[8])
{
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(words), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int r = 0; r < 8; r++) {
        const char *wr = w + r * stride;
        _mm_prefetch(wr + BCNP_GROUP_AHEAD, _MM_HINT_T0);
        raw[r] = words == 8 ? _mm256_loadu_si256((const __m256i *)wr) : _mm256_maskload_epi32((const int *)wr, m);
    }
    bcnp_transpose8(raw);
}

/* y[t * ys + r], r < 8, t < NT <= 8: 8 Q4_0 rows at w (row stride 16 nb) against NT tokens' int8 x (x8, bias).
   One copy per token count (bcnp_tokens8_q4_0): with NT a run-time bound inside the loop GCC kept its counters and
   sums on the stack, and at one token this ran at a third of the lane-wise matvec's speed. */
static inline __attribute__((always_inline))
void bcnp_tokens8_q4_0_n(const uint8_t *w, const uint16_t *d, int64_t nb, const int8_t *x8, const int32_t *bias,
                         const float *dx, float *y, int64_t ys, const int NT)
{
    __attribute__((aligned(32))) float dw[8 * 8];
    __m256 f[8];
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t n = 32 * nb;
    for (int t = 0; t < NT; t++) f[t] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int64_t count = nb - b0 < 8 ? nb - b0 : 8;
        bcnp_scales8(d, nb, b0, count, dw);
        for (int64_t k = 0; k < count; k += 2) {       /* two blocks: 32 bytes of each row */
            const int64_t b = b0 + k, blocks = count - k < 2 ? 1 : 2;
            __m256i raw[8];
            bcnp_load8((const char *)(w + 16 * b), 16 * nb, 4 * (int)blocks, raw);
            for (int64_t j = 0; j < blocks; j++) {
                __m256i c[8];
                for (int i = 0; i < 4; i++) {
                    c[i] = _mm256_and_si256(raw[4 * j + i], nibble);
                    c[4 + i] = _mm256_and_si256(_mm256_srli_epi16(raw[4 * j + i], 4), nibble);
                }
                const __m256 scale = _mm256_load_ps(dw + 8 * (k + j));
                for (int t = 0; t < NT; t++) {
                    const int32_t *xt = (const int32_t *)(x8 + t * n + 32 * (b + j));
                    __m256i s = _mm256_maddubs_epi16(c[0], _mm256_set1_epi32(xt[0]));
                    for (int i = 1; i < 8; i++)
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c[i], _mm256_set1_epi32(xt[i])));
                    const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(s, ones),
                                                         _mm256_set1_epi32(bias[t * nb + b + j]));
                    f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum),
                                           _mm256_mul_ps(scale, _mm256_set1_ps(dx[t * nb + b + j])), f[t]);
                }
            }
        }
    }
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(y + t * ys, f[t]);
}

static void bcnp_tokens8_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int8_t *x8, const int32_t *bias,
                              const float *dx, int T, float *y, int64_t ys)
{
    for (int t0 = 0; t0 < T; t0 += 8) {
        const int8_t *x = x8 + t0 * 32 * nb;
        const int32_t *bs = bias + t0 * nb;
        const float *dxt = dx + t0 * nb;
        float *yt = y + t0 * ys;
#define BCNP_CALL(NT) bcnp_tokens8_q4_0_n(w, d, nb, x, bs, dxt, yt, ys, NT)
        BCNP_BY_COUNT(T - t0 < 8 ? T - t0 : 8, BCNP_CALL);
#undef BCNP_CALL
    }
}

/* y[t * ys + r], r < 8, t < NT <= 8: 8 Q8_0 rows at w (row stride 32 nb) against NT tokens' int16 x (bcnp_tokens_x16's
   order), or (xq NULL) int8 x (x8); one copy per token count, as bcnp_tokens8_q4_0_n. */
static inline __attribute__((always_inline))
void bcnp_tokens8_q8_0_n(const int8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const int8_t *x8,
                         const float *dx, float *y, int64_t ys, const int NT)
{
    __attribute__((aligned(32))) float dw[8 * 8];
    __m256 f[8];
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t n = 32 * nb;
    for (int t = 0; t < NT; t++) f[t] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int64_t count = nb - b0 < 8 ? nb - b0 : 8;
        bcnp_scales8(d, nb, b0, count, dw);
        for (int64_t k = 0; k < count; k++) {
            const int64_t b = b0 + k;
            const __m256 scale = _mm256_load_ps(dw + 8 * k);
            __m256i raw[8];
            bcnp_load8((const char *)(w + 32 * b), 32 * nb, 8, raw);
            if (!xq) {
                __m256i a[8];
                for (int i = 0; i < 8; i++) a[i] = _mm256_abs_epi8(raw[i]);
                for (int t = 0; t < NT; t++) {
                    const int32_t *xt = (const int32_t *)(x8 + t * n + 32 * b);
                    __m256i s = _mm256_setzero_si256();
                    for (int i = 0; i < 8; i++)
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(
                                a[i], _mm256_sign_epi8(_mm256_set1_epi32(xt[i]), raw[i])), ones));
                    f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scale, _mm256_set1_ps(dx[t * nb + b])),
                                           f[t]);
                }
                continue;
            }
            __m256i v[16];
            for (int i = 0; i < 8; i++) {
                v[2 * i] = _mm256_srai_epi16(_mm256_slli_epi16(raw[i], 8), 8);
                v[2 * i + 1] = _mm256_srai_epi16(raw[i], 8);
            }
            for (int t = 0; t < NT; t++) {
                const int32_t *xt = (const int32_t *)(xq + t * n + 32 * b);
                __m256i s = _mm256_madd_epi16(v[0], _mm256_set1_epi32(xt[0]));
                for (int p = 1; p < 16; p++)
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(v[p], _mm256_set1_epi32(xt[p])));
                f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scale, _mm256_set1_ps(dx[t * nb + b])),
                                       f[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(y + t * ys, f[t]);
}

static void bcnp_tokens8_q8_0(const int8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const int8_t *x8,
                              const float *dx, int T, float *y, int64_t ys)
{
    for (int t0 = 0; t0 < T; t0 += 8) {
        const int16_t *x16 = xq ? xq + t0 * 32 * nb : NULL;
        const int8_t *xb = x8 + (xq ? 0 : t0 * 32 * nb);
        const float *dxt = dx + t0 * nb;
        float *yt = y + t0 * ys;
#define BCNP_CALL(NT) bcnp_tokens8_q8_0_n(w, d, nb, x16, xb, dxt, yt, ys, NT)
        BCNP_BY_COUNT(T - t0 < 8 ? T - t0 : 8, BCNP_CALL);
#undef BCNP_CALL
    }
}

/* The entry points of the AVX-512 kernel: 16 rows as two sets of 8 (bias, for Q8_0, and `next` unused). */
static void bcnp_tokens_q8_0(const int8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const int8_t *x8,
                             const int32_t *bias, const float *dx, int T, float *y, int64_t ys, int next)
{
    bcnp_tokens8_q8_0(w, d, nb, xq, x8, dx, T, y, ys);
    bcnp_tokens8_q8_0(w + 8 * 32 * nb, d + 8 * nb, nb, xq, x8, dx, T, y + 8, ys);
}

static void bcnp_tokens_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int8_t *x8, const int32_t *bias,
                             const float *dx, int T, float *y, int64_t ys, int next)
{
    bcnp_tokens8_q4_0(w, d, nb, x8, bias, dx, T, y, ys);
    bcnp_tokens8_q4_0(w + 8 * 16 * nb, d + 8 * nb, nb, x8, bias, dx, T, y + 8, ys);
}
#else
#define BCNP_TOKENS 0
static void bcnp_tokens_q8_0(const int8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const int8_t *x8,
                             const int32_t *bias, const float *dx, int T, float *y, int64_t ys, int next) {}
static void bcnp_tokens_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int8_t *x8, const int32_t *bias,
                             const float *dx, int T, float *y, int64_t ys, int next) {}
#endif

#endif
