// GPU kernels of bcnp/gpu/kernels.py, compiled at run time by cupy.RawModule (NVRTC; nvcc compiles it too).
//
// Weights are rows of n_pad values (n_pad a multiple of 32) in the flat layouts of SPEC section 4:
//   Q8_0  int8 codes q, one float16 scale d per block of 32:        w = q * d
//   Q4_0  16 bytes per block, byte j = code j | code (j + 16) << 4:  w = (code - 8) * d
//   F16   float16 values, no scales (the unquantized weights of a float16 model)
//
// Every kernel has a NumPy twin in bcnp/gpu/kernels.py that does the same float32 operations in the same order
// (the tests compare them), so the arithmetic here is spelled out: __fmul_rn / __fadd_rn stop the compiler from
// fusing a multiply and an add into one FMA, whose single rounding NumPy could not reproduce.
//
// No #include: float16 travels as its bits (unsigned short) and is converted with PTX `cvt`, as cuda_fp16.h
// itself does, so the file needs no headers under NVRTC.

#define ROWS 4     // rows per warp in the matvecs: each x value read from cache serves ROWS rows
#define WARPS 2    // warps per block: small blocks spread a 5120-row matrix evenly over all SMs

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Byte k of a word as the float 2^23 + byte: the byte becomes the low mantissa bits of 0x4B000000. Subtracting
// 2^23 (+ the code offset) then gives the code exactly, with integer ops instead of the slower int->float unit.
__device__ __forceinline__ float byte_as_float(unsigned int word, int k) {
    return __int_as_float(0x4B000000u | ((word >> (8 * k)) & 0xFFu));
}

// Codes of 4 consecutive int8 values: flip the sign bits so each byte is q + 128, then subtract 2^23 + 128.
__device__ __forceinline__ float4 q8_values(unsigned int word) {
    word ^= 0x80808080u;
    return make_float4(byte_as_float(word, 0) - 8388736.0f, byte_as_float(word, 1) - 8388736.0f,
                       byte_as_float(word, 2) - 8388736.0f, byte_as_float(word, 3) - 8388736.0f);
}

// 4 nibbles (one per byte of `nibbles`, already masked to 0..15) minus the Q4_0 offset 8: subtract 2^23 + 8.
__device__ __forceinline__ float4 q4_values(unsigned int nibbles) {
    return make_float4(byte_as_float(nibbles, 0) - 8388616.0f, byte_as_float(nibbles, 1) - 8388616.0f,
                       byte_as_float(nibbles, 2) - 8388616.0f, byte_as_float(nibbles, 3) - 8388616.0f);
}

__device__ __forceinline__ float4 f16_values(uint2 halves) {     // little-endian: the low half comes first
    return make_float4(half_to_float((unsigned short)(halves.x & 0xFFFFu)),
                       half_to_float((unsigned short)(halves.x >> 16)),
                       half_to_float((unsigned short)(halves.y & 0xFFFFu)),
                       half_to_float((unsigned short)(halves.y >> 16)));
}

// ((v0 x0 + v1 x1) + v2 x2) + v3 x3, continuing the running sum s (s = 0 starts a new one)
__device__ __forceinline__ float dot4(float s, float4 v, float4 x) {
    s = __fadd_rn(s, __fmul_rn(v.x, x.x));
    s = __fadd_rn(s, __fmul_rn(v.y, x.y));
    s = __fadd_rn(s, __fmul_rn(v.z, x.z));
    return __fadd_rn(s, __fmul_rn(v.w, x.w));
}

// The sum of v over the 32 lanes of a warp, by halving: lane i adds lane i ^ 16, then i ^ 8, ... (every lane
// ends with the same value: a + b == b + a in floating point).
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2)
        v = __fadd_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
    return v;
}

// --- decode: y = W x for one token --------------------------------------------------------------------------------
//
// Memory-bound: each weight byte is read once, 4 bytes per lane per row, so a warp reads 128 contiguous bytes of
// each of its ROWS rows per step. x (float32, n_pad values, zero beyond in_features) is read through the cache as
// float4: at most 55 KB, the same for every row, so it stays in L1/L2 while the weights stream past.
// Lane `lane` of step `s` takes word w = 32 s + lane of each row. Rows past the end repeat the last row (their
// loads stay in bounds) and are not stored.
//
// Per lane and row: acc += d * (sum of the word's products), words in step order; then warp_sum(acc).
// One template, three formats (how a word is read) and three endings:
//   matvec_<format>          y = W x
//   matvec_<format>_add      y = r + W x                      (the residual connection, saving a launch)
//   matvec_<format>_swiglu   y = silu(W_gate x) * (W_up x)    (W = gate, U = up: two weights, one pass over x)

// Q8_0: word w holds values 4w .. 4w+3 of block w / 8.
struct Q8 {
    const unsigned int* __restrict__ q;                  // (rows, n_pad / 4) words
    const unsigned short* __restrict__ d;                // (rows, n_pad / 32) float16
    int words, blocks;
    __device__ Q8(const unsigned int* q_, const unsigned short* d_, int n_pad)
        : q(q_), d(d_), words(n_pad / 4), blocks(n_pad / 32) {}
    typedef float4 X;
    __device__ X x_for(const float4* x4, int w) const { return __ldg(x4 + w); }
    __device__ float term(long long row, int w, const X& xv) const {
        return __fmul_rn(dot4(0.0f, q8_values(q[row * words + w]), xv), half_to_float(d[row * blocks + w / 8]));
    }
};

// Q4_0: word w = 4 bytes at byte 4m of block b (b = w / 4, m = w % 4): its low nibbles are values 4m .. 4m+3 of
// the block, its high nibbles values 16 + 4m .. 16 + 4m + 3. Sum order: the 4 low, then the 4 high.
struct Q4 {
    const unsigned int* __restrict__ q;                  // (rows, n_pad / 8) words
    const unsigned short* __restrict__ d;                // (rows, n_pad / 32) float16
    int words, blocks;
    __device__ Q4(const unsigned int* q_, const unsigned short* d_, int n_pad)
        : q(q_), d(d_), words(n_pad / 8), blocks(n_pad / 32) {}
    struct X { float4 low, high; };
    __device__ X x_for(const float4* x4, int w) const {
        const int b = w / 4, m = w % 4;
        return X{__ldg(x4 + 8 * b + m), __ldg(x4 + 8 * b + 4 + m)};      // x[32b + 4m ..], x[32b + 16 + 4m ..]
    }
    __device__ float term(long long row, int w, const X& xv) const {
        const unsigned int word = q[row * words + w];
        const float s = dot4(dot4(0.0f, q4_values(word & 0x0F0F0F0Fu), xv.low), q4_values((word >> 4) & 0x0F0F0F0Fu),
                             xv.high);
        return __fmul_rn(s, half_to_float(d[row * blocks + w / 4]));
    }
};

// F16: word w = 4 float16 values 4w .. 4w+3 (8 bytes); no scale: the term is the word's sum.
struct F16 {
    const uint2* __restrict__ wt;                        // (rows, n_pad / 4) words
    int words;
    __device__ F16(const uint2* wt_, int n_pad) : wt(wt_), words(n_pad / 4) {}
    typedef float4 X;
    __device__ X x_for(const float4* x4, int w) const { return __ldg(x4 + w); }
    __device__ float term(long long row, int w, const X& xv) const {
        return dot4(0.0f, f16_values(wt[row * words + w]), xv);
    }
};

enum Ending { PLAIN, ADD, SWIGLU };

template <Ending E, typename F>
__device__ void matvec(const F& W, const F& U, const float* __restrict__ x, const float* __restrict__ r,
                       float* __restrict__ y, int rows) {
    const int lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * WARPS + threadIdx.x / 32) * ROWS;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float acc[ROWS], acc_u[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; i++) acc[i] = acc_u[i] = 0.0f;

#pragma unroll 4
    for (int w = lane; w < W.words; w += 32) {
        const typename F::X xv = W.x_for(x4, w);
#pragma unroll
        for (int i = 0; i < ROWS; i++) {
            const long long row = min(row0 + i, rows - 1);
            acc[i] = __fadd_rn(acc[i], W.term(row, w, xv));
            if (E == SWIGLU) acc_u[i] = __fadd_rn(acc_u[i], U.term(row, w, xv));
        }
    }
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        const float sum = warp_sum(acc[i]);
        const float sum_u = E == SWIGLU ? warp_sum(acc_u[i]) : 0.0f;
        if (lane == 0 && row0 + i < rows) {
            const int row = row0 + i;
            if (E == PLAIN) y[row] = sum;
            if (E == ADD) y[row] = __fadd_rn(r[row], sum);
            if (E == SWIGLU) y[row] = __fmul_rn(__fdiv_rn(sum, __fadd_rn(1.0f, expf(-sum))), sum_u);
        }
    }
}

extern "C" __global__ void matvec_q8_0(const unsigned int* q, const unsigned short* d, const float* x, float* y,
                                       int rows, int n_pad) {
    const Q8 W(q, d, n_pad);
    matvec<PLAIN>(W, W, x, nullptr, y, rows);
}

extern "C" __global__ void matvec_q4_0(const unsigned int* q, const unsigned short* d, const float* x, float* y,
                                       int rows, int n_pad) {
    const Q4 W(q, d, n_pad);
    matvec<PLAIN>(W, W, x, nullptr, y, rows);
}

extern "C" __global__ void matvec_f16(const uint2* wt, const float* x, float* y, int rows, int n_pad) {
    const F16 W(wt, n_pad);
    matvec<PLAIN>(W, W, x, nullptr, y, rows);
}

extern "C" __global__ void matvec_q8_0_add(const unsigned int* q, const unsigned short* d, const float* x,
                                           const float* r, float* y, int rows, int n_pad) {
    const Q8 W(q, d, n_pad);
    matvec<ADD>(W, W, x, r, y, rows);
}

extern "C" __global__ void matvec_q4_0_add(const unsigned int* q, const unsigned short* d, const float* x,
                                           const float* r, float* y, int rows, int n_pad) {
    const Q4 W(q, d, n_pad);
    matvec<ADD>(W, W, x, r, y, rows);
}

extern "C" __global__ void matvec_f16_add(const uint2* wt, const float* x, const float* r, float* y, int rows,
                                          int n_pad) {
    const F16 W(wt, n_pad);
    matvec<ADD>(W, W, x, r, y, rows);
}

extern "C" __global__ void matvec_q8_0_swiglu(const unsigned int* q, const unsigned short* d,
                                              const unsigned int* q_up, const unsigned short* d_up, const float* x,
                                              float* y, int rows, int n_pad) {
    matvec<SWIGLU>(Q8(q, d, n_pad), Q8(q_up, d_up, n_pad), x, nullptr, y, rows);
}

extern "C" __global__ void matvec_q4_0_swiglu(const unsigned int* q, const unsigned short* d,
                                              const unsigned int* q_up, const unsigned short* d_up, const float* x,
                                              float* y, int rows, int n_pad) {
    matvec<SWIGLU>(Q4(q, d, n_pad), Q4(q_up, d_up, n_pad), x, nullptr, y, rows);
}

extern "C" __global__ void matvec_f16_swiglu(const uint2* wt, const uint2* wt_up, const float* x, float* y,
                                             int rows, int n_pad) {
    matvec<SWIGLU>(F16(wt, n_pad), F16(wt_up, n_pad), x, nullptr, y, rows);
}

// --- prefill: W to float32 or float16, for cuBLAS -------------------------------------------------------------------
//
// One thread per word; out is (rows, n_pad). q * d is exact in float32 (8-bit code times 11-bit scale), so the
// float32 output equals bcnp.quant.dequantize bit for bit and the float16 output is that value rounded to nearest.

__device__ __forceinline__ void store4(float* out, float4 v) { *reinterpret_cast<float4*>(out) = v; }

__device__ __forceinline__ void store4(unsigned short* out, float4 v) {
    uint2 h;
    h.x = (unsigned int)float_to_half(v.x) | ((unsigned int)float_to_half(v.y) << 16);
    h.y = (unsigned int)float_to_half(v.z) | ((unsigned int)float_to_half(v.w) << 16);
    *reinterpret_cast<uint2*>(out) = h;
}

__device__ __forceinline__ float4 scale4(float4 v, float d) {
    return make_float4(__fmul_rn(v.x, d), __fmul_rn(v.y, d), __fmul_rn(v.z, d), __fmul_rn(v.w, d));
}

template <typename Out>
__device__ void dequantize_q8_0(const unsigned int* q, const unsigned short* d, Out* out, int rows, int n_pad) {
    const long long words = (long long)n_pad / 4, total = rows * words;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long row = i / words, w = i % words;
        const float scale = half_to_float(d[row * (n_pad / 32) + w / 8]);
        store4(out + 4 * i, scale4(q8_values(q[i]), scale));
    }
}

template <typename Out>
__device__ void dequantize_q4_0(const unsigned int* q, const unsigned short* d, Out* out, int rows, int n_pad) {
    const long long words = (long long)n_pad / 8, total = rows * words;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long row = i / words, w = i % words, b = w / 4, m = w % 4;
        const float scale = half_to_float(d[row * (n_pad / 32) + b]);
        Out* block = out + row * n_pad + 32 * b;
        store4(block + 4 * m, scale4(q4_values(q[i] & 0x0F0F0F0Fu), scale));
        store4(block + 16 + 4 * m, scale4(q4_values((q[i] >> 4) & 0x0F0F0F0Fu), scale));
    }
}

extern "C" __global__ void dequantize_q8_0_f32(const unsigned int* q, const unsigned short* d, float* out,
                                               int rows, int n_pad) {
    dequantize_q8_0(q, d, out, rows, n_pad);
}

extern "C" __global__ void dequantize_q8_0_f16(const unsigned int* q, const unsigned short* d, unsigned short* out,
                                               int rows, int n_pad) {
    dequantize_q8_0(q, d, out, rows, n_pad);
}

extern "C" __global__ void dequantize_q4_0_f32(const unsigned int* q, const unsigned short* d, float* out,
                                               int rows, int n_pad) {
    dequantize_q4_0(q, d, out, rows, n_pad);
}

extern "C" __global__ void dequantize_q4_0_f16(const unsigned int* q, const unsigned short* d, unsigned short* out,
                                               int rows, int n_pad) {
    dequantize_q4_0(q, d, out, rows, n_pad);
}

// --- decode attention: one new token's query against the cached keys and values -------------------------------------
//
// Split by key chunks so that a long context keeps every SM reading (one block per head would use 40 of them):
// block (h, c) takes head h's keys j in [c CHUNK, (c + 1) CHUNK), one per thread, and computes
//   scores s_j = (q . k_j) / sqrt(hd) + bias[j]      (the dot in order d = 0, 1, ...; j >= S: -inf)
//   m = max_j s_j,  e_j = exp(s_j - m),  l = sum_j e_j      (lanes by halving, then warps in order)
//   o[d] = sum_j e_j v_j[d]      (warp w takes j = w, w + WARPS, ... in order, lane l dims l, l + 32, ...;
//                                 then warps in order)
// and writes (m, l, o) to the scratch; attention_combine joins the chunks of each head:
//   M = max_c m_c,  L = sum_c l_c exp(m_c - M),  out[d] = (sum_c o_c[d] exp(m_c - M)) / L      (c in order)
// With one chunk that is out = o / l exactly, so attention_decode writes it directly and no combine runs.
// A chunk whose keys are all masked has m = -inf: it counts as l = 0, o = 0.
// K and V are read straight from the cache (float16 or float32), each value once. hd <= 32 * MAX_DIMS_PER_LANE.

#define ATTENTION_WARPS 8
#define CHUNK (32 * ATTENTION_WARPS)
#define MAX_DIMS_PER_LANE 8

__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(unsigned short h) { return half_to_float(h); }

// Combine one value per warp (lane 0 of each has it) in warp order; every thread gets the result.
template <bool MAX>
__device__ float block_combine(float v, float* slots) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();                                     // slots may still be read from a previous combine
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    float r = slots[0];
    for (int w = 1; w < ATTENTION_WARPS; w++) r = MAX ? fmaxf(r, slots[w]) : __fadd_rn(r, slots[w]);
    return r;
}

template <typename KV>
__device__ void attention_decode(const float* __restrict__ q, const KV* __restrict__ k, const KV* __restrict__ v,
                                 const float* __restrict__ bias, float* __restrict__ out,
                                 float* __restrict__ scratch, int S, int hd, int head_stride,
                                 int bias_head_stride, float sqrt_hd) {
    __shared__ float qs[32 * MAX_DIMS_PER_LANE];
    __shared__ float e[CHUNK];
    __shared__ float slots[ATTENTION_WARPS];
    __shared__ float partial[ATTENTION_WARPS][32 * MAX_DIMS_PER_LANE];
    const int h = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const KV* kh = k + (long long)h * head_stride;
    const KV* vh = v + (long long)h * head_stride;
    for (int d = threadIdx.x; d < hd; d += CHUNK) qs[d] = q[(long long)h * hd + d];
    __syncthreads();

    const int j = c * CHUNK + threadIdx.x;
    float s = __int_as_float(0xFF800000u);               // -inf
    if (j < S) {
        float dot = 0.0f;
        for (int d = 0; d < hd; d++) dot = __fadd_rn(dot, __fmul_rn(qs[d], as_float(kh[(long long)j * hd + d])));
        s = __fadd_rn(__fdiv_rn(dot, sqrt_hd), bias[(long long)h * bias_head_stride + j]);
    }
    float m = s;
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
    m = block_combine<true>(m, slots);
    const float shift = m == __int_as_float(0xFF800000u) ? 0.0f : m;     // all masked: e = exp(-inf) = 0, not NaN
    e[threadIdx.x] = expf(__fsub_rn(s, shift));
    const float l = block_combine<false>(warp_sum(e[threadIdx.x]), slots);   // its first barrier publishes e[]

    float acc[MAX_DIMS_PER_LANE];
#pragma unroll
    for (int n = 0; n < MAX_DIMS_PER_LANE; n++) acc[n] = 0.0f;
    const int keys = min(CHUNK, S - c * CHUNK);
    for (int i = warp; i < keys; i += ATTENTION_WARPS) {
        const float ei = e[i];
        const long long row = (long long)(c * CHUNK + i) * hd;
#pragma unroll
        for (int n = 0; n < MAX_DIMS_PER_LANE; n++) {
            const int d = lane + 32 * n;
            if (d < hd) acc[n] = __fadd_rn(acc[n], __fmul_rn(ei, as_float(vh[row + d])));
        }
    }
#pragma unroll
    for (int n = 0; n < MAX_DIMS_PER_LANE; n++) partial[warp][lane + 32 * n] = acc[n];
    __syncthreads();
    float* part = scratch + ((long long)h * chunks + c) * (hd + 2);       // (m, l, o[hd]) of this chunk
    for (int d = threadIdx.x; d < hd; d += CHUNK) {
        float o = partial[0][d];
        for (int w = 1; w < ATTENTION_WARPS; w++) o = __fadd_rn(o, partial[w][d]);
        if (chunks == 1) out[(long long)h * hd + d] = __fdiv_rn(o, l);
        else part[2 + d] = o;
    }
    if (chunks > 1 && threadIdx.x == 0) {
        part[0] = m;
        part[1] = l;
    }
}

// q (nh, hd) float32; k, v: one layer of the cache, (nh, max_len, hd) (head_stride = max_len * hd);
// bias (nh, S) or (1, S) (bias_head_stride S or 0); out (nh, hd) float32; scratch (nh, chunks, hd + 2) float32.
// Grid (nh, chunks = ceil(S / CHUNK)), CHUNK threads.
extern "C" __global__ void attention_decode_f16(const float* q, const unsigned short* k, const unsigned short* v,
                                                const float* bias, float* out, float* scratch, int S, int hd,
                                                int head_stride, int bias_head_stride, float sqrt_hd) {
    attention_decode(q, k, v, bias, out, scratch, S, hd, head_stride, bias_head_stride, sqrt_hd);
}

extern "C" __global__ void attention_decode_f32(const float* q, const float* k, const float* v, const float* bias,
                                                float* out, float* scratch, int S, int hd, int head_stride,
                                                int bias_head_stride, float sqrt_hd) {
    attention_decode(q, k, v, bias, out, scratch, S, hd, head_stride, bias_head_stride, sqrt_hd);
}

// Grid (nh,), one thread per dim (a multiple of 32, at least hd): joins the chunks of attention_decode.
extern "C" __global__ void attention_combine(const float* scratch, float* out, int chunks, int hd) {
    const int h = blockIdx.x, d = threadIdx.x;
    if (d >= hd) return;
    const float* parts = scratch + (long long)h * chunks * (hd + 2);
    float M = parts[0];
    for (int c = 1; c < chunks; c++) M = fmaxf(M, parts[c * (hd + 2)]);
    float L = 0.0f, o = 0.0f;
    for (int c = 0; c < chunks; c++) {
        const float* part = parts + c * (hd + 2);
        const float scale = expf(__fsub_rn(part[0], M));
        L = __fadd_rn(L, __fmul_rn(part[1], scale));
        o = __fadd_rn(o, __fmul_rn(part[2 + d], scale));
    }
    out[(long long)h * hd + d] = __fdiv_rn(o, L);
}

// --- the small steps of a decode layer, one launch each -------------------------------------------------------------
//
// In a CUDA graph the cost of a tiny kernel is its launch, not its arithmetic, so the RMSNorm (7 array operations)
// and the MLP's silu(gate) * up (5) are one kernel each here.

#define NORM_THREADS 256

// One block per row: out = x * (1 / sqrt(mean(x^2) + eps)) * w, as bcnp.forward.rms_norm. Thread t adds x[j]^2 for
// j = t, t + THREADS, ... in order; then lanes by halving, then warps 0, 1, ... in order; mean = sum / n.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ out, int n, float eps) {
    __shared__ float slots[NORM_THREADS / 32];
    const float* xr = x + (long long)blockIdx.x * n;
    float* o = out + (long long)blockIdx.x * n;
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += NORM_THREADS) s = __fadd_rn(s, __fmul_rn(xr[j], xr[j]));
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = s;
    __syncthreads();
    float total = slots[0];
    for (int k = 1; k < NORM_THREADS / 32; k++) total = __fadd_rn(total, slots[k]);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(total, (float)n), eps)));
    for (int j = threadIdx.x; j < n; j += NORM_THREADS) o[j] = __fmul_rn(__fmul_rn(xr[j], r), w[j]);
}

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up, elementwise over n values.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, int n) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) out[j] = __fmul_rn(__fdiv_rn(gate[j], __fadd_rn(1.0f, expf(-gate[j]))), up[j]);
}

// The new token's keys and values (nh * hd float32 each) into one layer of the cache, (nh, max_len, hd), at the
// position read from the device: one thread per value; float16 caches round to nearest, and saturate at +-65504
// (NaN stays NaN; bcnp.gpu.cache.clamp_to_float16): an infinite key or value would make its head's later scores NaN.
__device__ __forceinline__ void put(float* p, float value) { *p = value; }
__device__ __forceinline__ void put(unsigned short* p, float value) {
    *p = float_to_half(value > 65504.0f ? 65504.0f : value < -65504.0f ? -65504.0f : value);
}

template <typename KV>
__device__ void kv_store(const float* k, const float* v, KV* cache_k, KV* cache_v, const long long* position,
                         int nh, int hd, int max_len) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nh * hd) return;
    const long long at = ((long long)(i / hd) * max_len + *position) * hd + i % hd;
    put(cache_k + at, k[i]);
    put(cache_v + at, v[i]);
}

extern "C" __global__ void kv_store_f16(const float* k, const float* v, unsigned short* cache_k,
                                        unsigned short* cache_v, const long long* position, int nh, int hd,
                                        int max_len) {
    kv_store<unsigned short>(k, v, cache_k, cache_v, position, nh, hd, max_len);
}

extern "C" __global__ void kv_store_f32(const float* k, const float* v, float* cache_k, float* cache_v,
                                        const long long* position, int nh, int hd, int max_len) {
    kv_store<float>(k, v, cache_k, cache_v, position, nh, hd, max_len);
}
