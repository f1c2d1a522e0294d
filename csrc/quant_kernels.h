/* Block quantization kernels for bcnp._quant: GGML Q8_0 / Q4_0 on flat arrays (SPEC section 4).
 *
 * A row of n weights (n a multiple of 32) is n/32 blocks; block b has a float16 scale d[b] and 32 codes:
 *   Q8_0: int8 q[32*b + j],                            weight = q * d
 *   Q4_0: uint8 byte q[16*b + j] = c_j | c_{j+16} << 4,  weight = (c - 8) * d,  c in 0..15
 *
 * The decode matvec y = W x works the way llama.cpp's does: x is itself quantized per 32-block to int8 with a
 * float32 scale dx (quantize_activation), every block contributes the exact integer dot product of its codes with
 * the int8 activation, times d_w * dx, and the float32 products are summed.  The result differs from
 * dequantize(W) @ x only by the rounding of x to int8 (at most dx/2 per element) and by the float32 sum.
 *
 * Three implementations of the dot products: AVX-512 VNNI (vpdpbusd: 64 unsigned x signed byte products summed
 * in fours per instruction), AVX2 (vpmaddubsw + vpmaddwd) and portable C.  The compiler flags pick one
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

/* x (n) -> xq int8 (n), dx (n/32): Q8_0 of x with a float32 scale.  A block holding inf or nan gets dx = nan, so
   the matvec answers nan as a float product would.
   For Q4_0 weights (q4_layout = 1) the blocks are grouped by four and each group stores the first halves (elements
   0..15) of its four blocks, then their second halves: exactly the order of the low and then the high nibbles of
   the group's 64 weight bytes, so the SIMD kernels line x up with a 64-byte load of weights without shuffles.  A
   tail of fewer than four blocks keeps the natural order.
   bias (n/8 int32, Q4_0 only): -8 * (the sum of the 4 activations under the low nibbles of each 4 weight bytes plus
   the 4 under their high nibbles): the starting value of the SIMD accumulators, so that sum(c * x) + bias =
   sum((c - 8) * x). */
static inline int64_t bcnp_q4_x_index(int64_t b, int j, int64_t nb)
{
    if (b >= nb - nb % 4) return 32 * b + j;
    return 128 * (b / 4) + (j < 16 ? 0 : 64) + 16 * (b % 4) + (j & 15);
}

BCNP_NO_FMA_CONTRACTION
static void bcnp_quantize_activation(const float *x, int64_t n, int q4_layout, int8_t *xq, float *dx, int32_t *bias)
{
    const int64_t nb = n / 32;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        int8_t qb[32];
        uint32_t amax_bits = 0, u;     /* max |x| on the bits: ordered like the floats, and inf/nan are largest */
        float amax, id;
        for (int j = 0; j < 32; j++) {
            memcpy(&u, xb + j, 4);
            u &= 0x7FFFFFFF;
            amax_bits = u > amax_bits ? u : amax_bits;
        }
        memcpy(&amax, &amax_bits, 4);
        if (amax_bits < 0x7F800000) {
            dx[b] = amax / 127.0f;
            id = bcnp_inverse_scale(dx[b]);
            for (int j = 0; j < 32; j++) {     /* to nearest, ties away from zero: written so it vectorizes */
                const float v = xb[j] * id;
                qb[j] = (int8_t)(int)(v + copysignf(0.5f, v));
            }
        } else {
            dx[b] = NAN;
            memset(qb, 0, 32);
        }
        if (q4_layout && b < nb - nb % 4) {
            memcpy(xq + 128 * (b / 4) + 16 * (b % 4), qb, 16);
            memcpy(xq + 128 * (b / 4) + 64 + 16 * (b % 4), qb + 16, 16);
        } else
            memcpy(xq + 32 * b, qb, 32);
    }
    if (q4_layout)
        for (int64_t g = 0; g < nb / 4; g++)
            for (int l = 0; l < 16; l++) {
                const int8_t *lo = xq + 128 * g + 4 * l, *hi = lo + 64;
                bias[16 * g + l] = -8 * (lo[0] + lo[1] + lo[2] + lo[3] + hi[0] + hi[1] + hi[2] + hi[3]);
            }
}

/* ---- one row of the decode matvec: sum over blocks of d_w * dx * (integer dot product) ------------------------ */

static inline int32_t bcnp_block_dot_q8_0(const int8_t *w, const int8_t *xq)
{
    int32_t s = 0;
    for (int j = 0; j < 32; j++) s += (int32_t)w[j] * xq[j];
    return s;
}

static inline int32_t bcnp_block_dot_q4_0(const uint8_t *w, const int8_t *xq, int64_t b, int64_t nb)
{
    int32_t s = 0;
    for (int j = 0; j < 16; j++)
        s += ((w[j] & 0x0F) - 8) * xq[bcnp_q4_x_index(b, j, nb)] + ((w[j] >> 4) - 8) * xq[bcnp_q4_x_index(b, j + 16, nb)];
    return s;
}

#if defined(BCNP_AVX512)
static inline float bcnp_hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

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

static float bcnp_dot_q8_0(const int8_t *w, const uint16_t *d, const int8_t *xq, const float *dx, int64_t nb)
{
    int64_t b = 0;
    float sum = 0.0f;
#if defined(BCNP_AVX512)
    /* Two blocks (64 bytes) per step.  vpdpbusd multiplies unsigned by signed bytes: |w| times x carrying w's
       sign.  Its 16 int32 sums are blocks b, b+1 in lanes 0-7, 8-15; they meet their scales there. */
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512i half = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    while (nb - b >= 2) {
        const int64_t count = nb - b < 16 ? nb - b : 16;
        const __m512 s = bcnp_block_scales16(d + b, dx + b, count);
        for (int64_t p = 0; p + 2 <= count; p += 2, b += 2) {
            const __m512i wv = _mm512_loadu_si512(w + 32 * b), xv = _mm512_loadu_si512(xq + 32 * b);
            const __m512i xs = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), xv);
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wv), xs);
            const __m512 sp = _mm512_permutexvar_ps(_mm512_add_epi32(half, _mm512_set1_epi32((int)p)), s);
            if (p & 2) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sp, acc1);
            else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sp, acc0);
        }
    }
    sum = bcnp_hsum512(_mm512_add_ps(acc0, acc1));
#elif defined(BCNP_AVX2)
    /* One block (32 bytes) per step: vpmaddubsw(|w|, x with w's sign) then vpmaddwd(1) gives 8 int32 sums. */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (; b + 8 <= nb; ) {
        const __m256 s = bcnp_block_scales8(d + b, dx + b);
        for (int k = 0; k < 8; k++, b++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * b));
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
            const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
            const __m256 sk = _mm256_permutevar8x32_ps(s, _mm256_set1_epi32(k));
            if (k & 1) acc1 = _mm256_fmadd_ps(dot, sk, acc1);
            else acc0 = _mm256_fmadd_ps(dot, sk, acc0);
        }
    }
    sum = bcnp_hsum256(_mm256_add_ps(acc0, acc1));
#endif
    for (; b < nb; b++)
        sum += bcnp_f16_to_f32(d[b]) * dx[b] * (float)bcnp_block_dot_q8_0(w + 32 * b, xq + 32 * b);
    return sum;
}

static float bcnp_dot_q4_0(const uint8_t *w, const uint16_t *d, const int8_t *xq, const float *dx,
                           const int32_t *bias, int64_t nb)
{
    int64_t b = 0;
    float sum = 0.0f;
#if defined(BCNP_AVX512)
    /* Four blocks (64 bytes = 128 codes) per step: the low nibbles meet the first halves of the four blocks of x,
       the high nibbles the second halves (see quantize_activation); lanes 4k..4k+3 belong to block b+k. */
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    while (nb - b >= 4) {
        const int64_t count = nb - b < 16 ? nb - b : 16;
        const __m512 s = bcnp_block_scales16(d + b, dx + b, count);
        for (int64_t p = 0; p + 4 <= count; p += 4, b += 4) {
            const __m512i wv = _mm512_loadu_si512(w + 16 * b);
            const __m512i lo = _mm512_and_si512(wv, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nibble);
            __m512i dot = _mm512_loadu_si512(bias + 4 * b);
            dot = _mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(xq + 32 * b));
            dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(xq + 32 * b + 64));
            const __m512 sp = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32((int)p)), s);
            if (p & 4) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sp, acc1);
            else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sp, acc0);
        }
    }
    sum = bcnp_hsum512(_mm512_add_ps(acc0, acc1));
#elif defined(BCNP_AVX2)
    /* Two blocks (32 bytes) per step, half a group of four: lanes 0-3 block b, 4-7 block b+1. */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i half = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
    for (; b + 8 <= nb - nb % 4; ) {
        const __m256 s = bcnp_block_scales8(d + b, dx + b);
        for (int k = 0; k < 8; k += 2, b += 2) {
            /* blocks b, b+1 are the first or second half of their group of four */
            const int8_t *xg = xq + 128 * (b / 4) + 32 * (b % 4 / 2);
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 16 * b));
            const __m256i lo = _mm256_and_si256(wv, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), nibble);
            const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xg)),
                                                 _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xg + 64))));
            const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(p16, ones),
                                                 _mm256_loadu_si256((const __m256i *)(bias + 4 * b)));
            const __m256 sk = _mm256_permutevar8x32_ps(s, _mm256_add_epi32(half, _mm256_set1_epi32(k)));
            if (k & 2) acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sk, acc1);
            else acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sk, acc0);
        }
    }
    sum = bcnp_hsum256(_mm256_add_ps(acc0, acc1));
#endif
    for (; b < nb; b++)
        sum += bcnp_f16_to_f32(d[b]) * dx[b] * (float)bcnp_block_dot_q4_0(w + 16 * b, xq, b, nb);
    return sum;
}

/* ---- memory bandwidth probe: a plain streaming read ------------------------------------------------------------ */

static uint64_t bcnp_sum_words(const uint64_t *a, int64_t n)
{
    uint64_t s = 0;
    for (int64_t i = 0; i < n; i++) s += a[i];
    return s;
}

#endif
