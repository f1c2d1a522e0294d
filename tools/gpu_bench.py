"""Decode speed of Baichuan-13B on the GPU (CuPy) at fp16 / int8 / int4, against the memory roofline.

    python tools/gpu_bench.py                 # a few 13B-width layers with random weights, ~1 minute
    python tools/gpu_bench.py --smoke         # the same code on NumPy with tiny sizes (checks the script, no GPU)

Decode reads every weight once per token, so its speed limit is (weight bytes per token) / (memory bandwidth).
The bandwidth is measured here, in the same run: a device-to-device copy of 1 GiB (bytes read + written, per
second). The model has Baichuan-13B's widths (hidden 5120, MLP 13696, 40 heads, vocabulary 64000) and a few
layers of random weights made on the device; timing it at two depths separates the cost of a layer from the
rest (embedding, final norm, lm_head, logits to the host), which extrapolates to the real 40 layers:

    t(13B) = t(rest) + 40 t(layer)          roofline = copy bandwidth / 13B weight bytes per token

Also measured: each matvec kernel alone on a large matrix (its bandwidth against the copy: what the kernel does
when nothing else costs time), and prefill of a 512-token prompt. Times are CUDA events around warmed-up runs.
"""
import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bcnp.api import DeviceModel                                                      # noqa: E402
from bcnp.gpu.cache import GraphKVCache                                               # noqa: E402
from bcnp.gpu.kernels import (BackendError, cuda_kernels, first_line, get_cupy, is_cupy,  # noqa: E402
                              rms_norm_on_device)
from bcnp.gpu.weights import DeviceQuantizedWeight                                    # noqa: E402
from bcnp.config import Config                                                        # noqa: E402
from bcnp.quant import is_linear, padded_width                                      # noqa: E402

BAICHUAN_13B_LAYERS = 40
MODES = ("fp16", "int8", "int4")


def baichuan_13b_width(layers, small=False):
    if small:                                        # --smoke: the same shapes' kinds, tiny
        return Config(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=layers,
                      num_attention_heads=4, max_position=4096, position_embedding="alibi")
    return Config(vocab_size=64000, hidden_size=5120, intermediate_size=13696, num_hidden_layers=layers,
                  num_attention_heads=40, max_position=4096, position_embedding="alibi")


class Timer:
    """Seconds between start() and stop(): CUDA events on CuPy, the wall clock otherwise."""

    def __init__(self, xp):
        self.xp = xp

    def start(self):
        if is_cupy(self.xp):
            self.begin, self.end = self.xp.cuda.Event(), self.xp.cuda.Event()
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self):
        if is_cupy(self.xp):
            self.end.record()
            self.end.synchronize()
            return self.xp.cuda.get_elapsed_time(self.begin, self.end) / 1e3
        return time.perf_counter() - self.begin


def uniform(xp, shape, low, high, dtype):
    return (xp.random.random_sample(shape) * (high - low) + low).astype(dtype)


def random_linear(xp, shape, bits, kernels):
    """A linear weight made on the device: float16 values, or random codes and scales (values do not change the
    speed; the scales keep the activations in a normal range)."""
    out_features, in_features = shape
    n_pad = padded_width(in_features)                                # stored padded to whole blocks
    if bits == 16:
        values = uniform(xp, (out_features, n_pad), -0.03, 0.03, xp.float16)
        values[:, in_features:] = 0
        return DeviceQuantizedWeight(xp, values, None, 16, in_features, np.float16, kernels)
    if bits == 8:
        qweight = uniform(xp, (out_features, n_pad), -127.49, 127.49, xp.float32).round().astype(xp.int8)
    else:
        qweight = uniform(xp, (out_features, n_pad // 2), 0, 255.99, xp.float32).astype(xp.uint8)
    scales = uniform(xp, (out_features, n_pad // 32), 0.5, 1.5, xp.float32) * (0.03 / (127 if bits == 8 else 8))
    return DeviceQuantizedWeight(xp, qweight, scales.astype(xp.float16), bits, in_features, np.float16, kernels)


def random_model(xp, config, mode, kernels):
    """Baichuan-13B-shaped weights on the device: linears at `mode` (lm_head int8 when quantized, as
    Model.quantize), float16 embedding, float32 norms; float16 cache, as Model.cuda() sets up."""
    bits = {"fp16": 16, "int8": 8, "int4": 4}[mode]
    w = {}
    for name, shape in config.weight_shapes().items():
        if len(shape) == 1:
            w[name] = uniform(xp, shape, 0.9, 1.1, xp.float32)
        elif is_linear(name):
            w[name] = random_linear(xp, shape, 8 if name == "lm_head.weight" and bits != 16 else bits, kernels)
        else:
            w[name] = uniform(xp, shape, -0.03, 0.03, xp.float16)
    return DeviceModel(config, w, xp, cache_dtype=np.dtype(np.float16), kernels=kernels)


def with_layers(model, layers):
    """The same weights, only the first `layers` layers run."""
    return DeviceModel(dataclasses.replace(model.config, num_hidden_layers=layers), model.w, model.xp,
                       cache_dtype=model.cache_dtype, kernels=model.kernels)


def weight_bytes_per_token(model, layers):
    """Bytes decode reads per token with `layers` layers: every linear and norm of a layer, the final norm,
    lm_head, one embedding row."""
    config, w = model.config, model.w
    layer = sum(v.nbytes for k, v in w.items() if k.startswith("model.layers.0."))
    rest = w["lm_head.weight"].nbytes + w["model.norm.weight"].nbytes + 2 * config.hidden_size
    return rest + layers * layer


def copy_bandwidth(xp, timer, nbytes):
    """Device copy speed, bytes read + written per second: the better of cudaMemcpy and a copy kernel."""
    src, dst = xp.ones(nbytes // 4, xp.float32), xp.empty(nbytes // 4, xp.float32)
    copies = [lambda: xp.copyto(dst, src)]
    if is_cupy(xp):
        copies.append(lambda: dst.data.copy_from_device_async(src.data, nbytes))
    best = 0.0
    for copy in copies:
        copy()                                                       # warm-up
        timer.start()
        for _ in range(10):
            copy()
        best = max(best, 2 * nbytes * 10 / timer.stop())
    return best


def decode_seconds(model, timer, prompt_len, tokens, rng, graphs=True):
    """Seconds per decoded token, as Model.generate runs it: one token, its logits to the host, next;
    steps replayed from CUDA graphs, or with graphs=False launched op by op."""
    vocab = model.config.vocab_size
    model.graphs = graphs
    cache = model.new_cache(prompt_len + tokens + 3)
    model.next_logits(rng.integers(3, vocab, prompt_len), cache)
    for _ in range(3):                                               # warm-up (compilation, the pool, capture)
        model.next_logits(rng.integers(3, vocab, 1), cache)
    timer.start()
    for _ in range(tokens):
        model.next_logits(rng.integers(3, vocab, 1), cache)
    return timer.stop() / tokens


def prefill_seconds(model, timer, prompt_len, rng):
    ids = rng.integers(3, model.config.vocab_size, prompt_len)
    model.next_logits(ids, model.new_cache(prompt_len))             # warm-up
    timer.start()
    model.next_logits(ids, model.new_cache(prompt_len))
    return timer.stop()


def kernel_bandwidth(xp, timer, mode, kernels, rows, in_features):
    """One matvec kernel alone, back to back on a large matrix: weight bytes per second."""
    weight = random_linear(xp, (rows, in_features), {"fp16": 16, "int8": 8, "int4": 4}[mode], kernels)
    x = uniform(xp, (in_features,), -1, 1, xp.float32)
    weight.matvec(x)
    timer.start()
    for _ in range(20):
        weight.matvec(x)
    seconds = timer.stop() / 20
    return weight.nbytes / seconds


def graph_seconds(xp, timer, f, reps=20):
    """Seconds per call of f() on the GPU: `reps` calls captured in one CUDA graph and replayed, so Python's time
    to launch them does not count (on NumPy: the wall clock)."""
    f()                                                              # warm-up: compilation, the pool
    if is_cupy(xp):
        stream = xp.cuda.Stream(non_blocking=True)
        try:
            with stream:
                stream.begin_capture()
                try:
                    for _ in range(reps):
                        f()
                finally:
                    graph = stream.end_capture()
                graph.launch(stream)
                timer.start()
                graph.launch(stream)
                return timer.stop() / reps
        except Exception as e:
            print(f"  (could not time in a graph, timing op by op: {first_line(e)})")
    timer.start()
    for _ in range(reps):
        f()
    return timer.stop() / reps


def layer_parts(model, timer, per_layer, bandwidth):
    """Where a decode layer's time goes: each of its kernels alone (timed in a graph), their sum, against the
    measured time per layer of the step's graph (the difference: gaps between kernels)."""
    xp, config, w, kernels = model.xp, model.config, model.w, model.kernels
    H, I, nh, hd = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.head_dim
    x, x_mlp = uniform(xp, (1, H), -1, 1, xp.float32), uniform(xp, (1, I), -1, 1, xp.float32)
    layer = {name: w[f"model.layers.0.{name}.weight"] for name in (
        "self_attn.W_pack", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    vector = {name: weight.vector(x_mlp if name == "mlp.down_proj" else x) for name, weight in layer.items()}
    residual = x[0]
    matvecs = {   # as DecodeOps runs them: residual adds and silu(gate) * up inside the matvec kernels
        "W_pack": (lambda: layer["self_attn.W_pack"].matvec(vector["self_attn.W_pack"]),
                   layer["self_attn.W_pack"].nbytes),
        "o_proj+add": (lambda: layer["self_attn.o_proj"].matvec(vector["self_attn.o_proj"], residual=residual),
                       layer["self_attn.o_proj"].nbytes),
        "gate,up,silu": (lambda: layer["mlp.gate_proj"].swiglu(layer["mlp.up_proj"], vector["mlp.gate_proj"]),
                         layer["mlp.gate_proj"].nbytes + layer["mlp.up_proj"].nbytes),
        "down+add": (lambda: layer["mlp.down_proj"].matvec(vector["mlp.down_proj"], residual=residual),
                     layer["mlp.down_proj"].nbytes)}
    matvecs = {name: (graph_seconds(xp, timer, f), nbytes) for name, (f, nbytes) in matvecs.items()}
    norm = w["model.layers.0.input_layernorm.weight"]
    cache = model.new_cache(4096)
    q, k = uniform(xp, (nh, 1, hd), -1, 1, xp.float32), uniform(xp, (1, nh, hd), -1, 1, xp.float32)
    step = GraphKVCache(cache.k, cache.v, 0, kernels, position=xp.zeros(1, dtype=xp.int64), window=256)

    def attention(S):
        bias = xp.zeros((nh, 1, S), dtype=xp.float32)
        return graph_seconds(xp, timer, lambda: cache.attend(xp, 0, q, bias))

    others = {"2 norms": 2 * graph_seconds(xp, timer, lambda: rms_norm_on_device(xp, kernels, x, norm, 1e-6)),
              "store": graph_seconds(xp, timer, lambda: step.store(0, k, k)),
              "attention": attention(256)}
    long_attention = attention(4096)
    total = sum(seconds for seconds, _ in matvecs.values()) + sum(others.values())
    return ("  one layer's kernels alone, us (matvec: % of copy bandwidth): "
            + ", ".join(f"{n} {t * 1e6:.1f} ({b / t / bandwidth:.0%})" for n, (t, b) in matvecs.items()) + "; "
            + ", ".join(f"{n} {t * 1e6:.1f}" for n, t in others.items())
            + f" (over 256 positions; over 4096: {long_attention * 1e6:.1f}); "
            f"sum {total * 1e6:.1f} of {per_layer * 1e6:.1f} per layer in the step's graph")


def free(xp):
    if is_cupy(xp):
        xp.get_default_memory_pool().free_all_blocks()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,6", help="the two depths timed (default 2,6)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed per depth")
    p.add_argument("--prompt", type=int, default=512, help="prefill length")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--smoke", action="store_true", help="NumPy and tiny sizes: check the script without a GPU")
    args = p.parse_args(argv)
    shallow, deep = (int(n) for n in args.layers.split(","))
    modes = args.modes.split(",")

    if args.smoke:
        xp, kernels, copy_size, big = np, None, 1 << 24, (256, 512)
        device = "NumPy (smoke test: the numbers mean nothing)"
    else:
        xp = get_cupy()
        kernels = cuda_kernels(xp)
        copy_size, big = 1 << 30, (65536, 13696)
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        name = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
        device = f"{name}, CuPy {xp.__version__}"
    timer, rng = Timer(xp), np.random.default_rng(0)
    xp.random.seed(0)
    bandwidth = copy_bandwidth(xp, timer, copy_size)
    print(f"device: {device}", flush=True)
    print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write, {copy_size >> 20} MiB copied)", flush=True)

    rows = []
    for mode in modes:
        model = random_model(xp, baichuan_13b_width(deep, small=args.smoke), mode, kernels)
        shallow_model = with_layers(model, shallow)
        t_eager = decode_seconds(model, timer, 16, args.tokens, rng, graphs=False)
        t_deep = decode_seconds(model, timer, 16, args.tokens, rng)
        graphs = ("graphs" if model.graphs else "no graphs (capture failed)") if is_cupy(xp) else "no graphs (NumPy)"
        t_shallow = decode_seconds(shallow_model, timer, 16, args.tokens, rng)
        per_layer = max((t_deep - t_shallow) / (deep - shallow), 1e-12)
        rest = max(t_deep - deep * per_layer, 0.0)
        t_13b = rest + BAICHUAN_13B_LAYERS * per_layer
        bytes_13b = weight_bytes_per_token(model, BAICHUAN_13B_LAYERS)
        roofline = bandwidth / bytes_13b                                     # tokens/s
        p_deep = prefill_seconds(model, timer, args.prompt, rng)
        p_shallow = prefill_seconds(shallow_model, timer, args.prompt, rng)
        p_layer = max((p_deep - p_shallow) / (deep - shallow), 1e-12)
        p_13b = max(p_deep - deep * p_layer, 0.0) + BAICHUAN_13B_LAYERS * p_layer
        parts = layer_parts(model, timer, per_layer, bandwidth)
        del model, shallow_model
        free(xp)
        kernel = kernel_bandwidth(xp, timer, mode, kernels, *big)
        free(xp)
        row = dict(mode=mode, measured=f"{deep} layers: {1 / t_deep:.1f} tok/s with {graphs}, "
                                       f"{1 / t_eager:.1f} op by op", graph_gain=t_eager / t_deep, gb=bytes_13b / 1e9,
                   tps=1 / t_13b, roofline=roofline, ratio=roofline and (1 / t_13b) / roofline,
                   layer_ms=per_layer * 1e3, rest_ms=rest * 1e3, kernel=kernel / bandwidth,
                   prefill=args.prompt / p_13b)
        rows.append(row)
        print(f"{mode}: decode {row['measured']}, {per_layer * 1e3:.3f} ms/layer + {rest * 1e3:.2f} ms rest; "
              f"13B {row['tps']:.1f} tok/s of {roofline:.1f} roofline ({row['ratio']:.0%}); "
              f"matvec kernel alone {kernel / 1e9:.0f} GB/s ({row['kernel']:.0%} of copy); "
              f"13B prefill {row['prefill']:.0f} tok/s", flush=True)
        print(parts, flush=True)

    target = {"fp16": 0.8, "int8": 0.6, "int4": 0.6}
    print()
    print(f"Baichuan-13B decode (extrapolated from {shallow} and {deep} 13B-width layers), "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'mode':5} {'GB/token':>8} {'tok/s':>7} {'roofline':>8} {'ratio':>6} {'target':>6} {'ms/layer':>8} "
          f"{'rest ms':>7} {'kernel':>6} {'graphs':>6} {'prefill tok/s':>13}")
    for r in rows:
        print(f"{r['mode']:5} {r['gb']:8.2f} {r['tps']:7.1f} {r['roofline']:8.1f} {r['ratio']:6.0%} "
              f"{target.get(r['mode'], 0):6.0%} {r['layer_ms']:8.3f} {r['rest_ms']:7.2f} {r['kernel']:6.0%} "
              f"{r['graph_gain']:5.2f}x {r['prefill']:13.0f}")
    print("ratio = tok/s / roofline; kernel = one matvec kernel's weight bandwidth / copy bandwidth; "
          "graphs = decode speed with CUDA graphs / op by op")


if __name__ == "__main__":
    try:
        main()
    except BackendError as e:
        sys.exit(f"error: {e}")
