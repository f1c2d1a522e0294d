"""CPU decode / prefill benchmark at Baichuan-13B width (SPEC §7), all numbers from one run.

    python tools/bench.py [--threads N] [--layers 2] [--quick]
    python tools/bench.py batch [--threads N] [--quick] [--json]   (the engine: B sequences decoding together)
    python tools/bench.py kernels [--threads N] [--quick]          (JSON: the linears at several tokens per call)

Measures, in order:
  (a) the machine's memory read bandwidth: bcnp._quant.stream_read, every thread summing its own contiguous slice
      of a 512 MiB buffer (a plain streaming read, the access pattern of the decode matvec), probed again just
      before every timed run, because on a shared virtual machine it drifts by tens of percent; numpy's
      single-threaded copy bandwidth is printed once for reference;
  (b) one token through the five linears of one 13B layer (W_pack 15360x5120, o_proj 5120x5120, gate/up
      13696x5120, down 5120x13696) for float32 (BLAS x @ W.T), int8 and int4 (the fused kernels), and lm_head;
  (c) the full decode step of a bcnp.model.Model with `--layers` 13B-width layers, embedding and lm_head, after a
      short prompt in the KV cache;
  (d) prefill of a 512-token prompt (--quick: 128) through the same model (logits of the last token only);
and reports the bytes of weights read per token, the GB/s that makes, its ratio to the bandwidth probed just before
(the median over runs), and full 13B (40 layers + lm_head) tokens/s extrapolated from the per-layer times. Times are
the best of several runs. Weights are random (a tiled random pool: values do not matter for speed). Memory stays
under ~7.5 GB with the defaults (the float32 model with 2 layers is ~5 GB).

`batch` runs bcnp.engine on a `--layers`-layer model of 13B width (embedding and lm_head whole): B = 1, 2, 4, 8, 16
sequences decode together after a 16-token prompt each, and it reports the aggregate decode tokens/s per weight
kind ({"int4": {"1": tok/s, ...}, "int8": ..., "float32": ...} with --json, plus "vs_b1" ratios and the chat
turn below); then a chat turn after a 512-token history (--quick: 256): the time to its first token, reusing the
history's cache, against the same turn's new tokens alone on a fresh engine.

`kernels` prints one JSON object: for the five linears of one 13B layer in float32 (BLAS), int8 and int4,
  - "decode": B = 1, 2, 4, 8, 16 tokens per call (the batched kernels; float32: x @ W.T), aggregate tokens/s and
    its ratio to B = 1 in the same run;
  - "prefill": seconds per layer for 16 / 128 / 512 tokens, GFLOP/s (2 x parameters x tokens / time) and its ratio
    to the float32 BLAS GEMM of the same layer at the same length, measured in the same run.
"""
import argparse
import dataclasses
import inspect
import json
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="threads (default: $OMP_NUM_THREADS, else all cores)")
    p.add_argument("--layers", type=int, default=2, help="13B-width layers in the full-model runs (default 2)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, 128-token prefill")
    p.add_argument("--prompt", type=int, default=None, help="prefill length (default 512, --quick 128)")
    p.add_argument("command", nargs="?", choices=["batch", "kernels"],
                   help="batch: the engine, B sequences at once; kernels: the linears at several tokens per call")
    p.add_argument("--json", action="store_true", help="batch: one JSON object on stdout, nothing else")
    return p.parse_args()


args = parse_args()
if args.threads:          # before numpy (OpenBLAS) and the OpenMP kernels start their thread pools
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from bcnp import _quant  # noqa: E402
from bcnp.quant import QuantizedWeight  # noqa: E402

H, I, V, LAYERS_13B = 5120, 13696, 64000, 40
LINEARS = {"self_attn.W_pack": (3 * H, H), "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H),
           "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
THREADS = _quant.resolve_threads(args.threads or 0)
REPEATS = 3 if args.quick else 7


def best_time(f, repeats=REPEATS):
    """The fastest of `repeats` runs: the least disturbed by anything else on the machine."""
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


class Bandwidth:
    """Memory read bandwidth, probed next to every measurement: on a shared (virtual) machine it moves by tens of
    percent from minute to minute, so each time is compared with a probe taken just before it."""

    def __init__(self, mib=512):
        self.buf = np.ones(mib << 17, np.uint64)              # well beyond the last-level cache
        self.seen = []

    def probe(self):
        t = time.perf_counter()
        _quant.stream_read(self.buf, THREADS)
        gbs = self.buf.nbytes / (time.perf_counter() - t) / 1e9
        self.seen.append(gbs)
        return gbs

    def measure(self, f, nbytes, repeats=REPEATS):
        """(best time of f, median over runs of (nbytes / time) / (the probe just before it))."""
        f()
        times, ratios = [], []
        for _ in range(repeats):
            time.sleep(0.15)        # OpenBLAS's threads spin ~0.1 s after a call: let them sleep before probing
            bw = max(self.probe(), self.probe())
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
            ratios.append(nbytes / times[-1] / 1e9 / bw)
        return min(times), float(np.median(ratios))


class RandomPool:
    """Tensors filled from one pool of random normals at rotating offsets: memcpy speed instead of an RNG's."""

    def __init__(self, size=1 << 24, seed=0):
        self.pool = np.random.default_rng(seed).standard_normal(size, dtype=np.float32) * np.float32(0.02)
        self.offset = 0

    def __call__(self, shape, dtype=np.float32):
        out = np.empty(shape, dtype)
        flat, n = out.reshape(-1), out.size
        i = 0
        while i < n:
            start = self.offset % len(self.pool)
            k = min(n - i, len(self.pool) - start)
            flat[i:i + k] = self.pool[start:start + k]
            i += k
            self.offset += k + 7919                       # a prime stride, so tensors differ
        return out


def copy_bandwidth():
    src = np.ones(1 << 26, np.uint64).view(np.uint8)        # 512 MiB
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_time(lambda: np.copyto(dst, src), 3) / 1e9


# --- (b) the linears of one layer ---------------------------------------------------------------------------------

def layer_weights(pool, kind):
    """The five linears of one layer as float32 arrays or QuantizedWeight (8 or 4 bits)."""
    out = {}
    for name, shape in LINEARS.items():
        w = pool(shape)
        out[name] = w if kind == "f32" else QuantizedWeight.from_float(w, 8 if kind == "q8" else 4)
    return out


def linear(x, w):
    return w.matmul(x) if isinstance(w, QuantizedWeight) else x @ w.T


def layer_inputs():
    rng = np.random.default_rng(1)
    return {name: rng.standard_normal((1, shape[1]), dtype=np.float32) for name, shape in LINEARS.items()}


# --- (c), (d) the model -------------------------------------------------------------------------------------------

def have_model():
    try:
        from bcnp.model import Model  # noqa: F401
        from bcnp.config import Config  # noqa: F401
        return True
    except ImportError as e:
        print(f"(bcnp.model not importable: {e}; skipping the full-model runs)")
        return False


def model_config(layers):
    from bcnp.config import BAICHUAN_13B
    return dataclasses.replace(BAICHUAN_13B, num_hidden_layers=layers)


def float_model(config, pool):
    from bcnp.model import Model
    w = {name: (np.ones(shape, np.float32) if len(shape) == 1 else pool(shape))
         for name, shape in config.weight_shapes().items()}
    return Model(config, w)


def decode_step(model, context=16):
    """One token with `context` tokens in the cache (the cache rewinds to `context` before every step)."""
    rng = np.random.default_rng(2)
    cache = model.new_cache(context + 2)
    model.forward(rng.integers(0, V, context), cache)
    token = rng.integers(0, V, 1)

    def step():
        cache.length = context
        model.forward(token, cache)
    return step


def prefill_time(model, n):
    """A fresh n-token prompt; only the last token's logits, as generation needs, where the model offers that."""
    from bcnp import model as model_module
    ids = np.random.default_rng(3).integers(0, V, n)
    transformer = getattr(model_module, "transformer", None)
    if transformer is not None and "last_only" in inspect.signature(transformer).parameters:
        def run():
            transformer(model.xp, model.w, model.config, ids, model.new_cache(n), last_only=True)
    else:
        def run():
            model.forward(ids, model.new_cache(n))
    return best_time(run, 1 if args.quick else 2)


def model_weight_bytes_per_token(model):
    """Bytes of weights one decode step reads: every linear and lm_head whole, one row of the embedding."""
    total = 0
    for name, w in model.w.items():
        if name == "model.embed_tokens.weight":
            total += w.nbytes // w.shape[0]
        else:
            total += w.nbytes
    return total


# --- batch: several tokens per call ---------------------------------------------------------------------------------

BATCHES, PROMPTS = (1, 2, 4, 8, 16), (16, 128, 512)


def layer_time(weights, tokens, repeats):
    """Best time of the five linears on `tokens` random tokens each."""
    rng = np.random.default_rng(tokens)
    xs = {n: rng.standard_normal((tokens, w.shape[1]), dtype=np.float32) for n, w in weights.items()}
    return best_time(lambda: [linear(xs[n], w) for n, w in weights.items()], repeats)


def batch_report():
    """Decode tokens/s at several batch widths and prefill seconds per layer, per weight kind, as one dict."""
    pool = RandomPool()
    params = sum(o * i for o, i in LINEARS.values())
    report = {"threads": THREADS, "kernels": _quant.SIMD, "layer": {n: list(s) for n, s in LINEARS.items()},
              "decode": {}, "prefill": {}}
    for kind in ("f32", "q8", "q4"):
        weights = layer_weights(pool, kind)
        times = {b: layer_time(weights, b, REPEATS) for b in BATCHES}
        report["decode"][kind] = {str(b): {"ms": 1e3 * t, "tokens_per_s": b / t, "vs_b1": b * times[1] / t}
                                  for b, t in times.items()}
        report["prefill"][kind] = {}
        for n in PROMPTS:
            t = layer_time(weights, n, 2 if args.quick else 3)
            report["prefill"][kind][str(n)] = {"s": t, "gflops": 2 * params * n / t / 1e9}
        del weights
    for kind in ("q8", "q4"):
        for n, r in report["prefill"][kind].items():
            r["vs_blas"] = r["gflops"] / report["prefill"]["f32"][n]["gflops"]
    return report


# --- batch: the engine ----------------------------------------------------------------------------------------------

def engine_decode_rate(model, batch, steps):
    """Aggregate tokens/s of `batch` sequences decoding together (timed once all have their first token)."""
    from bcnp.engine import Engine
    rng = np.random.default_rng(batch)
    engine = Engine(model, max_batch=batch)
    seqs = [engine.submit(rng.integers(0, V, 16), max_new_tokens=steps + 2, do_sample=False,
                          repetition_penalty=1.0, stop_ids=[]) for _ in range(batch)]
    while any(len(s.generated) == 0 for s in seqs):
        engine.step()
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        best = min(best, time.perf_counter() - start)
    return batch / best


def chat_turn_ttft(model, history):
    """(time to the first token of a turn after `history` tokens, reusing them; the same turn's new tokens alone)."""
    from bcnp.engine import Engine
    rng = np.random.default_rng(5)
    old, new = list(rng.integers(0, V, history)), list(rng.integers(0, V, 24))
    engine = Engine(model)
    first = engine.submit(old, max_new_tokens=8, do_sample=False, stop_ids=[])
    for _ in engine.run():
        pass

    def first_token(engine, prompt):
        start = time.perf_counter()
        seq = engine.submit(prompt, max_new_tokens=1, do_sample=False, stop_ids=[])
        while not seq.generated:
            engine.step()
        return time.perf_counter() - start, seq.reused

    reused_s, reused = first_token(engine, old + first.generated + new)
    alone_s, _ = first_token(Engine(model), first.generated + new)          # the same new tokens, no history
    return {"history": history, "new_tokens": len(first.generated) + len(new), "reused_tokens": reused,
            "ttft_s": reused_s, "alone_s": alone_s, "ratio": reused_s / alone_s}


def engine_report():
    config = model_config(args.layers)
    base = float_model(config, RandomPool())
    report, steps = {"threads": THREADS, "layers": args.layers}, 2 if args.quick else 4
    for kind, bits in (("float32", None), ("int8", 8), ("int4", 4)):
        model = base if bits is None else base.quantize(bits)
        rates = {b: engine_decode_rate(model, b, steps) for b in BATCHES}
        report[kind] = {str(b): r for b, r in rates.items()}
        report[kind + "_vs_b1"] = {str(b): r / rates[1] for b, r in rates.items()}
        if not args.json:
            print(f"{kind:8} " + "  ".join(f"B={b}: {r:6.1f} tok/s ({r / rates[1]:4.1f}x)" for b, r in rates.items()),
                  flush=True)
        if kind == "int4":
            report["chat_turn_int4"] = chat_turn_ttft(model, 256 if args.quick else 512)
            if not args.json:
                c = report["chat_turn_int4"]
                print(f"chat turn after {c['history']} tokens (int4): first token {c['ttft_s']:.2f} s reusing "
                      f"{c['reused_tokens']} cached tokens, against {c['alone_s']:.2f} s for its "
                      f"{c['new_tokens']} new tokens alone (ratio {c['ratio']:.2f})")
        del model
    return report


# --- main ---------------------------------------------------------------------------------------------------------

def main():
    prompt = args.prompt or (128 if args.quick else 512)
    t_start = time.time()
    bandwidth = Bandwidth()
    bw = max(bandwidth.probe() for _ in range(5))
    print(f"threads {THREADS}, kernels {_quant.SIMD}; memory read bandwidth {bw:.1f} GB/s (bcnp._quant.stream_read: "
          f"{THREADS} threads each summing a slice of 512 MiB); numpy copy {copy_bandwidth():.1f} GB/s "
          f"(read + write, 1 thread). Ratios below compare with a probe taken just before each run.")
    pool = RandomPool()
    rows = {}

    print("\n(b) one token through the five linears of one 13B layer, and lm_head")
    xs, x_head = layer_inputs(), np.ones((1, H), np.float32)
    for kind in ("f32", "q8", "q4"):
        weights = layer_weights(pool, kind)
        size = sum(w.nbytes for w in weights.values())
        t, ratio = bandwidth.measure(lambda: [linear(xs[n], w) for n, w in weights.items()], size)
        del weights
        head = pool((V, H))
        head = head if kind == "f32" else QuantizedWeight.from_float(head, 8)   # lm_head stays 8 bits in both modes
        t_head = best_time(lambda: linear(x_head, head))
        del head
        rows[kind] = {"layer_ms": 1e3 * t, "layer_mb": size / 1e6, "gbs": size / t / 1e9, "ratio": ratio,
                      "head_ms": 1e3 * t_head, "tok_s_13b": 1 / (LAYERS_13B * t + t_head)}
        print(f"  {kind}: {1e3 * t:7.2f} ms/layer  {size / 1e6:7.1f} MB  {size / t / 1e9:5.1f} GB/s "
              f"(ratio {ratio:.2f})   lm_head {1e3 * t_head:6.2f} ms")

    if have_model():
        config = model_config(args.layers)
        print(f"\n(c, d) Model with {args.layers} layers of 13B width + embedding + lm_head: "
              f"decode step, {prompt}-token prefill")
        base = float_model(config, pool)
        for kind in ("f32", "q8", "q4"):
            model = base if kind == "f32" else base.quantize(8 if kind == "q8" else 4)
            if kind == "q4":
                del base
            size = model_weight_bytes_per_token(model)
            t_step, ratio = bandwidth.measure(decode_step(model), size)
            t_prefill = prefill_time(model, prompt)
            r = rows[kind]
            per_layer = (t_step - r["head_ms"] / 1e3) / args.layers
            r.update(step_ms=1e3 * t_step, step_mb=size / 1e6, step_gbs=size / t_step / 1e9, step_ratio=ratio,
                     full_tok_s_13b=1 / (LAYERS_13B * per_layer + r["head_ms"] / 1e3),
                     prefill_tok_s=prompt / t_prefill,
                     prefill_tok_s_13b=prompt / (LAYERS_13B * t_prefill / args.layers))
            print(f"  {kind}: step {1e3 * t_step:7.1f} ms ({size / 1e6:.0f} MB, {size / t_step / 1e9:.1f} GB/s, "
                  f"ratio {ratio:.2f}); prefill {prompt} tokens {t_prefill:.2f} s = {prompt / t_prefill:.1f} tokens/s")
            del model

    print(f"\nsummary: {THREADS} threads, read bandwidth {max(bandwidth.seen):.1f} GB/s at best "
          f"({min(bandwidth.seen):.1f} at worst) during the run, {time.time() - t_start:.0f} s")
    print(f"{'':4} {'layer ms':>9} {'MB/layer':>9} {'GB/s':>6} {'ratio':>6} {'13B tok/s':>10} "
          f"{'step ms':>8} {'ratio':>6} {'13B tok/s':>10} {'prefill tok/s':>14} {'13B prefill':>12}")
    print(f"{'':4} {'kernels of one layer (b)':^44} {'model decode step (c)':^26} "
          f"{f'(d) {args.layers} layers':>14} {'tok/s':>12}")
    for kind, r in rows.items():
        line = (f"{kind:4} {r['layer_ms']:9.2f} {r['layer_mb']:9.1f} {r['gbs']:6.1f} {r['ratio']:6.2f} "
                f"{r['tok_s_13b']:10.2f}")
        if "step_ms" in r:
            line += (f" {r['step_ms']:8.1f} {r['step_ratio']:6.2f} {r['full_tok_s_13b']:10.2f} "
                     f"{r['prefill_tok_s']:14.1f} {r['prefill_tok_s_13b']:12.2f}")
        print(line)


if __name__ == "__main__":
    if args.command == "kernels":
        print(json.dumps(batch_report(), indent=1))
    elif args.command == "batch":
        report = engine_report()
        print(json.dumps(report) if args.json else f"\n{json.dumps(report)}")
    else:
        main()
