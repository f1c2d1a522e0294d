"""The first decode steps after a prefill, with OpenBLAS's idle threads spinning or not (issue 12).

    OMP_NUM_THREADS=2 python tools/blas_stall.py [--bits 4] [--prompt 128] [--rounds 2] [--json]

After every threaded call OpenBLAS's worker threads spin, waiting for more work, for 2^OPENBLAS_THREAD_TIMEOUT
cycles (OpenBLAS's default 2^28, ~0.1 s) before they sleep. bcnp's quantized linears are OpenMP kernels with their
own threads, so on a few cores whatever runs right after a BLAS call -- the linears after each layer's prefill
attention (numpy matmul), the first decode steps after a prefill -- shares the cores with a thread doing nothing.
OpenBLAS reads its environment once, when numpy loads it, so each setting runs in its own process:
  - "openblas default": OPENBLAS_THREAD_TIMEOUT=28, OpenBLAS's own default (bcnp before issue 12);
  - "bcnp": the environment as bcnp sets it on import (bcnp/__init__.py);
  - "openblas 1 thread": OPENBLAS_NUM_THREADS=1 (no worker threads at all; BLAS on one core).
Settings alternate over --rounds, and each process reports:
  - spin_cpu_s: the CPU seconds the process uses during 0.3 s of sleep right after a float32 GEMM (a direct
    reading of the spin: ~0 when the workers sleep at once);
  - kernels_after_gemm_ms / kernels_rested_ms: the best of 10 times of 8 matvecs of W_pack (bcnp's OpenMP
    kernel) right after that GEMM, and after 0.3 s of rest;
  - prefill_s: the best of 3 --prompt-token prefills of a --layers-layer 13B-width model (int4 or int8, random
    weights);
  - steps_ms: the 10 decode steps that follow it, then rested_ms: 10 more after 0.5 s of rest (the baseline);
    steps_cpu_ms / rested_cpu_ms: the CPU time of the process in each (all its threads: a spinning one shows).
"""
import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {"openblas default": {"OPENBLAS_THREAD_TIMEOUT": "28"}, "bcnp": {},
            "openblas 1 thread": {"OPENBLAS_NUM_THREADS": "1"}}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--layers", type=int, default=2, help="13B-width layers (default 2)")
    p.add_argument("--prompt", type=int, default=128, help="prefill length (default 128)")
    p.add_argument("--rounds", type=int, default=2, help="times each setting runs, alternated (default 2)")
    p.add_argument("--smoke", action="store_true", help="tiny widths: checks the script in seconds")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def child(args):
    """One process, one setting: the spin reading, then a prefill and the steps after it."""
    from benchkit import RandomPool, model_config, random_model
    import numpy as np

    pool = RandomPool()
    a, b = pool((40, 512, 128)), pool((40, 128, 512))              # one layer's prefill attention scores
    a @ b
    cpu = time.process_time()
    time.sleep(0.3)
    spin = time.process_time() - cpu

    model = random_model(model_config(args.layers, args.smoke), pool, args.bits)
    kernels_after, kernels_rested = kernels_after_gemm(model, a, b)
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, args.prompt + 20)
    prefill = float("inf")
    for _ in range(3):                                          # the best of 3; the steps follow the last
        cache = model.new_cache(args.prompt + 20)
        start = time.perf_counter()
        model.next_logits(ids[:args.prompt], cache)
        prefill = min(prefill, time.perf_counter() - start)

    def steps(first):
        wall, cpu = [], []
        for token in ids[first:first + 10]:
            start, start_cpu = time.perf_counter(), time.process_time()
            model.next_logits([token], cache)
            wall.append(1e3 * (time.perf_counter() - start))
            cpu.append(1e3 * (time.process_time() - start_cpu))
        return wall, cpu
    after, after_cpu = steps(args.prompt)
    time.sleep(0.5)
    rested, rested_cpu = steps(args.prompt + 10)
    return {"spin_cpu_s": spin, "kernels_after_gemm_ms": kernels_after, "kernels_rested_ms": kernels_rested,
            "prefill_s": prefill, "steps_ms": after, "rested_ms": rested,
            "steps_cpu_ms": after_cpu, "rested_cpu_ms": rested_cpu,
            "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}


def kernels_after_gemm(model, a, b, rounds=10):
    """Best ms of 8 matvecs of layer 0's W_pack (OpenMP) right after the GEMM a @ b, and after 0.3 s of rest."""
    import numpy as np
    w = model.w["model.layers.0.self_attn.W_pack.weight"]
    x = np.ones(model.config.hidden_size, np.float32)

    def kernels():
        start = time.perf_counter()
        for _ in range(8):
            w.matvec(x)
        return 1e3 * (time.perf_counter() - start)
    after, rested = [], []
    for _ in range(rounds):
        a @ b
        after.append(kernels())
        time.sleep(0.3)
        rested.append(kernels())
    return min(after), min(rested)


def run_setting(args, env):
    flags = ["--bits", str(args.bits), "--layers", str(args.layers), "--prompt", str(args.prompt)]
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *flags]
                            + (["--smoke"] if args.smoke else []),
                            env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the child process failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout)


def summary(runs):
    """Per setting: medians over its rounds (best times for the matvecs and the prefill: the least disturbed)."""
    import statistics as st
    return {"spin_cpu_s": st.median(r["spin_cpu_s"] for r in runs),
            "kernels_after_gemm_ms": min(r["kernels_after_gemm_ms"] for r in runs),
            "kernels_rested_ms": min(r["kernels_rested_ms"] for r in runs),
            "prefill_s": min(r["prefill_s"] for r in runs),
            "first_3_steps_ms": st.median(s for r in runs for s in r["steps_ms"][:3]),
            "rested_steps_ms": st.median(s for r in runs for s in r["rested_ms"]),
            "first_3_steps_cpu_ms": st.median(s for r in runs for s in r["steps_cpu_ms"][:3]),
            "rested_steps_cpu_ms": st.median(s for r in runs for s in r["rested_cpu_ms"]),
            "openblas_thread_timeout": runs[0]["openblas_thread_timeout"]}


def main():
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            runs[name].append(run_setting(args, env))
    report = {"threads": os.environ.get("OMP_NUM_THREADS"), "bits": args.bits, "layers": args.layers,
              "prompt": args.prompt, "settings": {n: summary(r) for n, r in runs.items()}, "runs": runs}
    if args.json:
        print(json.dumps(report))
        return
    print(f"int{args.bits}, {args.layers} layers of 13B width, {args.prompt}-token prefill, "
          f"OMP_NUM_THREADS={report['threads']}; {args.rounds} alternated rounds: best times for matvecs and prefill, "
          "medians for steps")
    print(f"{'':18} {'spin':>6} {'8 matvecs, ms':>15} {'prefill':>8} {'wall ms per step':>17} "
          f"{'CPU ms per step':>17}   last round's")
    print(f"{'setting':18} {'CPU s':>6} {'after':>7} {'rested':>7} {'s':>8} {'1-3':>8} {'rested':>8} {'1-3':>8} "
          f"{'rested':>8}   steps 1..10, ms")
    for name, s in report["settings"].items():
        first = " ".join(f"{t:.0f}" for t in runs[name][-1]["steps_ms"])
        print(f"{name:18} {s['spin_cpu_s']:6.3f} {s['kernels_after_gemm_ms']:7.1f} {s['kernels_rested_ms']:7.1f} "
              f"{s['prefill_s']:8.2f} {s['first_3_steps_ms']:8.1f} {s['rested_steps_ms']:8.1f} "
              f"{s['first_3_steps_cpu_ms']:8.1f} {s['rested_steps_cpu_ms']:8.1f}   {first}")


if __name__ == "__main__":
    main()
