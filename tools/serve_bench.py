"""Serving benchmark: aggregate tokens/s and time to first token with 1, 4 and 8 concurrent streaming clients.

    OMP_NUM_THREADS=2 python tools/serve_bench.py [--threads 2] [--bits 4] [--clients 1,4,8] [--json]

The model has 2 layers of Baichuan-13B's real widths (hidden 5120, intermediate 13696, 40 heads, ALiBi) with random
weights (`bcnp.weights.random_weights`), quantized like a converted checkpoint (int4 linears, int8 lm_head), and the
demo model's tokenizer, so the vocabulary is cut to its 1000 pieces: the decoder layers cost what they cost in the
13B, the lm_head almost nothing. The server runs in this process on a free port (`bcnp.server.Server`), the clients
are threads speaking raw HTTP (http.client: they only wait on sockets, the engine keeps the cores). Each client sends
`--requests` streamed chat requests one after another, each a different question ("Question r from client c: what
is mountain number ...?", 30-34 tokens with the role tokens; the demo tokenizer cuts words small, so requests with
the same r share their first 14-16 tokens: a round's first request reaches an idle server and is prefilled alone,
and the others, a few ms behind it, take those tokens from its cache), greedy, `--max-tokens` long; eos is ignored
so every reply has the same length.

Per concurrency level: aggregate completion tokens/s (all completion tokens / wall time of the level) and the time
from sending a request to its first content delta (TTFT), p50 and p95 over all its requests.
"""
import argparse
import dataclasses
import json
import os
import sys
import threading
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="threads for the kernels and BLAS (default 2)")
    p.add_argument("--bits", type=int, choices=(8, 4), default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--clients", default="1,4,8", help="concurrency levels (default 1,4,8)")
    p.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    p.add_argument("--max-tokens", type=int, default=16, help="completion tokens per request (default 16)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args()


args = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):    # before numpy starts its pools
    os.environ[var] = str(args.threads)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import http.client  # noqa: E402

import numpy as np  # noqa: E402

from bcnp import Model  # noqa: E402
from bcnp.config import BAICHUAN_13B  # noqa: E402
from bcnp.demo import build_demo_model  # noqa: E402
from bcnp.sampling import GenerationConfig  # noqa: E402
from bcnp.server import Server  # noqa: E402
from bcnp.tokenizer import Tokenizer  # noqa: E402
from bcnp.weights import random_weights  # noqa: E402


def bench_model():
    tokenizer = Tokenizer(os.path.join(build_demo_model(), "tokenizer.model"))
    config = dataclasses.replace(BAICHUAN_13B, num_hidden_layers=args.layers, vocab_size=tokenizer.vocab_size)
    model = Model(config, random_weights(config, seed=0), tokenizer=tokenizer,
                  generation_config=GenerationConfig(max_new_tokens=args.max_tokens))
    return model.quantize(args.bits)


def ignore_eos(engine):
    submit = engine.submit
    engine.submit = lambda *a, **kw: submit(*a, **{**kw, "stop_ids": []})


def one_request(port, question):
    """(seconds to the first content delta, completion tokens) of one streamed greedy chat request."""
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": question}], "stream": True,
                       "max_tokens": args.max_tokens, "temperature": 0, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first, tokens = None, None
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[len(b"data: "):])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    response.close()
    connection.close()
    return first, tokens


def level(port, clients):
    results, lock = [], threading.Lock()

    def client(c):
        for r in range(args.requests):
            out = one_request(port, f"Question {r} from client {c}: what is mountain number {c * 100 + r}?")
            with lock:
                results.append(out)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = np.array([first for first, _ in results])
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
            "ttft_p95_s": round(float(np.percentile(ttft, 95)), 3)}


def main():
    levels = [int(c) for c in args.clients.split(",")]
    t = time.perf_counter()
    model = bench_model()
    print(f"model: {args.layers} layers of Baichuan-13B width, int{args.bits}, vocab {model.config.vocab_size}, "
          f"built in {time.perf_counter() - t:.1f} s; {args.threads} threads; load average {os.getloadavg()[0]:.1f}"
          "", file=sys.stderr)
    server = Server(("127.0.0.1", 0), model, model_name="bench", max_batch=max(levels), max_waiting=max(levels),
                    io_timeout=600, log=lambda line: None)
    ignore_eos(server.loop.engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        one_request(server.port, "warm up")
        rows = [level(server.port, c) for c in levels]
    finally:
        server.close()
    base = rows[0]
    for row in rows:
        row["tokens_per_s_vs_1"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
        row["ttft_p95_vs_1"] = round(row["ttft_p95_s"] / base["ttft_p95_s"], 2)
    if args.json:
        print(json.dumps({"threads": args.threads, "bits": args.bits, "layers": args.layers,
                          "max_tokens": args.max_tokens,
                          "load_average": os.getloadavg()[0], "levels": rows}, indent=2))
        return
    print(f"{'clients':>7} {'requests':>8} {'tokens':>6} {'seconds':>8} {'tok/s':>7} {'x1':>5} "
          f"{'TTFT p50':>9} {'TTFT p95':>9} {'x1':>5}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['completion_tokens']:>6} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>7.2f} {r['tokens_per_s_vs_1']:>5.2f} {r['ttft_p50_s']:>8.3f}s "
              f"{r['ttft_p95_s']:>8.3f}s {r['ttft_p95_vs_1']:>5.2f}")


if __name__ == "__main__":
    main()
