"""Scoring text with a model: log-probabilities of given tokens, and a KV cache that reuses the prefix a prompt
shares with the one before it. Also the model options shared by `python -m bcnp.perplexity` and `bcnp.eval`.

Used only through the public `Model` API: `new_cache`, `forward`, `config`, `tokenizer`.
"""
import argparse

import numpy as np

from .config import add_family_argument
from .engine import common_prefix


def log_softmax(logits):
    """log softmax over the last axis, in float64: a 64000-way sum of float32 exponentials loses digits that a
    perplexity printed to four decimals would show."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(logits, targets):
    """log p(targets[i]) under the distribution of logits[i]: logits (T, V), targets (T,) -> float64 (T,)."""
    targets = np.asarray(targets)
    return log_softmax(logits)[np.arange(len(targets)), targets]


class PrefixCache:
    """A KV cache that remembers the token ids it holds, so that a prompt sharing a prefix with the previous one
    only computes the rest: `logits(ids, start)` equals `model.logits(ids)[start:]`.

    Why this is exact: a KVCache writes new tokens at `cache.length` and attends over the first
    `cache.length + T` positions, so setting `cache.length` back to the length of the shared prefix discards
    everything after it; the stale slots beyond are overwritten by the new tokens or masked out. Few-shot
    prompts of one subject share their instruction and examples (hundreds of tokens), so each question costs
    only its own tokens. The prefix is found on token ids, not on text: SentencePiece may tokenize the seam
    between the shared text and the question differently from the shared text alone.
    """

    def __init__(self, model, max_len=None):
        self.model = model
        self.cache = model.new_cache(max_len or model.config.max_position)
        self.ids = []                                  # the token ids whose keys and values the cache holds

    def logits(self, ids, start=None):
        """Logits (len(ids) - start, V) of positions start.. of `ids` (default: the last position only)."""
        ids = [int(i) for i in ids]
        start = len(ids) - 1 if start is None else start
        if not 0 <= start < len(ids):
            raise ValueError(f"start {start} is outside the {len(ids)} token ids")
        if len(ids) > self.cache.max_len:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.cache.max_len}")
        keep = min(common_prefix(self.ids, ids), start)    # position `start` itself must be computed
        self.cache.length, self.ids = keep, self.ids[:keep]
        logits = self.model.forward(np.asarray(ids[keep:]), self.cache)
        self.ids = ids
        return logits[start - keep:]


# --- the model options of the measuring command lines -------------------------------------------------------------

class UsageError(ValueError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                  # argparse would print the usage and exit; we print one line
        raise UsageError(message)


def add_model_arguments(parser):
    parser.add_argument("--model", metavar="DIR", help="a Hugging Face checkpoint directory or one from bcnp.convert")
    parser.add_argument("--demo", action="store_true",
                        help="use the tiny random-weight demo model (built once and cached): checks the mechanics")
    parser.add_argument("--quantize", type=int, choices=(8, 4), help="quantize the linear weights to 8 or 4 bits")
    add_family_argument(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def open_model(args, err):
    """The model that --model/--demo, --quantize and --device ask for (the chat's loader, with its checks)."""
    from .generate import load_model
    if args.demo == (args.model is not None):
        raise UsageError("give either --model DIR or --demo")
    if args.demo:
        from .demo import build_demo_model
        args.model = build_demo_model()
        err.write(f"demo: a tiny Baichuan-13B-shaped model with RANDOM weights ({args.model}); "
                  "its scores are those of chance.\n")
    return load_model(args)
