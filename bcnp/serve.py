"""An OpenAI-compatible HTTP server on bcnp's engine (continuous batching, cache reuse).

    python -m bcnp.serve --demo                                  # a tiny random-weight model on 127.0.0.1:8000
    python -m bcnp.serve --model DIR --quantize 4 [--api-key KEY] [--host 0.0.0.0] [--port 8000]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (docs/server.md).
It binds 127.0.0.1 unless told otherwise. One line per request goes to stderr. SIGINT or SIGTERM stops
accepting, gives in-flight requests `--shutdown-grace` seconds, cancels the rest and exits 0.
"""
import argparse
import os
import signal
import sys
import threading

from .engine import PREFILL_CHUNK
from .errors import one_line
from .generate import EXIT_ERROR, EXIT_USAGE, ArgumentParser, UsageError, add_model_arguments, load_model


def parse_args(argv):
    p = ArgumentParser(prog="python -m bcnp.serve", description="Serve a Baichuan model over OpenAI's HTTP API.")
    add_model_arguments(p, "serve the tiny random-weight demo model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--model-name", help="the model id clients see (default: the directory's name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $BCNP_API_KEY, else none)")
    p.add_argument("--cors-origin", metavar="ORIGIN", help="allow browsers from ORIGIN ('*' for any); default off")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-waiting", type=int, default=16,
                   help="requests waiting beyond the running ones before 429 (default 16)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                   help=f"prompt tokens per engine step (default {PREFILL_CHUNK})")
    p.add_argument("--max-body-bytes", type=int, default=2**20, help="request body limit (default 1 MiB)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a client may stall a read or write")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="seconds in-flight requests get to finish at SIGINT/SIGTERM (default 5)")
    args = p.parse_args(argv)
    if args.demo == (args.model is not None):
        raise UsageError("give either --model DIR or --demo")
    for name in ("max_batch", "prefill_chunk", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    for flag, value, valid, expected in (
            ("--max-waiting", args.max_waiting, args.max_waiting >= 0, ">= 0"),
            ("--port", args.port, 0 <= args.port < 65536, "in [0, 65535]"),
            ("--timeout", args.timeout, args.timeout > 0, "> 0"),
            ("--shutdown-grace", args.shutdown_grace, args.shutdown_grace >= 0, ">= 0")):
        if not valid:
            raise UsageError(f"{flag} must be {expected}, got {value}")
    args.api_key = args.api_key or os.environ.get("BCNP_API_KEY") or None
    return args


def make_server(args, err):
    from .server import Server
    if args.demo:
        from .demo import build_demo_model
        args.model = build_demo_model()
        err.write(f"demo: a tiny Baichuan-13B-shaped model with RANDOM weights ({args.model})\n")
    model = load_model(args)
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    return Server((args.host, args.port), model, model_name=name, api_key=args.api_key, cors_origin=args.cors_origin,
                  max_body_bytes=args.max_body_bytes, io_timeout=args.timeout, max_batch=args.max_batch,
                  max_waiting=args.max_waiting, prefill_chunk=args.prefill_chunk,
                  log=lambda line: (err.write(line + "\n"), err.flush()))


def main(argv=None, err=None):
    err = err or sys.stderr
    try:
        args = parse_args(argv)
        server = make_server(args, err)
    except UsageError as e:
        err.write(f"error: {one_line(e)}\n")
        return EXIT_USAGE
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        err.write(f"error: {one_line(e)}\n")
        return EXIT_ERROR
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="bcnp-http", daemon=True).start()
    host, port = server.server_address[:2]
    err.write(f"serving {server.model_name} on http://{host}:{port}/v1"
              f"{' (API key required)' if args.api_key else ''}\n")
    err.flush()
    while not stop.wait(0.5):
        pass
    err.write("shutting down\n")
    server.close(grace=args.shutdown_grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
