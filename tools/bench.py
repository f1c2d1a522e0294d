"""CPU prefill / decode benchmark at Baichuan-13B width against this machine's two ceilings, all from one run.

    python tools/bench.py [--threads N] [--layers 2] [--quick] [--json] [--cache-dtype {float16,float32}]
    python tools/bench.py batch [--threads N] [--quick] [--json] [--busy N]   (the engine: B sequences together)
    python tools/bench.py kernels [--threads N] [--quick]          (JSON: the linears at several tokens per call)

The default report, for float32, int8 and int4 models of `--layers` layers of Baichuan-13B's widths (hidden 5120,
MLP 13696, 40 heads, vocabulary 64000; random weights, whose values do not matter for speed):
  ceilings  the memory read bandwidth (bcnp._quant.stream_read: every thread sums its own slice of 512 MiB, the
            access pattern of the decode matvec; probed again just before every decode measurement, because on a
            shared virtual machine it drifts by tens of percent) and the float32 GEMM throughput of numpy's BLAS
            on the prefill's widest shape, 512x5120 @ 5120x13696 (best of several);
  prefill   16, 128 and 512-token prompts to the last token's logits: tokens/s, and the linear layers' GFLOP/s
            (2 x linear parameters x tokens / time; the time includes attention, norms and lm_head, as a user
            waits for them) as a fraction of the BLAS ceiling;
  decode    one token at 128, 1024 and 2048 cached positions (the cache filled with random keys and values, not
            by a prefill: the cost of a step does not depend on them): ms per token, and the bytes it reads
            (weights, plus the cache's keys and values) / time as a fraction of the bandwidth probed just before
            (median over runs); the ratio decode(2048) / decode(128);
  after a prefill  the 10 decode steps right after a 128-token prefill, against steps after a rest (issue 12's
            stall; tools/blas_stall.py measures OpenBLAS's idle threads setting by setting, see bcnp/__init__.py);
  ALiBi vs RoPE  Baichuan-13B (ALiBi) against the same int4 weights run as a RoPE model (position_embedding
            "rope", theta 10000, as Baichuan-7B and Baichuan2-7B) at 2000 positions, alternated, and what that
            says about the seed's claim that ALiBi makes 13B generate 31.6% faster than LLaMA-13B.
Whole-13B figures are extrapolated from the layers measured: t(13B) = 40 t(layer) + t(lm_head), with t(layer)
= (t(model) - t(lm_head)) / layers and lm_head timed alone. --quick: fewer repetitions (~3 minutes on 2 threads);
--json: the report as one object on stdout; --smoke: tiny widths, one repetition (checks the script in seconds).
--cache-dtype sets Model.cache_dtype (default: what the model picks); the report says which dtype the cache had.

`batch` runs bcnp.engine on a `--layers`-layer model of 13B width: B = 1, 2, 4, 8, 16 sequences decode together
after a 16-token prompt each (the widths take turns, one engine step each, best of 8 per width), and it reports
the aggregate decode tokens/s per weight kind ({"int4": {"1": tok/s,
...}, ...} with --json, plus "vs_b1" ratios and the chat turn below); then a chat turn after a 512-token history
(--quick: 256): the time to its first token, reusing the history's cache, against the same turn's new tokens alone
on a fresh engine, each the best of 3 (taking turns); then a burst of 8 chat prompts that share a template and
their first words, submitted together after an earlier request (`burst_ttft`): the time until each has its first
token and how many of their prompt tokens the engine computed (the rest it took from a cache).  --busy N runs N
Python threads beside the decoding widths, each busy building JSON 0.3 ms of every 3.3 ms, as a server's request
handlers and its clients share the cores with the engine.

`kernels` prints one JSON object: for the five linears of one 13B layer in float32 (BLAS), int8 and int4,
  - "decode": B = 1, 2, 4, 8, 16 tokens per call (the batched kernels; float32: x @ W.T), aggregate tokens/s and
    its ratio to B = 1 in the same run;
  - "prefill": seconds per layer for 16 / 128 / 512 tokens, GFLOP/s (2 x parameters x tokens / time) and its ratio
    to the float32 BLAS GEMM of the same layer at the same length, measured in the same run.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import threading
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="threads (default: $OMP_NUM_THREADS, else all cores)")
    p.add_argument("--layers", type=int, default=2, help="13B-width layers in the model runs (default 2)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (~3 minutes on 2 threads)")
    p.add_argument("--smoke", action="store_true", help="tiny widths, one repetition: checks the script")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default=None,
                   help="the KV cache's dtype (default: what the model picks)")
    p.add_argument("command", nargs="?", choices=["batch", "kernels"],
                   help="batch: the engine, B sequences at once; kernels: the linears at several tokens per call")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing else")
    p.add_argument("--busy", type=non_negative, default=0, metavar="N",
                   help="batch: N Python threads beside the engine, each busy 10%% of the time (default 0)")
    return p.parse_args()


def non_negative(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


args = parse_args()
if args.threads:          # before numpy (OpenBLAS) and the OpenMP kernels start their thread pools
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

from benchkit import (KINDS, LAYERS_13B, Bandwidth, RandomPool, best_time, blas_gflops,  # noqa: E402
                      cache_bytes_per_token, filled_cache, model_config, random_model, weight_bytes_per_token)
import numpy as np  # noqa: E402

from bcnp import _quant  # noqa: E402
from bcnp.layout import is_linear  # noqa: E402
from bcnp import Model  # noqa: E402
from bcnp.forward import attention, attention_bias, rope, softmax, transformer  # noqa: E402
from bcnp.weights import rope_inv_freq, with_rope_table  # noqa: E402
from bcnp.quant import QuantizedWeight  # noqa: E402

H, I = 5120, 13696
LINEARS = {"self_attn.W_pack": (3 * H, H), "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H),
           "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
THREADS = _quant.resolve_threads(args.threads or 0)
REPEATS = 1 if args.smoke else 3 if args.quick else 7
PROMPTS, CONTEXTS, ROPE_CONTEXT, SEED_CLAIM = (16, 128, 512), (128, 1024, 2048), 2000, 31.6
BLAS_SHAPE = (64, 128, 344) if args.smoke else (512, H, I)     # the prefill's widest GEMM: 512 tokens @ gate_proj


def say(*lines):
    if not args.json:
        print(*lines, sep="\n", flush=True)


# --- the default report: prefill and decode against the two ceilings ------------------------------------------

def new_model(config, pool, bits):
    model = random_model(config, pool, bits)
    if args.cache_dtype:
        model.cache_dtype = np.dtype(args.cache_dtype)
    return model


def lm_head_time(model):
    """One token through lm_head alone: the part of a step that does not scale with the layers."""
    head, x = model.w["lm_head.weight"], np.ones((1, model.config.hidden_size), np.float32)
    return best_time(lambda: head.matmul(x) if isinstance(head, QuantizedWeight) else x @ head.T, REPEATS)


def whole_13b(t_model, t_head, layers):
    """Seconds for the 40-layer model from `layers` layers: 40 t(layer) + t(lm_head). (Tiny --smoke layers can
    take less than the noise in t(lm_head): t(layer) is at least 0.)"""
    return LAYERS_13B * max(t_model - t_head, 0.0) / layers + t_head


def linear_parameters(config):
    """Parameters of the layers' linears (lm_head apart: a prefill runs it on the last token only)."""
    return sum(math.prod(shape) for name, shape in config.weight_shapes().items()
               if is_linear(name) and name != "lm_head.weight")


def prefill_row(model, n, t_head, blas):
    """A fresh n-token prompt to its last token's logits (what generation needs)."""
    ids = np.random.default_rng(n).integers(0, model.config.vocab_size, n)
    t = best_time(lambda: transformer(model.xp, model.w, model.config, ids, model.new_cache(n), last_only=True),
                  1 if args.quick or args.smoke else 2)
    gflops = 2 * linear_parameters(model.config) * n / t / 1e9
    return {"s": t, "tok_s": n / t, "tok_s_13b": n / whole_13b(t, t_head, args.layers), "gflops": gflops,
            "vs_blas": gflops / blas}


def decode_rows(model, pool, bandwidth, t_head):
    """One token at each of CONTEXTS cached positions (one filled cache, rewound to each context per step)."""
    cache, token = filled_cache(model, max(CONTEXTS), pool), [1]
    rows = {}
    for context in CONTEXTS:
        def step():
            cache.length = context
            model.forward(token, cache)
        nbytes = weight_bytes_per_token(model) + cache_bytes_per_token(cache, context)
        t, ratio = bandwidth.measure(step, nbytes, REPEATS)
        rows[str(context)] = {"ms": 1e3 * t, "mb": nbytes / 1e6, "gbs": nbytes / t / 1e9, "vs_bandwidth": ratio,
                              "tok_s_13b": 1 / whole_13b(t, t_head, args.layers)}
    rows["ratio_2048_128"] = rows["2048"]["ms"] / rows["128"]["ms"]
    return rows, np.dtype(cache.k.dtype).name


def steps_after_prefill(model, prompt=128, steps=10):
    """ms of each of `steps` decode steps right after a prefill, and the median of as many after 0.5 s of rest."""
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, prompt + 2 * steps)
    cache = model.new_cache(len(ids))

    def timed(tokens):
        out = []
        for token in tokens:
            t = time.perf_counter()
            model.next_logits([token], cache)
            out.append(1e3 * (time.perf_counter() - t))
        return out
    model.next_logits(ids[:prompt], cache)
    after = timed(ids[prompt:prompt + steps])
    time.sleep(0.5)
    return {"prompt": prompt, "steps_ms": after, "rested_ms": float(np.median(timed(ids[prompt + steps:])))}


def alibi_vs_rope(model, pool, t_head):
    """Decode at ROPE_CONTEXT positions with ALiBi and with RoPE on the same weights, a step of each in turn (both
    see the same machine), and what each scheme adds to a step, timed alone."""
    rope_config = dataclasses.replace(model.config, position_embedding="rope")
    rope = Model(rope_config, with_rope_table(rope_config, dict(model.w)))
    rope.cache_dtype = model.cache_dtype
    models = {"alibi": model, "rope": rope}
    caches = {name: filled_cache(m, ROPE_CONTEXT, pool) for name, m in models.items()}

    def step(name):
        caches[name].length = ROPE_CONTEXT
        start = time.perf_counter()
        models[name].forward([1], caches[name])
        return time.perf_counter() - start
    times = {name: [] for name in models}
    for i in range(1 + (1 if args.smoke else 12 if args.quick else 30)):
        for name in models:
            t = step(name)
            if i:                                                   # the first pair warms up
                times[name].append(t)
    alibi, rope_t = (whole_13b(min(times[n]), t_head, args.layers) for n in models)
    return {"positions": ROPE_CONTEXT, "weights": "int4", "alibi_ms": 1e3 * min(times["alibi"]),
            "rope_ms": 1e3 * min(times["rope"]),
            "rope_over_alibi_median": float(np.median(np.divide(times["rope"], times["alibi"]))),
            "alibi_tok_s_13b": 1 / alibi, "rope_tok_s_13b": 1 / rope_t,
            "alibi_faster_pct": 100 * (rope_t / alibi - 1), "seed_claim_pct": SEED_CLAIM,
            "position_work_us": position_work_us(model.config), "attention_alone": attention_alone(model.config, pool)}


def position_work_us(config):
    """Microseconds of what each scheme adds to one decode step at ROPE_CONTEXT positions: the bias (built once a
    step; ALiBi's holds slope x distance for every head, RoPE's the causal mask only), and RoPE's rotation of one
    token's q and k (every layer)."""
    q_pos, k_pos = np.arange(ROPE_CONTEXT, ROPE_CONTEXT + 1), np.arange(ROPE_CONTEXT + 1)
    rope_config = dataclasses.replace(config, position_embedding="rope")
    q = np.ones((1, config.num_attention_heads, config.head_dim), np.float32)
    inv_freq = rope_inv_freq(rope_config)
    us = {"alibi_bias": lambda: attention_bias(np, config, q_pos, k_pos),
          "rope_mask": lambda: attention_bias(np, rope_config, q_pos, k_pos),
          "rope_q_k_per_layer": lambda: (rope(np, q, q_pos, inv_freq), rope(np, q, q_pos, inv_freq))}
    return {name: 1e6 * best_time(f, 50) for name, f in us.items()}


def attention_alone(config, pool):
    """One layer's decode attention at ROPE_CONTEXT positions alone (bcnp.forward.attention, random q, k, v): with
    ALiBi's bias, with RoPE's mask, and with ALiBi's bias through a plain softmax that keeps its far scores. ALiBi
    puts far keys 87 to 104 below their row's best score, where exp gives float32 subnormals, and x86 computes with
    subnormals ~40x slower (microcode assists: in exp, the division and the probabilities @ values GEMM);
    bcnp.forward.softmax drops scores more than 80 below the row's max (they weigh < e^-80 ~ 1.8e-35 against a sum
    >= 1), and this measures what that saves."""
    nh, hd, S = config.num_attention_heads, config.head_dim, ROPE_CONTEXT + 1
    q, k, v = pool((nh, 1, hd)), pool((nh, S, hd)), pool((nh, S, hd))
    q_pos, k_pos = np.arange(S - 1, S), np.arange(S)
    alibi = attention_bias(np, config, q_pos, k_pos)
    rope_mask = attention_bias(np, dataclasses.replace(config, position_embedding="rope"), q_pos, k_pos)
    shifted = (q @ k.transpose(0, 2, 1)) / math.sqrt(hd) + alibi
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    tiny = np.finfo(np.float32).tiny

    def alibi_uncut():
        x = (q @ k.transpose(0, 2, 1)) / math.sqrt(hd) + alibi
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)) @ v
    ms = {"alibi_ms": lambda: attention(np, q, k, v, alibi), "rope_ms": lambda: attention(np, q, k, v, rope_mask),
          "alibi_uncut_ms": alibi_uncut}
    out = {name: 1e3 * best_time(f, max(REPEATS, 10)) for name, f in ms.items()}
    with np.errstate(under="ignore"):
        plain = np.exp(shifted)
    out["alibi_subnormal_probabilities"] = int(((plain > 0) & (plain < tiny)).sum())    # before the division
    out["probabilities"] = shifted.size
    out["alibi_cut_max_difference"] = float(np.abs(alibi_uncut() - attention(np, q, k, v, alibi)).max())
    return out


def report():
    pool = RandomPool()
    bandwidth = Bandwidth(THREADS, 16 if args.smoke else 512)
    config = model_config(args.layers, args.smoke)
    out = {"threads": THREADS, "kernels": _quant.SIMD, "layers": args.layers, "extrapolated_to_layers": LAYERS_13B,
           "widths": {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
                      "heads": config.num_attention_heads, "vocab": config.vocab_size},
           "ceilings": {"read_gbs_start": max(bandwidth.probe() for _ in range(5)),
                        "blas_gflops": blas_gflops(*BLAS_SHAPE, max(2, REPEATS), pool), "blas_shape": BLAS_SHAPE},
           "cache_dtype": {}, "prefill": {}, "decode": {}, "after_prefill": {}}
    blas = out["ceilings"]["blas_gflops"]
    say(f"threads {THREADS}, kernels {_quant.SIMD}; ceilings: memory read {out['ceilings']['read_gbs_start']:.1f} "
        "GB/s, "
        f"float32 GEMM {blas:.1f} GFLOP/s ({'x'.join(map(str, BLAS_SHAPE[:2]))} @ "
        f"{'x'.join(map(str, BLAS_SHAPE[1:]))})")
    for kind, bits in KINDS.items():
        model = new_model(config, pool, bits)
        t_head = lm_head_time(model)
        out["prefill"][kind] = {str(n): prefill_row(model, n, t_head, blas) for n in PROMPTS}
        out["decode"][kind], out["cache_dtype"][kind] = decode_rows(model, pool, bandwidth, t_head)
        if bits:
            out["after_prefill"][kind] = steps_after_prefill(model)
        if bits == 4:
            out["alibi_vs_rope"] = alibi_vs_rope(model, pool, t_head)
        say(f"  {kind} measured ({time.strftime('%H:%M:%S')})")
        del model
    out["ceilings"].update(read_gbs=max(bandwidth.seen), read_gbs_worst=min(bandwidth.seen))
    return out


def print_report(r):
    c, widths = r["ceilings"], r["widths"]
    print(f"\n{r['layers']} layers of Baichuan-13B's widths (hidden {widths['hidden']}, MLP {widths['intermediate']}, "
          f"{widths['heads']} heads, vocabulary {widths['vocab']}), random weights, {r['threads']} threads; "
          f"13B figures extrapolated to {r['extrapolated_to_layers']} layers")
    print(f"ceilings: memory read {c['read_gbs']:.1f} GB/s (best probe; {c['read_gbs_worst']:.1f} at worst during "
          f"the run), float32 BLAS GEMM {c['blas_gflops']:.1f} GFLOP/s; KV cache dtype of the "
          + ", ".join(f"{k} model {d}" for k, d in r["cache_dtype"].items()))
    print(f"\nprefill  {'tokens':>6} {'s':>7} {'tok/s':>7} {'13B tok/s':>10} {'GFLOP/s':>8} {'÷ BLAS':>7}")
    for kind, rows in r["prefill"].items():
        for n, p in rows.items():
            print(f"{kind:8} {n:>6} {p['s']:7.2f} {p['tok_s']:7.1f} {p['tok_s_13b']:10.2f} {p['gflops']:8.1f} "
                  f"{p['vs_blas']:7.2f}")
    print(f"\ndecode   {'context':>7} {'ms':>7} {'13B tok/s':>10} {'MB read':>8} {'GB/s':>6} {'÷ bandwidth':>11}")
    for kind, rows in r["decode"].items():
        for n in map(str, CONTEXTS):
            d = rows[n]
            print(f"{kind:8} {n:>7} {d['ms']:7.1f} {d['tok_s_13b']:10.2f} {d['mb']:8.0f} {d['gbs']:6.1f} "
                  f"{d['vs_bandwidth']:11.2f}")
        print(f"{kind:8} decode(2048) / decode(128) = {rows['ratio_2048_128']:.2f}")
    for kind, a in r["after_prefill"].items():
        print(f"\n{kind}: the 10 steps after a {a['prompt']}-token prefill, ms: "
              + " ".join(f"{t:.0f}" for t in a["steps_ms"]) + f"; after a rest {a['rested_ms']:.0f}", end="")
    a, w = r["alibi_vs_rope"], r["alibi_vs_rope"]["position_work_us"]
    print(f"\n\nALiBi vs RoPE, {a['weights']} at {a['positions']} positions, steps alternated: ALiBi "
          f"{a['alibi_ms']:.1f} ms, RoPE {a['rope_ms']:.1f} ms per step (RoPE / ALiBi step by step: median "
          f"{a['rope_over_alibi_median']:.3f}); 13B {a['alibi_tok_s_13b']:.2f} against {a['rope_tok_s_13b']:.2f} "
          f"tok/s: ALiBi {a['alibi_faster_pct']:+.1f}%.")
    print(f"What each adds to a step, timed alone: ALiBi's bias {w['alibi_bias']:.0f} us (once), RoPE's mask "
          f"{w['rope_mask']:.0f} us (once) + its rotation of q and k {w['rope_q_k_per_layer']:.0f} us per layer "
          f"({r['extrapolated_to_layers'] * w['rope_q_k_per_layer'] / 1e3:.1f} ms in 40 layers).")
    w = a["attention_alone"]
    print(f"One layer's attention alone: ALiBi {w['alibi_ms']:.2f} ms, RoPE {w['rope_ms']:.2f} ms. Through a plain "
          f"softmax ALiBi makes {w['alibi_subnormal_probabilities']} of its {w['probabilities']} exp values float32 "
          f"subnormals (scores 87 to 104 below their row's max), slow on x86: {w['alibi_uncut_ms']:.2f} ms; "
          f"bcnp.forward.softmax drops the scores more than 80 below the max (max difference "
          f"{w['alibi_cut_max_difference']:.1e}).")
    print(f"The seed's +{a['seed_claim_pct']}% (25.4 against 19.4 tok/s over 2000 generated tokens) compares "
          "Baichuan-13B with LLaMA-13B in their Hugging Face code: other widths, vocabulary and implementation. "
          "On the same weights and code, the position scheme alone is the difference above.")


# --- kernels: several tokens per call ------------------------------------------------------------------------------

BATCHES = (1, 2, 4, 8, 16)


def layer_weights(pool, kind):
    """The five linears of one layer as float32 arrays or QuantizedWeight (8 or 4 bits)."""
    out = {}
    for name, shape in LINEARS.items():
        w = pool(shape)
        out[name] = w if kind == "f32" else QuantizedWeight.from_float(w, 8 if kind == "q8" else 4)
    return out


def linear(x, w):
    return w.matmul(x) if isinstance(w, QuantizedWeight) else x @ w.T


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

def engine_decode_rates(model, batches, steps):
    """{B: aggregate tokens/s of B sequences decoding together} for every B in `batches`, each the best of `steps`
    engine steps timed once all its sequences have their first token. The widths take turns, one step each: the
    machine's speed drifts by tens of percent over a minute (a neighbour's load, even on the tile unit), and
    interleaving lets every width see the same drift, so the ratios to B = 1 hold even where the rates move."""
    from bcnp.engine import Engine
    engines, best = {}, {}
    for batch in batches:
        rng = np.random.default_rng(batch)
        engine = engines[batch] = Engine(model, max_batch=batch)
        seqs = [engine.submit(rng.integers(0, model.config.vocab_size, 16), max_new_tokens=steps + 2,
                              do_sample=False, repetition_penalty=1.0, stop_ids=[]) for _ in range(batch)]
        while any(len(s.generated) == 0 for s in seqs):
            engine.step()
        best[batch] = float("inf")
    for _ in range(steps):
        for batch, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            best[batch] = min(best[batch], time.perf_counter() - start)
    return {batch: batch / best[batch] for batch in batches}


@contextlib.contextmanager
def busy_threads(n):
    """n Python threads, each building JSON for 0.3 ms of every 3.3 ms until the block ends."""
    done = threading.Event()

    def busy():
        while not done.is_set():
            start = time.perf_counter()
            while time.perf_counter() - start < 0.0003:
                json.dumps({"choices": [{"delta": {"content": "mountain"}}], "id": "chatcmpl-0"})
            done.wait(0.003)
    threads = [threading.Thread(target=busy, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        done.set()
        for t in threads:
            t.join()


def chat_turn_ttft(model, history, rounds=3):
    """(time to the first token of a turn after `history` tokens, reusing them; the same turn's new tokens alone),
    each the best of `rounds`, taking turns: one first token is a single measurement, and on this shared machine a
    single one moved the ratio from 1.03 to 1.58 between two runs of the same build."""
    from bcnp.engine import Engine
    rng = np.random.default_rng(5)
    old, new = (list(rng.integers(0, model.config.vocab_size, n)) for n in (history, 24))

    def first_token(engine, prompt):
        start = time.perf_counter()
        seq = engine.submit(prompt, max_new_tokens=1, do_sample=False, stop_ids=[])
        while not seq.generated:
            engine.step()
        return time.perf_counter() - start, seq.reused

    best = {"reused": math.inf, "alone": math.inf}
    for _ in range(rounds):
        engine = Engine(model)
        first = engine.submit(old, max_new_tokens=8, do_sample=False, stop_ids=[])
        for _ in engine.run():
            pass
        reused_s, reused = first_token(engine, old + first.generated + new)
        alone_s, _ = first_token(Engine(model), first.generated + new)      # the same new tokens, no history
        best = {"reused": min(best["reused"], reused_s), "alone": min(best["alone"], alone_s)}
    return {"history": history, "new_tokens": len(first.generated) + len(new), "reused_tokens": reused,
            "ttft_s": best["reused"], "alone_s": best["alone"], "ratio": best["reused"] / best["alone"],
            "rounds": rounds}


def burst_ttft(model, clients=8, rounds=3):
    """A burst of `clients` chat requests after an earlier request: the time until every one has its first token
    and the prompt tokens the engine computed for them, each the best of `rounds`. The prompts are built like
    tools/serve_bench.py's: a template whose first 5 tokens the earlier request's cache still holds, 10 more that
    the burst's prompts share (a question's first words), and 16 of each prompt's own."""
    from bcnp.engine import Engine
    rng = np.random.default_rng(7)
    held, shared = (list(rng.integers(0, model.config.vocab_size, n)) for n in (5, 10))

    def burst(engine):
        prompts = [held + shared + list(rng.integers(0, model.config.vocab_size, 16)) for _ in range(clients)]
        computed = engine.prompt_tokens - engine.reused_tokens
        start = time.perf_counter()
        seqs = [engine.submit(p, max_new_tokens=1, do_sample=False, stop_ids=[]) for p in prompts]
        while engine.busy:
            engine.step()
        assert all(len(s.generated) == 1 for s in seqs)
        return time.perf_counter() - start, engine.prompt_tokens - engine.reused_tokens - computed

    best, computed = math.inf, None
    for _ in range(rounds):
        engine = Engine(model, max_batch=clients)
        engine.submit(held + list(rng.integers(0, model.config.vocab_size, 20)), max_new_tokens=1, stop_ids=[])
        for _ in engine.run():
            pass
        seconds, computed = burst(engine)
        best = min(best, seconds)
    return {"clients": clients, "prompt_tokens": clients * (len(held) + len(shared) + 16), "computed": computed,
            "seconds": best, "rounds": rounds}


def engine_report():
    config, pool = model_config(args.layers, args.smoke), RandomPool()
    # best of 8 steps per width: with 4, B = 1 moved by 20% from run to run on this shared machine, and every ratio
    # to it with it (engine_decode_rates interleaves the widths for the same reason)
    report, steps = {"threads": THREADS, "layers": args.layers, "busy": args.busy}, 2 if args.quick else 8
    for kind, bits in KINDS.items():
        model = random_model(config, pool, bits)
        with busy_threads(args.busy):
            rates = engine_decode_rates(model, BATCHES, steps)
        report[kind] = {str(b): r for b, r in rates.items()}
        report[kind + "_vs_b1"] = {str(b): r / rates[1] for b, r in rates.items()}
        say(f"{kind:8} " + "  ".join(f"B={b}: {r:6.1f} tok/s ({r / rates[1]:4.1f}x)" for b, r in rates.items()))
        if kind == "int4":
            c = report["chat_turn_int4"] = chat_turn_ttft(model, 256 if args.quick else 512, 1 if args.smoke else 3)
            say(f"chat turn after {c['history']} tokens (int4): first token {c['ttft_s']:.2f} s reusing "
                f"{c['reused_tokens']} cached tokens, against {c['alone_s']:.2f} s for its "
                f"{c['new_tokens']} new tokens alone (ratio {c['ratio']:.2f})")
            b = report["burst_int4"] = burst_ttft(model, rounds=1 if args.smoke else 3)
            say(f"a burst of {b['clients']} chat prompts after a request (int4): every first token in "
                f"{b['seconds']:.2f} s, {b['computed']} of their {b['prompt_tokens']} prompt tokens computed")
        del model
    return report


if __name__ == "__main__":
    if args.command == "kernels":
        print(json.dumps(batch_report(), indent=1))
    elif args.command == "batch":
        result = engine_report()
        print(json.dumps(result) if args.json else f"\n{json.dumps(result)}")
    else:
        start = time.time()
        result = report()
        result["seconds"] = time.time() - start
        if args.json:
            print(json.dumps(result))
        else:
            print_report(result)
            print(f"\n({result['seconds']:.0f} s)")
