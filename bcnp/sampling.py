"""Choosing the next token from the logits, one small step at a time, in the Hugging Face order:

    repetition penalty -> temperature -> top-k -> top-p -> softmax -> sample      (or greedy argmax)

Each step takes logits (V,) float32 and returns a new array; a removed token gets -inf, so the softmax gives
it probability 0. `GenerationConfig` holds the defaults of Baichuan-13B-Chat's generation_config.json.
"""
import json
import numbers
import os
from dataclasses import dataclass, fields

import numpy as np


@dataclass
class GenerationConfig:
    """Baichuan-13B-Chat's generation_config.json; field names follow the file."""
    max_new_tokens: int = 2048
    temperature: float = 0.3
    top_k: int = 5
    top_p: float = 0.85
    repetition_penalty: float = 1.1
    do_sample: bool = True
    eos_token_id: int = 2
    user_token_id: int = 195
    assistant_token_id: int = 196
    bos_token_id: int = 1
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path):
        """Read `generation_config.json` (or the one in directory `path`); defaults when the file is missing,
        unknown keys ignored."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "generation_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_sampling_args(temperature, top_k, top_p, repetition_penalty, do_sample):
    """One clear ValueError for a setting outside its range."""
    if do_sample and not (isinstance(temperature, numbers.Real) and temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r} (use greedy decoding instead)")
    if not (isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not (isinstance(repetition_penalty, numbers.Real) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty!r}")


def apply_repetition_penalty(logits, seen_ids, penalty):
    """Make every token already in the sequence (prompt included) less likely: a positive logit is divided by
    the penalty, a negative one multiplied (dividing a negative logit would raise it). Each token once, however
    often it was seen."""
    if penalty == 1.0 or len(seen_ids) == 0:
        return logits
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen < 0, seen * penalty, seen / penalty)
    return out


def apply_temperature(logits, temperature):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return logits / np.float32(temperature)


def top_k_filter(logits, k):
    """Keep the k largest logits (k = 0: all). Like Hugging Face, every logit >= the k-th largest value is kept,
    so a tie at the k-th place keeps all the tied tokens (exactly k when the values are distinct)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = np.partition(logits, -k)[-k]
    return np.where(logits >= kth_largest, logits, np.float32(-np.inf)).astype(np.float32)


def top_p_filter(logits, top_p):
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one token).

    Hugging Face's recipe: sort ascending, cumulative softmax, remove the tokens whose cumulative probability is
    <= 1 - top_p. Only the tokens still in play are sorted (after top-k that is a handful instead of 64000),
    probabilities are summed in float64 (Hugging Face: float32, which can differ at the exact boundary), and
    equal logits sort stably, so among ties the lower id is removed first."""
    if top_p >= 1.0:
        return logits
    candidates = np.flatnonzero(logits > -np.inf)
    if candidates.size <= 1:
        return logits
    ascending = candidates[np.argsort(logits[candidates], kind="stable")]
    cumulative = np.cumsum(softmax(logits[ascending]))
    remove = cumulative <= 1.0 - top_p
    remove[-1] = False                                      # the most likely token always stays
    out = logits.copy()
    out[ascending[remove]] = -np.inf
    return out


def softmax(logits):
    """Probabilities in float64 (sampling needs them to sum to 1 closely); -inf gives 0."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def next_token(logits, seen_ids, *, temperature, top_k, top_p, repetition_penalty, do_sample, rng=None):
    """The next token id from logits (V,): the repetition penalty over `seen_ids` (prompt and output so far),
    then greedy argmax, or temperature, top-k, top-p and a draw from `rng` (a np.random.Generator)."""
    check_sampling_args(temperature, top_k, top_p, repetition_penalty, do_sample)
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"next_token: expected logits of shape (V,), got {logits.shape}")
    logits = apply_repetition_penalty(logits, seen_ids, repetition_penalty)
    if not do_sample:
        return int(np.argmax(logits))
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    rng = np.random.default_rng() if rng is None else rng
    # Draw among the tokens still in play (after top-k, a handful): the same cumulative probabilities as a draw
    # over all V with zeros elsewhere, without a softmax and a search over 64000 (a millisecond per token).
    candidates = np.flatnonzero(logits > -np.inf)
    return int(candidates[rng.choice(candidates.size, p=softmax(logits[candidates]))])
