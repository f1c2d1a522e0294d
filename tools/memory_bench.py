"""The KV cache at Baichuan-13B width: peak memory of long prompts and sessions, decode time against the context.

    python tools/memory_bench.py memory      # peak RSS: a 4000-token prompt, and a session, 1 and 2 layers
    python tools/memory_bench.py decode      # int4 decode ms/token at 128 and 2048 positions, float32 vs float16
    python tools/memory_bench.py attention   # the float16 kernel against widening the cache for BLAS, per layer

Models are `--layers` (default 2) Baichuan-13B-width layers with the embedding and lm_head whole, random weights
(tools/bench.py's RandomPool and layer_weights), quantized one tensor at a time so the float copies never coexist.
Each memory case runs in a fresh process: once its model is built, the peak RSS is reset (/proc/self/clear_refs),
so the peak is the weights plus what the run adds. A whole 13B is extrapolated per layer: peak(1 layer) + 39 x
(peak(2 layers) - peak(1 layer)); the difference is one layer's weights, its KV cache and the activations that grow
with the model (embedding and lm_head are counted once, in peak(1 layer)). Decode times are the best of several
steps on a cache filled to the given position with random keys and values (the values do not change the time);
per layer = (step - lm_head alone) / layers; a 13B step = 40 x per layer + lm_head.

Measured on this machine (2 vCPUs of a Xeon with AVX-512 and a 300 MB L3), quiet, 2026-12-01:

  peak RSS (GB), int4, 2 layers (the model: 1.40)   engine (Model.generate)   one call (Model.logits)
  4000-token prompt, float16 cache                         1.88                    2.80 (1.02 of it the logits)
  4000-token prompt, float32 cache                         2.54                    3.46
  before: Model.logits was one pass over the 4000 tokens, 11.2 GB (measured before the change; not rerun here)

  session (open + 512-token prompt + 64 new tokens), GB     1 layer   2 layers   40-layer 13B, extrapolated
  int4, float16 cache / float32 cache                       1.35/1.39  1.53/1.58   8.64 / 9.15
  int8, float16 cache / float32 cache                       1.50/1.54  1.85/1.90  15.00 / 15.43

  int4 decode, OMP_NUM_THREADS=2, per 13B-width layer     128 positions   2048 positions   ratio (13B with lm_head)
  float32 cache (NumPy attention)                          7.60 ms         14.63 ms         1.92 (1.87)
  float16 cache (bcnp._attention)                          7.97 ms         10.54 ms         1.32 (1.30)
  (quiet machine, 2026-12-01; with another job on the cores: 12.33 / 22.94 and 11.54 / 13.39 ms, ratios 1.86 and
  1.16.) The float16 cache's 42 MB per layer at 2048 positions are a quarter of an int4 layer's 177 MB of weights.

  attention of one 13B layer, 2 threads, ms, quiet          float16 kernel   float16 widened + BLAS   float32 NumPy
  T 1, S 2048 / 4000                                           1.3 / 5.4          46 / 84               6.4 / 6.9
  T 16 / 64 / 256, S 1024                                  9.5 / 36 / 139    32 / 53 / 131          8.9 / 29 / 114
  T 256, S 4000                                                  520               493                    417
  Widening won 5-20% at T 256 but holds float32 copies of the span: a 4000-token prompt then peaked at 3.46 GB
  (Model.logits) and 2.54 GB (engine) against 2.82 and 1.90 with the kernel, so bcnp.cache keeps the kernel for
  every T.

  Since the kernel's head-dim-128 loops (csrc/attention.h: q and out in registers, 16 keys' scores folded at once,
  the keys a row's bias masks at its end skipped), on a 2-core Zen 4 (AVX-512, no AMX), 2026-12-02, the previous
  build alternated with it, two runs each, kernel ms before -> after:
  T 1, S 2048 / 4000                        1.4, 1.4 -> 1.0, 1.1  /  3.0, 2.6 -> 2.4, 2.7   (reading the cache)
  T 16 / 64 / 256, S 1024                   9.8-12.5 -> 8.2-8.4  /  34 -> 15  /  110-116 -> 51-57
  T 256, S 4000                             466-493 -> 237-361
  T 512, S 512 (a prompt over itself)       129-137 -> 39-40
  Widening + BLAS took 134-163 ms at T 256, S 1024 and 125-163 at T 512, S 512 in the same runs: the kernel is
  now the faster one at every T as well as the smaller.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

from benchkit import best_time  # noqa: E402


def bench_helpers():
    """tools/bench.py, imported for its helpers (it parses the command line when imported: give it none)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import bench
    finally:
        sys.argv = argv
    return bench


def quantized_model(layers, bits):
    """A Model of `layers` 13B-width layers, linears at `bits`, lm_head int8 (x rounded as the model's bits say),
    embedding float16 (drawn as float16: no float32 copy of it at the peak), norms 1."""
    from bcnp import Model
    from bcnp.quant import QuantizedWeight, activation_bits
    bench = bench_helpers()
    config, pool = bench.model_config(layers), bench.RandomPool()
    w = {}
    for name, shape in config.weight_shapes().items():
        if len(shape) == 1:
            w[name] = np.ones(shape, np.float32)
        elif name == "model.embed_tokens.weight":
            w[name] = pool(shape, np.float16)
        elif name == "lm_head.weight":
            w[name] = QuantizedWeight.from_float(pool(shape), 8, x_bits=activation_bits(bits))
    for i in range(layers):
        for short, weight in bench.layer_weights(pool, "q8" if bits == 8 else "q4").items():
            w[f"model.layers.{i}.{short}.weight"] = weight
    return Model(config, w)


# --- memory ---------------------------------------------------------------------------------------------------------

def rss_gb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:          # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def memory_child(case, layers, bits, dtype):
    """In a fresh process: (RSS with the model built, peak RSS during the case) in GB, printed as one line."""
    model = quantized_model(layers, bits)
    model.cache_dtype = np.dtype(dtype)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    reset_peak()
    before = rss_gb("VmRSS")
    if case == "prompt-engine":                  # the prompt's first new token, through the engine's chunks
        next(iter(model.generate(rng.integers(0, V, 4000), max_new_tokens=1, do_sample=False)))
    elif case == "prompt-logits":                # one call, every position's logits
        model.logits(rng.integers(0, V, 4000))
    elif case == "session":                      # open + 512-token prompt + 64 new tokens
        for _ in model.generate(rng.integers(0, V, 512), max_new_tokens=64, do_sample=False, repetition_penalty=1.0):
            pass
    print(f"{before:.3f} {rss_gb('VmHWM'):.3f}")


def measure_memory(case, layers, bits, dtype):
    out = subprocess.run([sys.executable, __file__, "memory-child", case, str(layers), str(bits), dtype],
                         capture_output=True, text=True, check=True)
    before, peak = map(float, out.stdout.split())
    return before, peak


def memory_report(args):
    print(f"peak RSS (GB): the model built, then the peak during the case; {args.layers} layers of 13B width")
    for case in ("prompt-engine", "prompt-logits"):
        for dtype in ("float16", "float32"):
            before, peak = measure_memory(case, args.layers, 4, dtype)
            print(f"  {case:14} int4 {dtype} cache: model {before:5.2f}, peak {peak:5.2f}", flush=True)
    print("session (open + 512-token prompt + 64 new tokens), extrapolated: peak(1) + 39 x (peak(2) - peak(1))")
    for bits in (4, 8):
        for dtype in ("float16", "float32"):
            one, two = (measure_memory("session", n, bits, dtype)[1] for n in (1, 2))
            print(f"  int{bits} {dtype} cache: 1 layer {one:5.2f}, 2 layers {two:5.2f}, "
                  f"13B {one + 39 * (two - one):5.2f}", flush=True)


# --- decode -----------------------------------------------------------------------------------------------------------

def best_ms(f, repeats):
    return 1e3 * best_time(f, repeats)


def filled_cache(model, positions, rng):
    cache = model.new_cache(positions + 1)
    shape = cache.k[:, :, :positions].shape
    cache.k[:, :, :positions] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.3)
    cache.v[:, :, :positions] = rng.standard_normal(shape, dtype=np.float32)
    return cache


def decode_report(args):
    """Steps of the four cases (float32 / float16 cache, 128 / 2048 positions) taken in turn, `repeats` rounds, the
    best of each kept: on a shared machine a busy minute then slows every case alike."""
    model = quantized_model(args.layers, 4)
    rng = np.random.default_rng(0)
    head, x = model.w["lm_head.weight"], rng.standard_normal((1, model.config.hidden_size), dtype=np.float32)
    head_ms = best_ms(lambda: head.matmul(x), args.repeats)
    token = rng.integers(0, model.config.vocab_size, 1)
    cases = {}
    for dtype in ("float32", "float16"):
        model.cache_dtype = np.dtype(dtype)
        for positions in (128, 2048):
            cases[dtype, positions] = filled_cache(model, positions, rng)
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.repeats + 1):                       # the first round warms up
        for (dtype, positions), cache in cases.items():
            cache.length = positions
            start = time.perf_counter()
            model.forward(token, cache)
            best[dtype, positions] = min(best[dtype, positions], 1e3 * (time.perf_counter() - start))
    print(f"int4 decode, {args.layers} layers of 13B width, lm_head {head_ms:.1f} ms; best of {args.repeats} rounds, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for dtype in ("float32", "float16"):
        per_layer = {p: (best[dtype, p] - head_ms) / args.layers for p in (128, 2048)}
        full = {p: 40 * t + head_ms for p, t in per_layer.items()}
        for p in (128, 2048):
            print(f"  {dtype} cache, {p:4} positions: step {best[dtype, p]:6.1f} ms, per layer {per_layer[p]:5.2f} ms, "
                  f"13B {full[p]:6.0f} ms/token")
        print(f"  {dtype}: 2048 / 128 positions = {per_layer[2048] / per_layer[128]:.2f} per layer, "
              f"{full[2048] / full[128]:.2f} for the 13B", flush=True)


# --- attention ----------------------------------------------------------------------------------------------------------

def attention_report(args):
    """One 13B layer's attention: T new tokens over S cached positions, the kernel against widen + BLAS."""
    from bcnp import _attention
    from bcnp.forward import attention, attention_bias
    bench = bench_helpers()
    config = bench.model_config(1)
    nh, hd = config.num_attention_heads, config.head_dim
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((nh, 4096, hd)) * 0.3).astype(np.float16)
    v = rng.standard_normal((nh, 4096, hd)).astype(np.float16)
    print(f"attention of one 13B layer (40 heads x 128), ms, best of {args.repeats}; kernels {_attention.SIMD}")
    k32, v32 = k.astype(np.float32), v.astype(np.float32)
    for T, S in ((1, 128), (1, 2048), (1, 4000), (16, 1024), (64, 1024), (256, 1024), (256, 4000), (512, 512)):
        q = rng.standard_normal((nh, T, hd), dtype=np.float32)
        bias = attention_bias(np, config, np.arange(S - T, S), np.arange(S))
        kernel = best_ms(lambda: _attention.attend_f16(q, k.view(np.uint16), v.view(np.uint16), bias), args.repeats)
        blas = best_ms(lambda: attention(np, q, k[:, :S].astype(np.float32), v[:, :S].astype(np.float32), bias),
                       args.repeats)
        f32 = best_ms(lambda: attention(np, q, k32[:, :S], v32[:, :S], bias), args.repeats)
        print(f"  T {T:3} S {S:4}: float16 kernel {kernel:7.1f}   float16 widened + BLAS {blas:7.1f}   "
              f"float32 cache (NumPy) {f32:7.1f}   kernel / widened {kernel / blas:.2f}", flush=True)


def main():
    if sys.argv[1:2] == ["memory-child"]:
        case, layers, bits, dtype = sys.argv[2:]
        return memory_child(case, int(layers), int(bits), dtype)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("memory", "decode", "attention"))
    p.add_argument("--layers", type=int, default=2, help="13B-width layers (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions, the best is kept (default 7)")
    args = p.parse_args()
    {"memory": memory_report, "decode": decode_report, "attention": attention_report}[args.command](args)


if __name__ == "__main__":
    main()
