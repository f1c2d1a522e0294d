/* Attention of new tokens over a float16 KV cache, for bcnp._attention (bcnp/attention.py is the specification).
 *
 * One query row q (hd floats) of head h against the first S cached positions of that head:
 *   s_j = (q . k_j) / sqrt(hd) + bias_j,   m = max_j s_j,   e_j = exp(s_j - m),   out = (sum_j e_j v_j) / sum_j e_j
 * with k_j, v_j the float16 keys and values widened to float32 as they are read (exactly: every float16 is a
 * float32) and every sum in float32.  Two passes over the keys and values, no running softmax: the S scores of
 * one row (16 kB at 4096 positions) stay in the cache of the core that owns the head.
 *
 * Three implementations of the same row, all compiled in where the compiler targets them (so the tests can run
 * each): AVX-512F (_mm512_cvtph_ps: 16 float16 per instruction), AVX2 + F16C + FMA (8 per instruction) and portable
 * C (the fallback).  The vector paths compute exp with a polynomial (Cephes' expf, within 2 ulp of expf for the
 * arguments s_j - m <= 0 that softmax gives); the portable path calls expf.  The sums run in a different order
 * from NumPy's, so the paths agree with the specification to float32 rounding, not bit for bit.
 */
#ifndef BCNP_ATTENTION_H
#define BCNP_ATTENTION_H

#include <math.h>
#include <stdint.h>

/* bcnp_f16_to_f32 for the portable path; the header's quantization kernels are not used here */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "quant_kernels.h"
#pragma GCC diagnostic pop

#if defined(__AVX512F__) && defined(__F16C__)
#define BCNP_ATTENTION_AVX512 1
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define BCNP_ATTENTION_AVX2 1
#endif
#if defined(BCNP_ATTENTION_AVX512) || defined(BCNP_ATTENTION_AVX2)
#include <immintrin.h>
#endif

enum { BCNP_ATTENTION_SCALAR = 0, BCNP_ATTENTION_AVX2_PATH = 1, BCNP_ATTENTION_AVX512_PATH = 2 };

/* Which paths this build has: bit p set for path p. */
static int bcnp_attention_paths(void)
{
    int paths = 1 << BCNP_ATTENTION_SCALAR;
#if defined(BCNP_ATTENTION_AVX2)
    paths |= 1 << BCNP_ATTENTION_AVX2_PATH;
#endif
#if defined(BCNP_ATTENTION_AVX512)
    paths |= 1 << BCNP_ATTENTION_AVX512_PATH;
#endif
    return paths;
}

/* ---- portable C: the specification's loops ------------------------------------------------------------------ */

static void bcnp_scores_scalar(const float *q, const uint16_t *k, int64_t S, int64_t hd, float *s)
{
    for (int64_t j = 0; j < S; j++) {
        float dot = 0.0f;
        for (int64_t d = 0; d < hd; d++)
            dot += q[d] * bcnp_f16_to_f32(k[j * hd + d]);
        s[j] = dot;
    }
}

static float bcnp_exp_sum_scalar(float *e, int64_t S, float m)
{
    float l = 0.0f;
    for (int64_t j = 0; j < S; j++) {
        e[j] = expf(e[j] - m);
        l += e[j];
    }
    return l;
}

static void bcnp_weighted_sum_scalar(const float *e, const uint16_t *v, int64_t S, int64_t hd, float *out)
{
    for (int64_t d = 0; d < hd; d++)
        out[d] = 0.0f;
    for (int64_t j = 0; j < S; j++)
        for (int64_t d = 0; d < hd; d++)
            out[d] += e[j] * bcnp_f16_to_f32(v[j * hd + d]);
}

/* ---- AVX-512F ------------------------------------------------------------------------------------------------ */

#if defined(BCNP_ATTENTION_AVX512)
/* exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, |r| <= ln2/2, a degree-5 polynomial in r, times 2^n); 0 below
   -87.3, where expf is subnormal or 0 (and for -inf: a masked key); NaN stays NaN. */
static inline __m512 bcnp_exp_avx512(__m512 x)
{
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
    return _mm512_maskz_mul_ps(normal, p, _mm512_castsi512_ps(two_n));
}

static void bcnp_scores_avx512(const float *q, const uint16_t *k, int64_t S, int64_t hd, float *s)
{
    for (int64_t j = 0; j < S; j++) {
        const uint16_t *kj = k + j * hd;
        __m512 acc = _mm512_setzero_ps();
        int64_t d = 0;
        for (; d + 16 <= hd; d += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d),
                                  _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kj + d))), acc);
        float dot = _mm512_reduce_add_ps(acc);
        for (; d < hd; d++)
            dot += q[d] * bcnp_f16_to_f32(kj[d]);
        s[j] = dot;
    }
}

static float bcnp_exp_sum_avx512(float *e, int64_t S, float m)
{
    const __m512 vm = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j += 16) {
        const __mmask16 in = S - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - j)) - 1);
        const __m512 x = bcnp_exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, e + j), vm));
        _mm512_mask_storeu_ps(e + j, in, x);
        sum = _mm512_mask_add_ps(sum, in, sum, x);
    }
    return _mm512_reduce_add_ps(sum);
}

static void bcnp_weighted_sum_avx512(const float *e, const uint16_t *v, int64_t S, int64_t hd, float *out)
{
    const int64_t wide = hd - hd % 16;
    for (int64_t d = 0; d < hd; d++)
        out[d] = 0.0f;
    for (int64_t j = 0; j < S; j++) {
        const uint16_t *vj = v + j * hd;
        const __m512 ej = _mm512_set1_ps(e[j]);
        for (int64_t d = 0; d < wide; d += 16)
            _mm512_storeu_ps(out + d, _mm512_fmadd_ps(ej, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vj + d))),
                                                      _mm512_loadu_ps(out + d)));
        for (int64_t d = wide; d < hd; d++)
            out[d] += e[j] * bcnp_f16_to_f32(vj[d]);
    }
}

/* Head dim 128 (every Baichuan model): the row's q and out stay in eight registers, and the scores of 16 keys are
   folded into one vector of 16 sums (as quant_group.h folds 16 rows), then scaled, biased and maxed 16 at a time.
   The general loops above reloaded q for every key, reduced every key's 16 lanes alone, kept out in memory (a
   store-to-load chain per key) and scaled one score at a time: a 512-token prompt over itself, 40 heads, took
   145 ms a layer on 2 Zen 4 cores, 28 ns per query and key on a core. */
#define BCNP_HD128 8                                  /* 128 floats: 8 vectors */

/* v[16] -> lane j = the sum of v[j]'s 16 lanes */
static inline __m512 bcnp_fold16_ps(const __m512 *v)
{
    __m512 x[8], y[4];
    for (int i = 0; i < 8; i++)      /* each 128-bit lane: keys 2i, 2i + 1, two partial sums each */
        x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)      /* each 128-bit lane: keys 4i .. 4i + 3, one partial sum each */
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44), _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* e[j] = (q . k_j) / sqrt_hd + bias[j] for j < S; returns their max (NaN ignored, as fmaxf) */
static float bcnp_scores_hd128(const float *q, const uint16_t *k, const float *bias, int64_t S, float sqrt_hd,
                               float *e)
{
    __m512 qv[BCNP_HD128], m = _mm512_set1_ps(-INFINITY);
    const __m512 root = _mm512_set1_ps(sqrt_hd);
    for (int c = 0; c < BCNP_HD128; c++)
        qv[c] = _mm512_loadu_ps(q + 16 * c);
    for (int64_t j0 = 0; j0 < S; j0 += 16) {
        const int64_t n = S - j0 < 16 ? S - j0 : 16;
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {
            const uint16_t *kj = k + (j0 + (j < n ? j : 0)) * 128;       /* past S: any key, its lanes are dropped */
            __m512 a = _mm512_mul_ps(qv[0], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)kj)));
            for (int c = 1; c < BCNP_HD128; c++)
                a = _mm512_fmadd_ps(qv[c], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kj + 16 * c))), a);
            acc[j] = a;
        }
        const __mmask16 in = n == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
        const __m512 s = _mm512_add_ps(_mm512_div_ps(bcnp_fold16_ps(acc), root), _mm512_maskz_loadu_ps(in, bias + j0));
        _mm512_mask_storeu_ps(e + j0, in, s);
        m = _mm512_mask_max_ps(m, in, s, m);          /* s NaN: m kept */
    }
    return _mm512_reduce_max_ps(m);
}

static void bcnp_weighted_sum_hd128(const float *e, const uint16_t *v, int64_t S, float *out)
{
    __m512 acc[BCNP_HD128];
    for (int c = 0; c < BCNP_HD128; c++)
        acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j++) {
        const __m512 ej = _mm512_set1_ps(e[j]);
        for (int c = 0; c < BCNP_HD128; c++)
            acc[c] = _mm512_fmadd_ps(ej, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + j * 128 + 16 * c))),
                                     acc[c]);
    }
    for (int c = 0; c < BCNP_HD128; c++)
        _mm512_storeu_ps(out + 16 * c, acc[c]);
}
#endif

/* ---- AVX2 + F16C + FMA ------------------------------------------------------------------------------------------ */

#if defined(BCNP_ATTENTION_AVX2)
static inline __m256 bcnp_exp_avx2(__m256 x)          /* as bcnp_exp_avx512, 8 lanes */
{
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 normal = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_NLT_UQ);
    return _mm256_and_ps(normal, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

static inline float bcnp_sum_avx2(__m256 a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __m256 bcnp_load_f16_avx2(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static void bcnp_scores_avx2(const float *q, const uint16_t *k, int64_t S, int64_t hd, float *s)
{
    for (int64_t j = 0; j < S; j++) {
        const uint16_t *kj = k + j * hd;
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= hd; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), bcnp_load_f16_avx2(kj + d), acc);
        float dot = bcnp_sum_avx2(acc);
        for (; d < hd; d++)
            dot += q[d] * bcnp_f16_to_f32(kj[d]);
        s[j] = dot;
    }
}

static float bcnp_exp_sum_avx2(float *e, int64_t S, float m)
{
    const __m256 vm = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= S; j += 8) {
        const __m256 x = bcnp_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(e + j), vm));
        _mm256_storeu_ps(e + j, x);
        sum = _mm256_add_ps(sum, x);
    }
    float l = bcnp_sum_avx2(sum);
    for (; j < S; j++) {
        e[j] = expf(e[j] - m);
        l += e[j];
    }
    return l;
}

static void bcnp_weighted_sum_avx2(const float *e, const uint16_t *v, int64_t S, int64_t hd, float *out)
{
    const int64_t wide = hd - hd % 8;
    for (int64_t d = 0; d < hd; d++)
        out[d] = 0.0f;
    for (int64_t j = 0; j < S; j++) {
        const uint16_t *vj = v + j * hd;
        const __m256 ej = _mm256_set1_ps(e[j]);
        for (int64_t d = 0; d < wide; d += 8)
            _mm256_storeu_ps(out + d, _mm256_fmadd_ps(ej, bcnp_load_f16_avx2(vj + d), _mm256_loadu_ps(out + d)));
        for (int64_t d = wide; d < hd; d++)
            out[d] += e[j] * bcnp_f16_to_f32(vj[d]);
    }
}
#endif

/* ---- one query row --------------------------------------------------------------------------------------------- */

/* out (hd) = softmax(q k^T / sqrt_hd + bias) v over keys and values k, v (S, hd) float16 bits; bias (S) float32
   (-inf: a masked key); e: S floats of scratch.  A path this build lacks falls back to the portable one. */
static void bcnp_attend_row(int path, const float *q, const uint16_t *k, const uint16_t *v, const float *bias,
                            int64_t S, int64_t hd, float sqrt_hd, float *e, float *out)
{
    float m = -INFINITY, l;
    /* Keys the bias masks at the end of the span (the chunk's own later tokens) add exp(-inf) = 0 exactly: the
       row's sums without them are the same; only a NaN there, which the row must not see, no longer spoils it. */
    while (S > 0 && bias[S - 1] == -INFINITY)
        S--;
#if defined(BCNP_ATTENTION_AVX512)
    const int hd128 = path == BCNP_ATTENTION_AVX512_PATH && hd == 128;
#else
    const int hd128 = 0;
#endif
    if (hd128) {
#if defined(BCNP_ATTENTION_AVX512)
        if (S > 0)
            m = bcnp_scores_hd128(q, k, bias, S, sqrt_hd, e);
#endif
    } else {
#if defined(BCNP_ATTENTION_AVX512)
        if (path == BCNP_ATTENTION_AVX512_PATH) bcnp_scores_avx512(q, k, S, hd, e); else
#endif
#if defined(BCNP_ATTENTION_AVX2)
        if (path == BCNP_ATTENTION_AVX2_PATH) bcnp_scores_avx2(q, k, S, hd, e); else
#endif
        bcnp_scores_scalar(q, k, S, hd, e);

        for (int64_t j = 0; j < S; j++) {
            e[j] = e[j] / sqrt_hd + bias[j];
            m = fmaxf(m, e[j]);
        }
    }
    if (m == -INFINITY) {                 /* every key masked (or every score NaN): NaN, as softmax gives */
        for (int64_t d = 0; d < hd; d++)
            out[d] = NAN;
        return;
    }
#if defined(BCNP_ATTENTION_AVX512)
    if (hd128) { l = bcnp_exp_sum_avx512(e, S, m); bcnp_weighted_sum_hd128(e, v, S, out); } else
    if (path == BCNP_ATTENTION_AVX512_PATH) { l = bcnp_exp_sum_avx512(e, S, m); bcnp_weighted_sum_avx512(e, v, S, hd, out); } else
#endif
#if defined(BCNP_ATTENTION_AVX2)
    if (path == BCNP_ATTENTION_AVX2_PATH) { l = bcnp_exp_sum_avx2(e, S, m); bcnp_weighted_sum_avx2(e, v, S, hd, out); } else
#endif
    { l = bcnp_exp_sum_scalar(e, S, m); bcnp_weighted_sum_scalar(e, v, S, hd, out); }

    for (int64_t d = 0; d < hd; d++)
        out[d] /= l;
}

/* dst[i] = the float16 bits of src[i] limited to float16's finite range [-65504, 65504], nearest even, NaN kept a
   NaN: how a float16 KV cache stores keys and values (bcnp.cache.KVCache.store; NumPy's clip, then astype).
   NumPy's float32 -> float16 cast takes about 5 ns an element here (26 us a token of a 13B layer's keys). */
static void bcnp_store_f16(const float *src, int64_t n, uint16_t *dst)
{
    int64_t i = 0;
#if defined(BCNP_ATTENTION_AVX512)
    const __m512 hi = _mm512_set1_ps(65504.0f), lo = _mm512_set1_ps(-65504.0f);
    for (; i + 16 <= n; i += 16) {      /* min and max return their second operand where either is NaN */
        const __m512 x = _mm512_max_ps(lo, _mm512_min_ps(hi, _mm512_loadu_ps(src + i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    for (; i < n; i++) {
        const float x = src[i];
        dst[i] = bcnp_f32_to_f16(x != x ? x : fminf(fmaxf(x, -65504.0f), 65504.0f));
    }
}

#endif
