"""Perplexity of a text file, by llama.cpp's protocol (or Hugging Face's sliding window).

    python -m bcnp.perplexity --model DIR wiki.test.raw [--ctx 512] [--quantize 8|4]
    python -m bcnp.perplexity --model DIR wiki.test.raw --ctx 4096 --stride 512      # Hugging Face's variant

llama.cpp (`tools/perplexity/perplexity.cpp`, `perplexity()`): the text is tokenized once, with BOS in front;
it is cut into `len // ctx` independent chunks of `ctx` tokens (the tail is dropped, and at least 2·ctx tokens
are needed); the first token of each chunk is replaced by BOS; each chunk is one forward pass from an empty cache,
and only its second half is scored: the logits at positions j in [ctx/2, ctx - 1) predict token j + 1. The running
estimate after each chunk goes to stdout as `[i]ppl,`, then
`Final estimate: PPL = exp(mean nll) +/- ppl·sqrt((mean(nll²) - mean(nll)²) / (count - 1))`.
`--no-bos` does neither BOS step: that is what llama.cpp does with a Baichuan GGUF, whose converter copies
`add_bos_token: false` from tokenizer_config.json (gguf-py `SpecialVocab`).

Hugging Face ("Perplexity of fixed-length models", transformers docs): windows of `ctx` tokens starting every
`stride` tokens, no BOS; each token is scored once, in the first window that contains it at a position where
it has not been scored before (so with up to ctx - stride tokens of context). The result is the mean over
every token but the first.
"""
import math
import sys
import time

import numpy as np

from .errors import one_line
from .scoring import ArgumentParser, UsageError, add_model_arguments, open_model, token_logprobs


# --- llama.cpp's protocol -------------------------------------------------------------------------------------

def llama_cpp_chunks(tokens, ctx, bos_id=None):
    """The chunks (n, ctx) llama-perplexity scores: `tokens` cut into len // ctx rows, the tail dropped, each
    row's first token replaced by `bos_id` (None: kept)."""
    if ctx < 4:
        raise ValueError(f"--ctx must be at least 4, got {ctx}")
    if len(tokens) < 2 * ctx:
        raise ValueError(f"the text tokenizes to {len(tokens)} tokens; a context of {ctx} needs at least "
                         f"{2 * ctx} (llama.cpp's rule: two chunks)")
    n = len(tokens) // ctx
    chunks = np.array(tokens[: n * ctx], dtype=np.int64).reshape(n, ctx)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def chunk_nll(model, chunk):
    """Negative log-likelihoods (ctx - 1 - ctx/2,) of the second half of one chunk, from one forward pass."""
    ctx = len(chunk)
    first = ctx // 2
    logits = model.forward(chunk, model.new_cache(ctx))               # the chunk alone: an empty cache
    return -token_logprobs(logits[first: ctx - 1], chunk[first + 1:])


def estimate(nll):
    """(ppl, its uncertainty) from the scored tokens' negative log-likelihoods, as llama.cpp prints them."""
    nll = np.asarray(nll, dtype=np.float64)
    mean, mean_sq = nll.mean(), (nll * nll).mean()
    ppl = math.exp(mean)
    variance = mean_sq - mean * mean
    error = math.sqrt(variance / (len(nll) - 1)) * ppl if variance > 0 and len(nll) > 1 else float("nan")
    return ppl, error


# --- Hugging Face's sliding window ---------------------------------------------------------------------------------

def sliding_windows(n_tokens, ctx, stride):
    """(begin, end, first scored position) of each window: [begin, end) is run, tokens [first, end) scored."""
    if not 0 < stride <= ctx:
        raise ValueError(f"--stride must be in [1, --ctx], got {stride} with --ctx {ctx}")
    if n_tokens < 2:
        raise ValueError(f"the text tokenizes to {n_tokens} tokens; at least 2 are needed")
    windows, scored_to = [], 1                      # token 0 has no context: never scored
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        windows.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n_tokens:
            break
    return windows


def window_nll(model, tokens, begin, end, first):
    ids = np.asarray(tokens[begin:end], dtype=np.int64)
    logits = model.forward(ids, model.new_cache(len(ids)))
    return -token_logprobs(logits[first - begin - 1: end - begin - 1], ids[first - begin:])


# --- the command line ------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = ArgumentParser(prog="python -m bcnp.perplexity", description="Perplexity of a text file.")
    add_model_arguments(p)
    p.add_argument("file", metavar="FILE", help="a UTF-8 text file (e.g. wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (llama.cpp) or window (--stride)")
    p.add_argument("--stride", type=int, help="Hugging Face's sliding window, moved by this many tokens")
    p.add_argument("--chunks", type=int, metavar="N", help="score only the first N chunks or windows")
    p.add_argument("--no-bos", action="store_true",
                   help="no BOS in front of the text nor at each chunk's start (llama.cpp on a Baichuan GGUF)")
    return p.parse_args(argv)


def check_args(args):
    if args.ctx < 4:
        raise UsageError(f"--ctx must be at least 4, got {args.ctx}")
    if args.stride is not None and not 0 < args.stride <= args.ctx:
        raise UsageError(f"--stride must be in [1, --ctx], got {args.stride} with --ctx {args.ctx}")
    if args.chunks is not None and args.chunks < 1:
        raise UsageError(f"--chunks must be >= 1, got {args.chunks}")


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def jobs(args, model, tokens):
    """(what to run, how many tokens it runs through the model) for each chunk or window, in order."""
    if args.stride:
        windows = sliding_windows(len(tokens), args.ctx, args.stride)[: args.chunks]
        return [(lambda w=w: window_nll(model, tokens, *w), w[1] - w[0]) for w in windows]
    bos = None if args.no_bos else model.config.bos_token_id
    chunks = llama_cpp_chunks(tokens, args.ctx, bos)[: args.chunks]
    return [(lambda c=c: chunk_nll(model, c), args.ctx) for c in chunks]


def run(args, out, err):
    from tqdm import tqdm
    check_args(args)
    text = read_text(args.file)                                        # before the (slow) model
    model = open_model(args, err)
    if args.ctx > model.config.max_position:
        raise ValueError(f"--ctx {args.ctx} exceeds the model's context of {model.config.max_position}")
    tokens = model.tokenizer.encode(text)
    if not (args.stride or args.no_bos):
        tokens = [model.config.bos_token_id] + tokens                  # llama.cpp tokenizes with add_bos
    work = jobs(args, model, tokens)
    err.write(f"{args.file}: {len(tokens)} tokens, {len(work)} "
              f"{'windows' if args.stride else 'chunks'} of {args.ctx}\n")
    nll, start, n_run = [], time.perf_counter(), sum(n for _, n in work)
    with tqdm(total=n_run, unit="tok", unit_scale=True, file=err, leave=False) as bar:
        for i, (job, n) in enumerate(work):
            nll.append(job())
            bar.update(n)
            out.write(f"[{i + 1}]{math.exp(np.concatenate(nll).mean()):.4f},")
            out.flush()
    seconds = time.perf_counter() - start
    ppl, error = estimate(np.concatenate(nll))
    out.write(f"\nFinal estimate: PPL = {ppl:.4f} +/- {error:.5f}\n")
    err.write(f"[{n_run} tokens in {seconds:.1f} s, {n_run / seconds:.1f} tokens/s]\n")
    return ppl, error


def main(argv=None, out=None, err=None):
    out, err = out or sys.stdout, err or sys.stderr
    try:
        args = parse_args(argv)
        run(args, out, err)
        return 0
    except UsageError as e:
        err.write(f"error: {one_line(e)}\n")
        return 2
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        err.write(f"error: {one_line(e)}\n")
        return 1
    except KeyboardInterrupt:
        err.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
