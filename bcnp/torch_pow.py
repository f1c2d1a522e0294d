"""torch's float32 `pow` on the CPU, value for value: SLEEF's `powf_u10` as built with FMA (AVX2, AVX-512, NEON).

Why: Baichuan-7B-style RoPE computes its frequency table as `1.0 / (base ** (torch.arange(0, dim, 2).float() /
dim))`, and that float32 `pow` is SLEEF's, specified to 1 ulp, not correctly rounded. NumPy's float32 pow is no
substitute: it depends on the machine (on AVX-512 builds, SVML's: at head_dim 128 it differed from torch's table in
9 of 64 values, 1-2 ulp, and the logits drifted linearly with position, 7.4e-5 scaled at 2048 positions at
Baichuan-7B's widths; on an AVX2 Zen 3 it agreed). At head_dim 128 SLEEF's double-float result is the correctly
rounded power in all 64 values (tests/test_model.py), and a float64 formula rounded once differs in 19 (its
division is not float32's). Baichuan2-7B's checkpoint stores no table, so bcnp recomputes SLEEF's, wherever it
runs: the double-float algorithm of `xpowf` (logkf, expkf; src/libm/sleefsimdsp.c and
src/common/df.h of SLEEF 3), one float32 operation at a time, with every fused multiply-add rounded once from
the exact value. A float32 operation of NumPy scalars rounds exactly as the SIMD instruction does.
"""
import math
from fractions import Fraction
from functools import lru_cache

import numpy as np

f32 = np.float32


def rounded(r):
    """The float32 nearest the exact rational r (ties to even), without double rounding through float64."""
    near = f32(float(r))
    if Fraction(float(near)) == r:
        return near
    other = np.nextafter(near, f32(math.inf) if r > Fraction(float(near)) else f32(-math.inf))
    a, b = abs(Fraction(float(near)) - r), abs(Fraction(float(other)) - r)
    if a != b:
        return near if a < b else other
    return near if int(near.view(np.int32)) % 2 == 0 else other


def fma(a, b, c):
    """a·b + c rounded once, as vfmadd."""
    return rounded(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def fms(a, b, c):
    """a·b − c rounded once (SLEEF's vfmapn)."""
    return rounded(Fraction(float(a)) * Fraction(float(b)) - Fraction(float(c)))


def fnma(a, b, c):
    """−a·b + c rounded once (SLEEF's vfmanp)."""
    return rounded(Fraction(float(c)) - Fraction(float(a)) * Fraction(float(b)))


# --- double-float arithmetic (df.h): a value is a pair (hi, lo) of float32 ---------------------------------------

def add2_ff(x, y):
    s = x + y
    v = s - x
    return s, (x - (s - v)) + (y - v)


def add2_df_f(x, y):
    s = x[0] + y
    v = s - x[0]
    return s, ((x[0] - (s - v)) + (y - v)) + x[1]


def add2_df_df(x, y):
    s = x[0] + y[0]
    v = s - x[0]
    return s, ((x[0] - (s - v)) + (y[0] - v)) + (x[1] + y[1])


def add_df_df(x, y):            # |x| >= |y|
    s = x[0] + y[0]
    return s, (((x[0] - s) + y[0]) + x[1]) + y[1]


def add_f_df(x, y):
    s = x + y[0]
    return s, ((x - s) + y[0]) + y[1]


def normalize(x):
    s = x[0] + x[1]
    return s, (x[0] - s) + x[1]


def scale(x, s):
    return x[0] * s, x[1] * s


def div_df_df(n, d):
    t = f32(1) / d[0]
    s = n[0] * t
    u = fms(t, n[0], s)
    v = fnma(d[1], t, fnma(d[0], t, f32(1)))
    return s, fma(s, v, fma(n[1], t, u))


def square(x):
    s = x[0] * x[0]
    return s, fma(x[0] + x[0], x[1], fms(x[0], x[0], s))


def mul_df_df(x, y):
    s = x[0] * y[0]
    return s, fma(x[0], y[1], fma(x[1], y[0], fms(x[0], y[0], s)))


def mul_df_f(x, y):
    s = x[0] * y
    return s, fma(x[1], y, fms(x[0], y, s))


# --- SLEEF's logkf, expkf and xpowf for positive finite x ---------------------------------------------------------

LN2 = (f32(0.69314718246459960938), f32(-1.904654323148236017e-09))
L2U, L2L = f32(0.693145751953125), f32(1.428606765330187045e-06)
R_LN2 = f32(1.442695040888963407359924681001892137426645954152985934135449406931)


def logkf(d):
    """log(d) as a double-float, d a positive normal float32."""
    e = math.frexp(float(d * f32(1.0 / 0.75)))[1] - 1           # ilogb(d / 0.75): m = d·2^-e in [0.75, 1.5)
    m = f32(math.ldexp(float(d), -e))
    x = div_df_df(add2_ff(f32(-1), m), add2_ff(f32(1), m))
    x2 = square(x)
    t = f32(0.240320354700088500976562)
    t = fma(t, x2[0], f32(0.285112679004669189453125))
    t = fma(t, x2[0], f32(0.400007992982864379882812))
    c = (f32(0.66666662693023681640625), f32(3.69183861259614332084311e-09))
    s = mul_df_f(LN2, f32(e))
    s = add_df_df(s, scale(x, f32(2)))
    return add_df_df(s, mul_df_df(mul_df_df(x2, x), add2_df_df(mul_df_f(x2, t), c)))


def expkf(d):
    """exp of a double-float, as a float32 (arguments of a table: no overflow or underflow handling needed)."""
    q = int(np.rint((d[0] + d[1]) * R_LN2))
    s = add2_df_f(d, f32(q) * -L2U)
    s = normalize(add2_df_f(s, f32(q) * -L2L))
    u = f32(0.00136324646882712841033936)
    for c in (0.00836596917361021041870117, 0.0416710823774337768554688, 0.166665524244308471679688,
              0.499999850988388061523438):
        u = fma(u, s[0], f32(c))
    t = add_f_df(f32(1), add_df_df(s, mul_df_f(square(s), u)))
    return f32(math.ldexp(float(t[0] + t[1]), q))


def powf(x, y):
    """torch.pow(float32 x, float32 y) on the CPU for x > 0 and moderate |y·log x| (a RoPE table's range)."""
    return expkf(mul_df_f(logkf(f32(x)), f32(y)))


@lru_cache(maxsize=None)
def rope_inv_freq_table(theta, head_dim):
    """`1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))` as torch computes it, a tuple."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / f32(head_dim)
    return tuple(float(f32(1) / powf(f32(theta), y)) for y in exponents)
