/* Prefill GEMM for bcnp._quant: Y = X W^T for many tokens straight from Q8_0 / Q4_0 blocks.
 *
 * The activation is rounded per token and per block of 32 exactly as for the decode matvec (int16 for Q8_0, int8
 * for Q4_0: bcnp_quantize_activation, natural layout), every (row, token, block) gets its exact integer dot
 * product, and
 *   y[t, r] = sum over blocks b, in order, of  float(isum) * (d[r, b] * dx[t, b])       (float32, one accumulator)
 * so the error bound of the matvec holds unchanged (see quant_kernels.h): the rounding of x, then float32 rounding
 * of at most nb + 4 steps.  The float sums are not the matvec's (which keeps 16 partial sums per block and two
 * accumulators), so a row equals the matvec to within that bound, not bit for bit.
 *
 * AVX-512 VNNI: a panel of 32 weight rows is unpacked once to int16 and transposed so that one 64-byte vector holds
 * the same two weights (one int16 pair) of a block for 16 rows; vpdpwssd with one token's matching pair broadcast
 * then adds 2 products to each of 16 rows' block sums.  A tile of 32 rows x 6 tokens keeps 12 integer block sums
 * and 12 float accumulators in registers, and each block costs 16 x 12 vpdpwssd + 12 x (convert, scale, fma): the
 * integer products dominate, 32 per instruction.  The panel (32 rows x n int16: 320 KiB at n = 5120) stays in L2
 * while all the tokens pass over it.  AVX2 (below): the same panel, vpmaddwd on 8 rows; measured on this machine
 * built with -mno-avx512f, 1.5-2.6x faster than dequantizing to float32 for OpenBLAS's AVX2 (Haswell) sgemm at
 * 32-512 tokens, one 13696 x 5120 weight, 2 threads.  Other builds get the portable C below (the specification).
 */
#ifndef BCNP_QUANT_GEMM_H
#define BCNP_QUANT_GEMM_H

#include "quant_kernels.h"

#define BCNP_PANEL_ROWS 32
#define BCNP_PANEL_TOKENS 6

/* int32 words of a packed panel: per block 16 pairs x 2 vectors of 16 rows */
static inline int64_t bcnp_panel_words(int64_t nb) { return nb * 16 * BCNP_PANEL_ROWS; }

/* The integer block sums of one row: Q8_0 codes, or Q4_0 codes - 8, as int16 (32 per block). */
static inline void bcnp_row_codes_q8_0(const int8_t *w, int64_t b, int16_t *c)
{
    for (int j = 0; j < 32; j++) c[j] = w[32 * b + j];
}

static inline void bcnp_row_codes_q4_0(const uint8_t *w, int64_t b, int16_t *c)
{
    for (int j = 0; j < 16; j++) {
        c[j] = (int16_t)((w[16 * b + j] & 0x0F) - 8);
        c[j + 16] = (int16_t)((w[16 * b + j] >> 4) - 8);
    }
}

/* The portable kernel: y[t * ys + r] for rows r < rows, tokens t < T (xq, dx as bcnp_quantize_activation, natural
   layout, token t at xq + t * n, dx + t * nb). */
#define BCNP_GEMM_SCALAR(name, wtype, bytes_per_block, codes)                                                       \
    static void name(const wtype *w, const uint16_t *d, int64_t rows, int64_t nb, const int16_t *xq,                \
                     const float *dx, int64_t T, float *y, int64_t ys)                                              \
    {                                                                                                               \
        int16_t c[32];                                                                                              \
        for (int64_t r = 0; r < rows; r++)                                                                          \
            for (int64_t t = 0; t < T; t++) {                                                                       \
                float sum = 0.0f;                                                                                   \
                for (int64_t b = 0; b < nb; b++) {                                                                  \
                    int32_t s = 0;                                                                                  \
                    codes(w + r * nb * (bytes_per_block), b, c);                                                    \
                    for (int j = 0; j < 32; j++) s += c[j] * xq[t * 32 * nb + 32 * b + j];                          \
                    sum = fmaf((float)s, bcnp_f16_to_f32(d[r * nb + b]) * dx[t * nb + b], sum);                     \
                }                                                                                                   \
                y[t * ys + r] = sum;                                                                                \
            }                                                                                                       \
    }
BCNP_GEMM_SCALAR(bcnp_gemm_q8_0_scalar, int8_t, 32, bcnp_row_codes_q8_0)
BCNP_GEMM_SCALAR(bcnp_gemm_q4_0_scalar, uint8_t, 16, bcnp_row_codes_q4_0)

#if defined(BCNP_AVX512)
#define BCNP_GEMM 1

/* 16 vectors of 16 int32 transposed in place: v[c] lane r <- v[r] lane c. */
static inline void bcnp_transpose16(__m512i v[16])
{
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {       /* u[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j */
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {       /* a 4 x 4 transpose of 128-bit lanes among u[j], u[4+j], u[8+j], u[12+j] */
        const __m512i x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
        const __m512i y0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
        const __m512i y1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
        v[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);
        v[8 + j] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
        v[4 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);
        v[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
    }
}

/* Block b of a row as 32 int16 (16 pairs, one per 32-bit lane). */
static inline __m512i bcnp_block_codes_q8_0(const int8_t *w, int64_t b)
{
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + 32 * b)));
}

static inline __m512i bcnp_block_codes_q4_0(const uint8_t *w, int64_t b)
{
    const __m128i q = _mm_loadu_si128((const __m128i *)(w + 16 * b)), m = _mm_set1_epi8(0x0F);
    const __m256i c = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
    return _mm512_sub_epi16(_mm512_cvtepu8_epi16(c), _mm512_set1_epi16(8));
}

/* Rows r0 .. r0 + n - 1 (n <= 32; missing rows are zeros) packed: pk[(32 b + 2 p + v) * 16 + i] = the int16 pair p
   of block b of row r0 + 16 v + i; dp[32 b + 16 v + i] = its float scale. */
#define BCNP_PACK_PANEL(name, wtype, bytes_per_block, block_codes)                                                  \
    static void name(const wtype *w, const uint16_t *d, int64_t n, int64_t nb, int32_t *pk, float *dp)              \
    {                                                                                                               \
        for (int64_t b = 0; b < nb; b++)                                                                            \
            for (int v = 0; v < 2; v++) {                                                                           \
                __m512i rows[16];                                                                                   \
                for (int i = 0; i < 16; i++) {                                                                      \
                    const int64_t r = 16 * v + i;                                                                   \
                    rows[i] = r < n ? block_codes(w + r * nb * (bytes_per_block), b) : _mm512_setzero_si512();      \
                    dp[32 * b + r] = r < n ? bcnp_f16_to_f32(d[r * nb + b]) : 0.0f;                                 \
                }                                                                                                   \
                bcnp_transpose16(rows);                                                                             \
                for (int p = 0; p < 16; p++)                                                                        \
                    _mm512_store_si512(pk + (32 * b + 2 * p + v) * 16, rows[p]);                                    \
            }                                                                                                       \
    }
BCNP_PACK_PANEL(bcnp_pack_panel_q8_0, int8_t, 32, bcnp_block_codes_q8_0)
BCNP_PACK_PANEL(bcnp_pack_panel_q4_0, uint8_t, 16, bcnp_block_codes_q4_0)

/* One packed panel against nt tokens: y[t * ys + i] for the panel's rows i < n. */
static inline __attribute__((always_inline))
void bcnp_panel_tokens(const int32_t *pk, const float *dp, int64_t nb, const int16_t *xq, const float *dx, int64_t n_x,
                       const int nt, float *y, int64_t ys, __mmask16 m0, __mmask16 m1)
{
    __m512 f0[BCNP_PANEL_TOKENS], f1[BCNP_PANEL_TOKENS];
    for (int t = 0; t < nt; t++) f0[t] = f1[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i s0[BCNP_PANEL_TOKENS], s1[BCNP_PANEL_TOKENS];
        const int32_t *xb = (const int32_t *)(xq + 32 * b);          /* token t's pair p: xb[t * n_x / 2 + p] */
        const int32_t *wb = pk + 32 * 16 * b;
        for (int t = 0; t < nt; t++) s0[t] = s1[t] = _mm512_setzero_si512();
        _mm_prefetch((const char *)(wb + 32 * 16 * 2), _MM_HINT_T0);
        for (int p = 0; p < 16; p++) {
            const __m512i w0 = _mm512_load_si512(wb + 32 * p), w1 = _mm512_load_si512(wb + 32 * p + 16);
            for (int t = 0; t < nt; t++) {
                const __m512i xv = _mm512_set1_epi32(xb[t * (n_x / 2) + p]);
                s0[t] = _mm512_dpwssd_epi32(s0[t], w0, xv);
                s1[t] = _mm512_dpwssd_epi32(s1[t], w1, xv);
            }
        }
        const __m512 d0 = _mm512_load_ps(dp + 32 * b), d1 = _mm512_load_ps(dp + 32 * b + 16);
        for (int t = 0; t < nt; t++) {
            const __m512 dxt = _mm512_set1_ps(dx[t * (n_x / 32) + b]);
            f0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[t]), _mm512_mul_ps(d0, dxt), f0[t]);
            f1[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[t]), _mm512_mul_ps(d1, dxt), f1[t]);
        }
    }
    for (int t = 0; t < nt; t++) {
        _mm512_mask_storeu_ps(y + t * ys, m0, f0[t]);
        _mm512_mask_storeu_ps(y + t * ys + 16, m1, f1[t]);
    }
}

/* A packed panel of n rows against all T tokens. */
static void bcnp_panel_gemm(const int32_t *pk, const float *dp, int64_t n, int64_t nb, const int16_t *xq,
                            const float *dx, int64_t T, float *y, int64_t ys)
{
    const int64_t n_x = 32 * nb;
    const __mmask16 m0 = (__mmask16)(n >= 16 ? 0xFFFF : (1u << n) - 1);
    const __mmask16 m1 = (__mmask16)(n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1);
    for (int64_t t0 = 0; t0 < T; t0 += BCNP_PANEL_TOKENS) {
        const int nt = T - t0 < BCNP_PANEL_TOKENS ? (int)(T - t0) : BCNP_PANEL_TOKENS;
        const int16_t *xt = xq + t0 * n_x;
        const float *dxt = dx + t0 * nb;
        float *yt = y + t0 * ys;
        switch (nt) {
        case 1: bcnp_panel_tokens(pk, dp, nb, xt, dxt, n_x, 1, yt, ys, m0, m1); break;
        case 2: bcnp_panel_tokens(pk, dp, nb, xt, dxt, n_x, 2, yt, ys, m0, m1); break;
        case 3: bcnp_panel_tokens(pk, dp, nb, xt, dxt, n_x, 3, yt, ys, m0, m1); break;
        case 4: bcnp_panel_tokens(pk, dp, nb, xt, dxt, n_x, 4, yt, ys, m0, m1); break;
        case 5: bcnp_panel_tokens(pk, dp, nb, xt, dxt, n_x, 5, yt, ys, m0, m1); break;
        default: bcnp_panel_tokens(pk, dp, nb, xt, dxt, n_x, 6, yt, ys, m0, m1); break;
        }
    }
}
#elif defined(BCNP_AVX2)
/* AVX2 (no VNNI): the same packed panel, read as four 8-row vectors per int16 pair; vpmaddwd adds the pair's two
   products into 8 rows' int32 lanes and vpaddd accumulates them, the block sums exact as above. Registers hold a
   tile of 32 rows x 2 tokens of integer sums; the float accumulators of the tile wait in L1 (fa), one fused
   multiply-add per block and row, as the specification does. The panel is packed by plain C (the rows' codes
   copied pair by pair): AVX2 has no cheap 16 x 16 transpose, and packing is paid once per 32 rows for all tokens. */
#define BCNP_GEMM 1
#define BCNP_AVX2_TOKENS 2

#define BCNP_PACK_PANEL_C(name, wtype, bytes_per_block, codes)                                                      \
    static void name(const wtype *w, const uint16_t *d, int64_t n, int64_t nb, int32_t *pk, float *dp)              \
    {                                                                                                               \
        int16_t c[32];                                                                                              \
        for (int64_t b = 0; b < nb; b++)                                                                            \
            for (int64_t r = 0; r < BCNP_PANEL_ROWS; r++) {                                                         \
                const int v = (int)(r / 16), i = (int)(r % 16);                                                     \
                if (r < n) codes(w + r * nb * (bytes_per_block), b, c);                                             \
                else memset(c, 0, sizeof c);                                                                        \
                for (int p = 0; p < 16; p++)        /* the pair as one word: c[2p] low, c[2p + 1] high */        \
                    pk[(32 * b + 2 * p + v) * 16 + i] =                                                             \
                        (int32_t)((uint32_t)(uint16_t)c[2 * p] | (uint32_t)(uint16_t)c[2 * p + 1] << 16);           \
                dp[32 * b + r] = r < n ? bcnp_f16_to_f32(d[r * nb + b]) : 0.0f;                                     \
            }                                                                                                       \
    }
BCNP_PACK_PANEL_C(bcnp_pack_panel_q8_0, int8_t, 32, bcnp_row_codes_q8_0)
BCNP_PACK_PANEL_C(bcnp_pack_panel_q4_0, uint8_t, 16, bcnp_row_codes_q4_0)

static inline __attribute__((always_inline))
void bcnp_panel_tokens_avx2(const int32_t *pk, const float *dp, int64_t nb, const int16_t *xq, const float *dx,
                            int64_t n_x, const int nt, float *y, int64_t ys, int64_t n)
{
    float fa[BCNP_AVX2_TOKENS][BCNP_PANEL_ROWS] __attribute__((aligned(32)));
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < BCNP_PANEL_ROWS; r++) fa[t][r] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        __m256i s[BCNP_AVX2_TOKENS][4];
        const int32_t *xb = (const int32_t *)(xq + 32 * b);          /* token t's pair p: xb[t * n_x / 2 + p] */
        const int32_t *wb = pk + 32 * 16 * b;
        for (int t = 0; t < nt; t++)
            for (int j = 0; j < 4; j++) s[t][j] = _mm256_setzero_si256();
        for (int p = 0; p < 16; p++) {
            const __m256i *wp = (const __m256i *)(wb + 32 * p);      /* rows 0-15 (v = 0), then rows 16-31 */
            const __m256i w0 = _mm256_load_si256(wp), w1 = _mm256_load_si256(wp + 1);
            const __m256i w2 = _mm256_load_si256(wp + 2), w3 = _mm256_load_si256(wp + 3);
            for (int t = 0; t < nt; t++) {
                const __m256i xv = _mm256_set1_epi32(xb[t * (n_x / 2) + p]);
                s[t][0] = _mm256_add_epi32(s[t][0], _mm256_madd_epi16(w0, xv));
                s[t][1] = _mm256_add_epi32(s[t][1], _mm256_madd_epi16(w1, xv));
                s[t][2] = _mm256_add_epi32(s[t][2], _mm256_madd_epi16(w2, xv));
                s[t][3] = _mm256_add_epi32(s[t][3], _mm256_madd_epi16(w3, xv));
            }
        }
        for (int t = 0; t < nt; t++) {
            const __m256 dxt = _mm256_set1_ps(dx[t * (n_x / 32) + b]);
            for (int j = 0; j < 4; j++) {
                const __m256 scale = _mm256_mul_ps(_mm256_load_ps(dp + 32 * b + 8 * j), dxt);
                _mm256_store_ps(fa[t] + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t][j]), scale,
                                                               _mm256_load_ps(fa[t] + 8 * j)));
            }
        }
    }
    for (int t = 0; t < nt; t++)
        for (int64_t r = 0; r < n; r++) y[t * ys + r] = fa[t][r];
}

/* A packed panel of n rows against all T tokens. */
static void bcnp_panel_gemm(const int32_t *pk, const float *dp, int64_t n, int64_t nb, const int16_t *xq,
                            const float *dx, int64_t T, float *y, int64_t ys)
{
    const int64_t n_x = 32 * nb;
    for (int64_t t0 = 0; t0 < T; t0 += BCNP_AVX2_TOKENS) {
        if (T - t0 >= 2)
            bcnp_panel_tokens_avx2(pk, dp, nb, xq + t0 * n_x, dx + t0 * nb, n_x, 2, y + t0 * ys, ys, n);
        else
            bcnp_panel_tokens_avx2(pk, dp, nb, xq + t0 * n_x, dx + t0 * nb, n_x, 1, y + t0 * ys, ys, n);
    }
}
#else
#define BCNP_GEMM 0
static void bcnp_pack_panel_q8_0(const int8_t *w, const uint16_t *d, int64_t n, int64_t nb, int32_t *pk, float *dp) {}
static void bcnp_pack_panel_q4_0(const uint8_t *w, const uint16_t *d, int64_t n, int64_t nb, int32_t *pk, float *dp) {}
static void bcnp_panel_gemm(const int32_t *pk, const float *dp, int64_t n, int64_t nb, const int16_t *xq,
                            const float *dx, int64_t T, float *y, int64_t ys) {}
#endif

#endif
