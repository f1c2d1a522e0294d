/* Block quantization kernels for bcnp._quant: GGML Q8_0 / Q4_0 on flat arrays (SPEC section 4).
 *
 * A row of n weights (n a multiple of 32) is n/32 blocks; block b has a float16 scale d[b] and 32 codes:
 *   Q8_0: int8 q[32*b + j],                            weight = q * d
 *   Q4_0: uint8 byte q[16*b + j] = c_j | c_{j+16} << 4,  weight = (c - 8) * d,  c in 0..15
 *
 * The decode matvec y = W x quantizes x itself per 32-block with a float32 scale dx = max|x_b| / L
 * (quantize_activation): to int16 (L = 32767) for Q8_0 weights, to int8 (L = 127, llama.cpp's choice) for Q4_0.
 * Every block contributes the exact integer dot product of its codes with the rounded activation, times d_w * dx,
 * and the float32 products are summed.  The result differs from dequantize(W) @ x by the rounding of x (at most
 * dx (1/2 + (L + 1) 2^-24) per element: 2^-16 of the block's largest |x| for Q8_0, 2^-8 for Q4_0) and float32
 * rounding:
 *   |y - W^ x| <= sum_b |d_b| dx_b sum_i |q_bi| (1/2 + (L + 1) 2^-24 + (n_blocks + 4) L 2^-24)
 * with q the weight codes (q - 8 for Q4_0); the last term bounds the float32 rounding of the block products
 * (each at most L dx_b |d_b| sum_i |q_bi|) and of their sum.  Why two ranges, measured on the fixture b13 (RMS of
 * the logits' difference from float32 over its 33-token prompt): int8 x took the Q8_0 model from 0.0031 to 0.0040,
 * worse than the original's own int8, while the Q4_0 model stayed at 0.0485 (0.0484): a Q4_0 weight's own rounding
 * is 16 times coarser than int8 x's.  And the AMX kernel multiplies bytes, so int8 x is one product where int16 is
 * two and their recombination: in the engine's step of 8 sequences, the 10 Q4_0 linears of two 13B layers took
 * 35-48 ms against 55-71 (alternated builds, a busy hour; docs/performance.md).
 * A float32 loop (codes converted to float, FMA with x) would be exact up to the float sum, but measured at half
 * the memory bandwidth for Q4_0 on Zen 4.
 *
 * Three implementations of the dot products: AVX-512 VNNI (vpdpwssd: 32 int16 products summed in pairs per
 * instruction), AVX2 (vpmaddwd) and portable C (the specification).  The compiler flags pick one
 * (-march=native on a source build); all compute the same integer block sums.
 */
#ifndef BCNP_QUANT_KERNELS_H
#define BCNP_QUANT_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define BCNP_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define BCNP_AVX2 1
#include <immintrin.h>
#endif

static const char *bcnp_simd_name(void)
{
#if defined(BCNP_AVX512)
    return "avx512vnni";
#elif defined(BCNP_AVX2)
    return "avx2";
#else
    return "scalar";
#endif
}

/* Quantization must round exactly like GGML's reference C (and the gguf package): x * id + 8.5f is two float32
 * roundings, and must not be contracted into one fused multiply-add, which GCC does by default under -march=native. */
#if defined(__GNUC__) && !defined(__clang__)
#define BCNP_NO_FMA_CONTRACTION __attribute__((optimize("fp-contract=off")))
#else
#define BCNP_NO_FMA_CONTRACTION
#endif

/* ---- float16 <-> float32, exact, round to nearest even (what numpy's astype(float16) does) -------------------- */

static inline float bcnp_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    float f;
    if (exp == 0x1F)
        bits = sign | 0x7F800000 | (man << 13);              /* inf, nan */
    else if (exp != 0)
        bits = sign | ((exp + 112) << 23) | (man << 13);     /* normal: rebias 15 -> 127 */
    else {                                                   /* zero or subnormal: man * 2^-24, exact */
        f = (float)man * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t bcnp_f32_to_f16(float f)
{
    uint32_t x, ax, sign;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000;
    ax = x & 0x7FFFFFFF;
    if (ax > 0x7F800000) return (uint16_t)(sign | 0x7E00);        /* nan */
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00);       /* >= 65520 rounds to inf */
    if (ax < 0x38800000) {                                        /* < 2^-14: a float16 subnormal or zero */
        /* adding 0.5 leaves an ulp of 2^-24 = the float16 subnormal step, so the float32 addition itself rounds
           to nearest even; the low bits of the sum are the float16 mantissa (1024 = the smallest normal). */
        float a, s;
        uint32_t sb;
        memcpy(&a, &ax, 4);
        s = a + 0.5f;
        memcpy(&sb, &s, 4);
        return (uint16_t)(sign | (sb - 0x3F000000));
    }
    /* normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even */
    ax += 0xC8000FFF + ((ax >> 13) & 1);
    return (uint16_t)(sign | (ax >> 13));
}

/* ---- quantize / dequantize one row --------------------------------------------------------------------------- */

enum { BCNP_OK = 0, BCNP_NONFINITE = 1, BCNP_SCALE_OVERFLOW = 2 };

/* 1/d, or 0 when d is 0 -- or so small (below 2^-128) that 1/d overflows: GGML leaves that case undefined; its
   float16 scale is 0 anyway, so the block is stored like a zero block. */
static inline float bcnp_inverse_scale(float d)
{
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    return isinf(id) ? 0.0f : id;
}

/* The first element that stopped a row (its index goes to *bad): BCNP_NONFINITE or BCNP_SCALE_OVERFLOW. */
BCNP_NO_FMA_CONTRACTION
static int bcnp_quantize_row_q8_0(const float *x, int64_t n, int8_t *q, uint16_t *d, int64_t *bad)
{
    for (int64_t b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f, dd, id;
        for (int j = 0; j < 32; j++) {
            if (!isfinite(xb[j])) { *bad = 32 * b + j; return BCNP_NONFINITE; }
            amax = fmaxf(amax, fabsf(xb[j]));
        }
        dd = amax / 127.0f;
        id = bcnp_inverse_scale(dd);
        d[b] = bcnp_f32_to_f16(dd);
        if ((d[b] & 0x7FFF) == 0x7C00) { *bad = 32 * b; return BCNP_SCALE_OVERFLOW; }
        for (int j = 0; j < 32; j++) {      /* roundf (half away from zero), in a form the compiler vectorizes */
            const float v = xb[j] * id, t = (float)(int)v;        /* |v| <= 127: truncation through int */
            q[32 * b + j] = (int8_t)(int)(t + copysignf((float)(fabsf(v - t) >= 0.5f), v));
        }
    }
    return BCNP_OK;
}

BCNP_NO_FMA_CONTRACTION
static int bcnp_quantize_row_q4_0(const float *x, int64_t n, uint8_t *q, uint16_t *d, int64_t *bad)
{
    for (int64_t b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
        /* m = the first element of largest magnitude, with its sign (numpy's argmax of |x|) */
        float amax = fabsf(xb[0]), m = xb[0], dd, id;
        for (int j = 0; j < 32; j++) {
            if (!isfinite(xb[j])) { *bad = 32 * b + j; return BCNP_NONFINITE; }
            if (fabsf(xb[j]) > amax) { amax = fabsf(xb[j]); m = xb[j]; }
        }
        dd = m / -8.0f;
        id = bcnp_inverse_scale(dd);
        d[b] = bcnp_f32_to_f16(dd);
        if ((d[b] & 0x7FFF) == 0x7C00) { *bad = 32 * b; return BCNP_SCALE_OVERFLOW; }
        for (int j = 0; j < 16; j++) {
            float lo = xb[j] * id, hi = xb[j + 16] * id;
            int c_lo = (int)(lo + 8.5f), c_hi = (int)(hi + 8.5f);   /* truncation, as GGML */
            q[16 * b + j] = (uint8_t)((c_lo < 15 ? c_lo : 15) | (c_hi < 15 ? c_hi : 15) << 4);
        }
    }
    return BCNP_OK;
}

static void bcnp_dequantize_row_q8_0(const int8_t *q, const uint16_t *d, int64_t n, float *y)
{
    for (int64_t b = 0; b < n / 32; b++) {
        const float db = bcnp_f16_to_f32(d[b]);
        for (int j = 0; j < 32; j++)
            y[32 * b + j] = (float)q[32 * b + j] * db;
    }
}

static void bcnp_dequantize_row_q4_0(const uint8_t *q, const uint16_t *d, int64_t n, float *y)
{
    for (int64_t b = 0; b < n / 32; b++) {
        const float db = bcnp_f16_to_f32(d[b]);
        for (int j = 0; j < 16; j++) {
            y[32 * b + j] = (float)((q[16 * b + j] & 0x0F) - 8) * db;
            y[32 * b + j + 16] = (float)((q[16 * b + j] >> 4) - 8) * db;
        }
    }
}

/* ---- the activation, quantized for the decode matvec ----------------------------------------------------------- */

/* x (n) -> xq int16 (n), dx (n/32): every block of 32 as integers times a float32 scale, dx = max|x_b| / limit
   (bcnp_activation_limit: 32767 or 127) and xq = round(x / dx) (ties away from zero), so
   |x - dx * xq| <= dx (1/2 + (limit + 1) 2^-24): the second term covers the float32 rounding of x / dx.  (Where
   dx is a float32 subnormal, max|x_b| < limit 2^-126, xq is clamped to the limit and the error can reach 2^-134 more; a
   block with dx = 0 becomes zeros.)  A block holding inf or nan gets dx = nan, so the matvec answers nan.
   For Q4_0 weights (q4_layout = 1) the blocks are grouped by four, and the group's 128 values are stored as four
   runs of 32 in the order the SIMD kernels take the 4-bit codes out of the group's 64 weight bytes read as 32
   little-endian 16-bit words: bits 0-3, 4-7, 8-11, 12-15 of word m are codes j, j + 16, j + 1, j + 17 of block m/8,
   j = 2 (m % 8) (see bcnp_q4_x_index).  A tail of fewer than four blocks keeps the natural order.
   bias (n/8 int32, Q4_0 only): -8 * (the sum of the 8 activations that meet the 4 weight bytes of a 32-bit lane):
   the starting value of the SIMD accumulators, so that sum(c * x) + bias = sum((c - 8) * x). */
static inline int64_t bcnp_q4_x_index(int64_t b, int j, int64_t nb)
{
    if (b >= nb - nb % 4) return 32 * b + j;
    return 128 * (b / 4) + 32 * ((j >> 4) + 2 * (j & 1)) + 8 * (b % 4) + ((j & 15) >> 1);
}

/* The limit for x rounded to x_bits-bit integers: 8 (Q4_0 weights, and an int4 model's Q8_0 lm_head) or 16. */
static inline int bcnp_activation_limit(int x_bits) { return x_bits == 8 ? 127 : 32767; }

#if defined(BCNP_AVX512)
/* One block of bcnp_quantize_activation, 32 lanes at a time: the same operations as the portable loop below
   (an IEEE division, truncation, the same half-away-from-zero step), so the same bits.  The portable loop took
   23 us for a 13B row of 5120 (4.5 ns a value, 56% of a 16-row matvec call); with this one and the run layout
   below by one permute, that call went from 41 to 16 us. */
static inline void bcnp_round_block(const float *xb, float db, int limit, int16_t *qb)
{
    const __m512 d = _mm512_set1_ps(db), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
    const __m512i hi = _mm512_set1_epi32(limit), lo = _mm512_set1_epi32(-limit);
    for (int h = 0; h < 2; h++) {
        const __m512 v = _mm512_div_ps(_mm512_loadu_ps(xb + 16 * h), d);
        const __m512 t = _mm512_cvtepi32_ps(_mm512_cvttps_epi32(v));
        const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), half, _CMP_GE_OQ);
        const __m512 step = _mm512_or_ps(_mm512_maskz_mov_ps(up, one), _mm512_and_ps(v, sign));
        const __m512i r = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvttps_epi32(_mm512_add_ps(t, step)), lo), hi);
        _mm256_storeu_si256((__m256i *)(qb + 16 * h), _mm512_cvtepi32_epi16(r));
    }
}
#else
static inline void bcnp_round_block(const float *xb, float db, int limit, int16_t *qb)
{
    for (int j = 0; j < 32; j++) {     /* roundf (half away from zero), in a form the compiler vectorizes */
        const float v = xb[j] / db, t = (float)(int)v;      /* |v| <= limit (1 + 2^-23) where db is normal */
        const int r = (int)(t + copysignf((float)(fabsf(v - t) >= 0.5f), v));
        qb[j] = (int16_t)(r > limit ? limit : r < -limit ? -limit : r);
    }
}
#endif

static void bcnp_quantize_activation(const float *x, int64_t n, int limit, int q4_layout, int16_t *xq, float *dx,
                                     int32_t *bias)
{
    const int64_t nb = n / 32;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        int16_t qb[32];
        uint32_t amax_bits = 0, u;     /* max |x| on the bits: ordered like the floats, and inf/nan are largest */
        float amax;
        for (int j = 0; j < 32; j++) {
            memcpy(&u, xb + j, 4);
            u &= 0x7FFFFFFF;
            amax_bits = u > amax_bits ? u : amax_bits;
        }
        memcpy(&amax, &amax_bits, 4);
        dx[b] = amax_bits < 0x7F800000 ? amax / (float)limit : NAN;
        if (dx[b] > 0.0f)
            bcnp_round_block(xb, dx[b], limit, qb);
        else
            memset(qb, 0, sizeof qb);
        if (q4_layout && b < nb - nb % 4) {
#if defined(BCNP_AVX512)
            /* codes 0, 2 .. 14 | 16 .. 30 | 1 .. 15 | 17 .. 31: a 16-byte piece of each of the group's four runs */
            const __m512i order = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                                   30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
            const __m512i runs = _mm512_permutexvar_epi16(order, _mm512_loadu_si512(qb));
            int16_t *dst = xq + 128 * (b / 4) + 8 * (b % 4);
            _mm_storeu_si128((__m128i *)dst, _mm512_castsi512_si128(runs));
            _mm_storeu_si128((__m128i *)(dst + 32), _mm512_extracti32x4_epi32(runs, 1));
            _mm_storeu_si128((__m128i *)(dst + 64), _mm512_extracti32x4_epi32(runs, 2));
            _mm_storeu_si128((__m128i *)(dst + 96), _mm512_extracti32x4_epi32(runs, 3));
#else
            for (int j = 0; j < 32; j++) xq[bcnp_q4_x_index(b, j, nb)] = qb[j];
#endif
        } else
            memcpy(xq + 32 * b, qb, sizeof qb);
    }
    if (q4_layout)
        for (int64_t g = 0; g < nb / 4; g++)
            for (int l = 0; l < 16; l++) {
                int32_t s = 0;
                for (int v = 0; v < 4; v++)
                    s += xq[128 * g + 32 * v + 2 * l] + xq[128 * g + 32 * v + 2 * l + 1];
                bias[16 * g + l] = -8 * s;
            }
}

/* ---- one row of the decode matvec: sum over blocks of d_w * dx * (integer dot product) ------------------------ */

/* The integer dot product of a block: |sum| <= 32 * 127 * 32767 < 2^31, exact in int32. */
static inline int32_t bcnp_block_dot_q8_0(const int8_t *w, const int16_t *xq)
{
    int32_t s = 0;
    for (int j = 0; j < 32; j++) s += (int32_t)w[j] * xq[j];
    return s;
}

static inline int32_t bcnp_block_dot_q4_0(const uint8_t *w, const int16_t *xq, int64_t b, int64_t nb)
{
    int32_t s = 0;
    for (int j = 0; j < 16; j++)
        s += ((w[j] & 0x0F) - 8) * xq[bcnp_q4_x_index(b, j, nb)] + ((w[j] >> 4) - 8) * xq[bcnp_q4_x_index(b, j + 16, nb)];
    return s;
}

/* The portable kernels, and the specification of the SIMD ones: those add the same block terms in another order. */
static float bcnp_dot_q8_0_scalar(const int8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)
{
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++)
        sum += bcnp_f16_to_f32(d[b]) * dx[b] * (float)bcnp_block_dot_q8_0(w + 32 * b, xq + 32 * b);
    return sum;
}

static float bcnp_dot_q4_0_scalar(const uint8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)
{
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++)
        sum += bcnp_f16_to_f32(d[b]) * dx[b] * (float)bcnp_block_dot_q4_0(w + 16 * b, xq, b, nb);
    return sum;
}

#if defined(BCNP_AVX512)
/* Scales of blocks b..b+count-1 (count <= 16) times the activation's: one float per block. */
static inline __m512 bcnp_block_scales16(const uint16_t *d, const float *dx, int64_t count)
{
    const __mmask16 m = (__mmask16)(count >= 16 ? 0xFFFF : (1u << count) - 1);
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, d)), _mm512_maskz_loadu_ps(m, dx));
}
#endif

#if defined(BCNP_AVX2)
static inline float bcnp_hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 bcnp_block_scales8(const uint16_t *d, const float *dx)
{
    return _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d)), _mm256_loadu_ps(dx));
}
#endif

static inline float bcnp_dot_q8_0(const int8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)
{
#if defined(BCNP_AVX512)
    /* One block per step: its 32 codes widened to int16, vpdpwssd sums their products with x in pairs into 16 int32
       lanes, all of block b, which meet the block's scale there.  Prefetch: see bcnp_dot_q4_0. */
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ) {
        const int64_t count = nb - b < 16 ? nb - b : 16;
        float s[16];
        _mm512_storeu_ps(s, bcnp_block_scales16(d + b, dx + b, count));
        for (int64_t k = 0; k < count; k++, b++) {
            if (k & 1) _mm_prefetch((const char *)(w + 32 * b + 1024), _MM_HINT_T0);
            const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + 32 * b)));
            const __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xq + 32 * b));
            if (k & 1) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(s[k]), acc1);
            else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(s[k]), acc0);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(BCNP_AVX2)
    /* One block per step, in two halves of 16 codes widened to int16; vpmaddwd sums products in pairs. */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; ) {
        const __m256 s = bcnp_block_scales8(d + b, dx + b);
        for (int k = 0; k < 8; k++, b++) {
            if (k & 1) _mm_prefetch((const char *)(w + 32 * b + 1024), _MM_HINT_T0);       /* see bcnp_dot_q4_0 */
            const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 32 * b)));
            const __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 32 * b + 16)));
            const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + 32 * b))),
                                                 _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32 * b + 16))));
            const __m256 sk = _mm256_permutevar8x32_ps(s, _mm256_set1_epi32(k));
            if (k & 1) acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sk, acc1);
            else acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sk, acc0);
        }
    }
    return bcnp_hsum256(_mm256_add_ps(acc0, acc1)) + bcnp_dot_q8_0_scalar(w + 32 * b, d + b, xq + 32 * b, dx + b, nb - b);
#else
    return bcnp_dot_q8_0_scalar(w, d, xq, dx, nb);
#endif
}

/* Blocks b..nb-1 added to sum one by one: the SIMD kernels' tail (one function, so that the batched kernels round
   exactly like the single-vector one). */
static inline float bcnp_dot_q4_0_tail(const uint8_t *w, const uint16_t *d, const int16_t *xq, const float *dx,
                                       int64_t b, int64_t nb, float sum)
{
    for (; b < nb; b++)
        sum += bcnp_f16_to_f32(d[b]) * dx[b] * (float)bcnp_block_dot_q4_0(w + 16 * b, xq, b, nb);
    return sum;
}

static float bcnp_dot_q4_0(const uint8_t *w, const uint16_t *d, const int16_t *xq, const float *dx,
                           const int32_t *bias, int64_t nb)
{
    int64_t b = 0;
    float sum = 0.0f;
#if defined(BCNP_AVX512)
    /* Four blocks (64 bytes = 128 codes) per step, read as 32 16-bit words: the four nibbles of each word, kept as
       int16 by masks and shifts, meet the four runs of x (see quantize_activation); vpdpwssd sums the products in
       pairs, so 32-bit lanes 4k..4k+3 belong to block b+k.  The loop does about twice the work per byte of an
       int8-activation kernel, and then the hardware prefetcher alone left 25% of the bandwidth unused (measured on
       2 Zen 4 cores): a software prefetch 1 KiB ahead brings it back. */
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512i nibble = _mm512_set1_epi16(0x0F);
    const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    while (nb - b >= 4) {
        const int64_t count = nb - b < 16 ? nb - b : 16;
        const __m512 s = bcnp_block_scales16(d + b, dx + b, count);
        for (int64_t p = 0; p + 4 <= count; p += 4, b += 4) {
            _mm_prefetch((const char *)(w + 16 * b + 1024), _MM_HINT_T0);
            const __m512i wv = _mm512_loadu_si512(w + 16 * b);
            const int16_t *xg = xq + 32 * b;
            __m512i dot = _mm512_loadu_si512(bias + 4 * b);
            dot = _mm512_dpwssd_epi32(dot, _mm512_and_si512(wv, nibble), _mm512_loadu_si512(xg));
            dot = _mm512_dpwssd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(wv, 4), nibble), _mm512_loadu_si512(xg + 32));
            dot = _mm512_dpwssd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(wv, 8), nibble), _mm512_loadu_si512(xg + 64));
            dot = _mm512_dpwssd_epi32(dot, _mm512_srli_epi16(wv, 12), _mm512_loadu_si512(xg + 96));
            const __m512 sp = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32((int)p)), s);
            if (p & 4) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sp, acc1);
            else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sp, acc0);
        }
    }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(BCNP_AVX2)
    /* Two blocks (32 bytes) per step, half a group of four: its 16 words meet words 16h..16h+15 of each run of x;
       lanes 0-3 block b, 4-7 block b+1.  The software prefetch 1 KiB ahead, as in the AVX-512 loop: an AVX2 build
       on this Xeon, the 10 int4 linears of 2 13B layers on 2 threads, 24-36 ms with it against 31-42 ms without
       (three alternated rounds; the int8 lm_head 17-21 against 21.5-26 ms). */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i nibble = _mm256_set1_epi16(0x0F);
    const __m256i half = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
    for (; b + 8 <= nb - nb % 4; ) {
        const __m256 s = bcnp_block_scales8(d + b, dx + b);
        for (int k = 0; k < 8; k += 2, b += 2) {
            const int16_t *xg = xq + 128 * (b / 4) + 16 * (b % 4 / 2);
            if (k % 4 == 0) _mm_prefetch((const char *)(w + 16 * b + 1024), _MM_HINT_T0);     /* as AVX-512 */
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 16 * b));
            __m256i dot = _mm256_loadu_si256((const __m256i *)(bias + 4 * b));
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_and_si256(wv, nibble),
                                                          _mm256_loadu_si256((const __m256i *)xg)));
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(wv, 4), nibble),
                                                          _mm256_loadu_si256((const __m256i *)(xg + 32))));
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(wv, 8), nibble),
                                                          _mm256_loadu_si256((const __m256i *)(xg + 64))));
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_srli_epi16(wv, 12),
                                                          _mm256_loadu_si256((const __m256i *)(xg + 96))));
            const __m256 sk = _mm256_permutevar8x32_ps(s, _mm256_add_epi32(half, _mm256_set1_epi32(k)));
            if (k & 2) acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sk, acc1);
            else acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sk, acc0);
        }
    }
    sum = bcnp_hsum256(_mm256_add_ps(acc0, acc1));
#endif
    return bcnp_dot_q4_0_tail(w, d, xq, dx, b, nb, sum);
}

/* ---- memory bandwidth probe: a plain streaming read ------------------------------------------------------------ */

static uint64_t bcnp_sum_words(const uint64_t *a, int64_t n)
{
    uint64_t s = 0;
    for (int64_t i = 0; i < n; i++) s += a[i];
    return s;
}

#endif
