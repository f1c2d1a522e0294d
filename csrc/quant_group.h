/* The AVX-512 decode matvec for bcnp._quant, sixteen rows at a time, with the prefill GEMM's sums:
 *   y[r] = sum over blocks b, in order, of  float(isum) * (d[r, b] * dx[b])        (float32, one accumulator)
 * exactly as bcnp_gemm_q8_0_scalar (quant_gemm.h) and the AMX kernel (quant_amx.h) compute it for every token.  So
 * one token alone, a batch of them and a prompt get the same bits per token: a sequence's logits do not depend on
 * what shares its step.
 *
 * The integer block sums come from vpdpwssd as in bcnp_dot_q8_0 (16 int32 partial sums per block), or for Q4_0
 * from vpdpbusd on the codes as bytes (4 partial sums per block of a group of four); sixteen rows' partial sums are then added across lanes into one vector
 * holding one block's sum for each of the sixteen rows, which meets the sixteen rows' scales (bcnp_group_scales)
 * in one FMA.  That reduction costs about 3 (Q8_0) or 0.7 (Q4_0) vector operations per row and block, which the
 * memory-bound loop has room for.
 */
#ifndef BCNP_QUANT_GROUP_H
#define BCNP_QUANT_GROUP_H

#include "quant_gemm.h"

#define BCNP_GROUP_ROWS 16
/* How far ahead in each of the 16 rows the matvec asks for lines into L1: measured, from memory on 2 threads,
   1024 bytes (the first choice) was 10-25% slower than 192-384 (the 10 int4 linears of 2 13B layers, min / median
   of 6 alternated rounds: 1024 18.6 / 21.8 ms, 256 15.3 / 17.3; the int8 lm_head and two linears 18.5 / 22.1
   against 16.5 / 19.5), most likely as 16 rows x 16 lines ahead are more than L1's fill buffers keep in flight. */
#define BCNP_GROUP_AHEAD 256
#if defined(BCNP_AVX512)
#define BCNP_GROUPS 1
#else
#define BCNP_GROUPS 0
#endif

/* y = row . x for one row with the GEMM's sums (the rows past the last whole group of sixteen). */
static float bcnp_sums_q8_0(const int8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)
{
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++)
        sum = fmaf((float)bcnp_block_dot_q8_0(w + 32 * b, xq + 32 * b), bcnp_f16_to_f32(d[b]) * dx[b], sum);
    return sum;
}

/* The same for Q4_0, x in the matvec's Q4_0 layout (bcnp_quantize_activation with q4_layout = 1). */
static float bcnp_sums_q4_0(const uint8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)
{
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++)
        sum = fmaf((float)bcnp_block_dot_q4_0(w + 16 * b, xq, b, nb), bcnp_f16_to_f32(d[b]) * dx[b], sum);
    return sum;
}

#if defined(BCNP_AVX512)
/* A step's share of the next group of 16 rows, into L2: `bytes` of its codes and `d_bytes` of its scales, so that
   the whole group has been asked for by the end of the current one.  The rows of a group are read as 16 streams at
   once, too many for the hardware's prefetchers to run far ahead of; the next group is one contiguous run that
   the current group's work hides.  Zen 4, 2 threads, one 13696 x 5120 weight from memory, min / median of 6-10
   alternated runs (the tokens kernel, csrc/quant_tokens.h): 1 token int4 1.22 / 1.65 ms against 2.32 / 2.44,
   int8 2.36 / 3.00 against 3.42 / 3.98; 8 tokens int4 2.79 / 2.93 against 2.99 / 3.81, int8 4.66 / 6.35
   against 5.09 / 6.06. */
static inline void bcnp_fetch_next(const char **ahead, int64_t bytes, const char **ahead_d, int64_t d_bytes)
{
    for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(*ahead + l, _MM_HINT_T1);
    for (int64_t l = 0; l < d_bytes; l += 64) _mm_prefetch(*ahead_d + l, _MM_HINT_T1);
    *ahead += bytes;
    *ahead_d += d_bytes;
}

/* The scales of 16 rows (d, row stride nb) for blocks b .. b + count - 1 (count <= 16) as float32, transposed:
   dw[16 k + r] = d[r][b + k]. */
static inline void bcnp_group_scales(const uint16_t *d, int64_t nb, int64_t b, int64_t count, float *dw)
{
    const __mmask16 m = (__mmask16)(count >= 16 ? 0xFFFF : (1u << count) - 1);
    __m512i v[16];
    for (int r = 0; r < 16; r++)
        v[r] = _mm512_castps_si512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, d + r * nb + b)));
    bcnp_transpose16(v);
    for (int k = 0; k < count; k++) _mm512_store_si512(dw + 16 * k, v[k]);
}

/* Lanes of each pair of vectors added pairwise, twice: v[2i], v[2i+1] -> one vector per four rows, whose 128-bit
   lane c holds (rows 4i .. 4i+3) the sums of the four int32 lanes 4c .. 4c+3 of each row's vector. */
static inline void bcnp_fold_rows(const __m512i v[16], __m512i x[4])
{
    __m512i w[8];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        x[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(w[2 * i], w[2 * i + 1]),
                                _mm512_unpackhi_epi64(w[2 * i], w[2 * i + 1]));
}

/* y[r], r < 16: the Q8_0 rows at w (row stride 32 nb) against x. */
static void bcnp_group_q8_0(const int8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const float *dx,
                            float *y, int next)
{
    const char *ahead = (const char *)(w + 16 * 32 * nb), *ahead_d = (const char *)(d + 16 * nb);
    __attribute__((aligned(64))) float dw[16 * 16];
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int64_t count = nb - b0 < 16 ? nb - b0 : 16;
        bcnp_group_scales(d, nb, b0, count, dw);
        for (int64_t k = 0; k < count; k++) {
            const int64_t b = b0 + k;
            const __m512i xv = _mm512_load_si512(xq + 32 * b);
            __m512i p[16], x[4];
            if (next) bcnp_fetch_next(&ahead, 512, &ahead_d, 32);
            for (int r = 0; r < 16; r++) {
                const int8_t *wr = w + r * 32 * nb + 32 * b;
                if (k & 1) _mm_prefetch((const char *)(wr + BCNP_GROUP_AHEAD), _MM_HINT_T0);
                p[r] = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                           _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)wr)), xv);
            }
            bcnp_fold_rows(p, x);
            /* the four 128-bit lanes of each row quad: 0+1, 2+3, then again: lane i = rows 4i .. 4i+3 */
            const __m512i y0 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[0], x[1], 0x88), _mm512_shuffle_i32x4(x[0], x[1], 0xDD));
            const __m512i y1 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[2], x[3], 0x88), _mm512_shuffle_i32x4(x[2], x[3], 0xDD));
            const __m512i isum = _mm512_add_epi32(_mm512_shuffle_i32x4(y0, y1, 0x88), _mm512_shuffle_i32x4(y0, y1, 0xDD));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(_mm512_load_ps(dw + 16 * k), _mm512_set1_ps(dx[b])),
                                  acc);
        }
    }
    _mm512_storeu_ps(y, acc);
}

/* y[t][r], r < 16, t < NT (1 or 2): the Q4_0 rows at w (row stride 16 nb) against NT tokens x[t] in the matvec's
   Q4_0 layout (xq[t], dx[t], bias[t]).  Each token's sums are the one-token kernel's, term for term; two tokens
   share each load and unpacking of the codes, which is most of the work once the rows are in cache.
   Q4_0's x is rounded to int8 (bcnp_activation_limit), so vpdpbusd multiplies the codes as bytes, 64 at a time:
   each 16-bit word m of x's four runs holds codes j, j + 16, j + 1, j + 17 of block m / 8 (bcnp_q4_x_index), and
   so the low bytes of runs 0 and 2 interleaved are x at the low nibbles of the 64 weight bytes, those of runs 1 and
   3 at the high ones; a 32-bit lane meets the same 8 values of x as before, so bias[t] is unchanged.  Against
   vpdpwssd on int16 codes: 3 operations instead of 7 to unpack a row's 4 blocks, 2 products per token instead
   of 4; the 10 int4 linears of 2 13B layers from memory, 2 threads, best of 8, three alternated rounds: 1 token
   14.6-18.1 ms against 16.5-20.5, 2 tokens 17.6-23.4 against 20.1-26.0 (without AMX, 8 tokens 73.8-81.4 against
   80.2-82.7). */
static inline __attribute__((always_inline))
void bcnp_group_tokens_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int16_t *const *xq,
                            const float *const *dx, const int32_t *const *bias, float *const *y, const int NT,
                            int next)
{
    const char *ahead = (const char *)(w + 16 * 16 * nb), *ahead_d = (const char *)(d + 16 * nb);
    __attribute__((aligned(64))) float dw[16 * 16];
    const __m512i nibble = _mm512_set1_epi8(0x0F), low = _mm512_set1_epi16(0x00FF);
    const int64_t grouped = nb - nb % 4;            /* blocks in groups of four (see bcnp_quantize_activation) */
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int64_t count = nb - b0 < 16 ? nb - b0 : 16;
        int64_t k = 0;
        bcnp_group_scales(d, nb, b0, count, dw);
        for (; k + 4 <= count && b0 + k + 4 <= grouped; k += 4) {
            const int64_t b = b0 + k;
            __m512i xv[2][2], start[2], p[2][16];
            if (next) bcnp_fetch_next(&ahead, 1024, &ahead_d, 128);
            for (int t = 0; t < NT; t++) {
                const int16_t *xg = xq[t] + 32 * b;
                xv[t][0] = _mm512_or_si512(_mm512_and_si512(_mm512_load_si512(xg), low),
                                           _mm512_slli_epi16(_mm512_load_si512(xg + 64), 8));
                xv[t][1] = _mm512_or_si512(_mm512_and_si512(_mm512_load_si512(xg + 32), low),
                                           _mm512_slli_epi16(_mm512_load_si512(xg + 96), 8));
                start[t] = _mm512_loadu_si512(bias[t] + 4 * b);
            }
            for (int r = 0; r < 16; r++) {
                const uint8_t *wr = w + r * 16 * nb + 16 * b;
                _mm_prefetch((const char *)(wr + BCNP_GROUP_AHEAD), _MM_HINT_T0);
                const __m512i wv = _mm512_loadu_si512(wr);
                const __m512i lo = _mm512_and_si512(wv, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nibble);
                for (int t = 0; t < NT; t++)
                    p[t][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start[t], lo, xv[t][0]), hi, xv[t][1]);
            }
            for (int t = 0; t < NT; t++) {
                __m512i x[4], s[4];
                bcnp_fold_rows(p[t], x);    /* 128-bit lane c of x[i]: block b + c of rows 4i .. 4i+3 */
                const __m512i t0 = _mm512_shuffle_i32x4(x[0], x[1], 0x44), t1 = _mm512_shuffle_i32x4(x[0], x[1], 0xEE);
                const __m512i t2 = _mm512_shuffle_i32x4(x[2], x[3], 0x44), t3 = _mm512_shuffle_i32x4(x[2], x[3], 0xEE);
                s[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
                s[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
                s[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
                s[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
                for (int j = 0; j < 4; j++)
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j]),
                                             _mm512_mul_ps(_mm512_load_ps(dw + 16 * (k + j)), _mm512_set1_ps(dx[t][b + j])),
                                             acc[t]);
            }
        }
        for (; k < count; k++) {                     /* the last nb % 4 blocks, in natural order */
            const int64_t b = b0 + k;
            for (int t = 0; t < NT; t++) {
                __attribute__((aligned(64))) int32_t isum[16];
                for (int r = 0; r < 16; r++) isum[r] = bcnp_block_dot_q4_0(w + r * 16 * nb + 16 * b, xq[t], b, nb);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(isum)),
                                         _mm512_mul_ps(_mm512_load_ps(dw + 16 * k), _mm512_set1_ps(dx[t][b])), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) _mm512_storeu_ps(y[t], acc[t]);
}

/* y[r], r < 16: the Q4_0 rows at w (row stride 16 nb) against x in the matvec's Q4_0 layout, with its bias. */
static void bcnp_group_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const float *dx,
                            const int32_t *bias, float *y, int next)
{
    bcnp_group_tokens_q4_0(w, d, nb, &xq, &dx, &bias, &y, 1, next);
}

/* The same for two tokens at once: y0 against (xq0, dx0, bias0), y1 against (xq1, dx1, bias1). */
static void bcnp_group2_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq0, const float *dx0,
                             const int32_t *bias0, const int16_t *xq1, const float *dx1, const int32_t *bias1,
                             float *y0, float *y1, int next)
{
    const int16_t *xq[2] = {xq0, xq1};
    const float *dx[2] = {dx0, dx1};
    const int32_t *bias[2] = {bias0, bias1};
    float *y[2] = {y0, y1};
    bcnp_group_tokens_q4_0(w, d, nb, xq, dx, bias, y, 2, next);
}
#else
static void bcnp_group_q8_0(const int8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const float *dx,
                            float *y, int next) {}
static void bcnp_group_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const float *dx,
                            const int32_t *bias, float *y, int next) {}
static void bcnp_group2_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq0, const float *dx0,
                             const int32_t *bias0, const int16_t *xq1, const float *dx1, const int32_t *bias1,
                             float *y0, float *y1, int next) {}
#endif

#endif
