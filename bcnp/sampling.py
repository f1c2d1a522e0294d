"""Choosing the next token from the logits, one small step at a time, in the Hugging Face order:

    repetition penalty -> temperature -> top-k -> top-p -> softmax -> sample      (or greedy argmax)

Each step takes logits (V,) float32 and returns a new array; a removed token gets -inf, so the softmax gives
it probability 0. `GenerationConfig` holds the defaults of Baichuan-13B-Chat's generation_config.json.
"""
import math
import numbers
import os
from dataclasses import dataclass, fields

import numpy as np

from .config import MAX_CONFIG_BYTES, ConfigError
from .errors import read_json_object

FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


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

    TOKEN_IDS = ("eos_token_id", "user_token_id", "assistant_token_id", "bos_token_id", "pad_token_id")

    @classmethod
    def from_json(cls, path, vocab_size=None):
        """Read `generation_config.json` (or the one in directory `path`); defaults when the file is missing,
        unknown keys ignored. Every setting is checked here, when the model is opened (not at its first token):
        a ConfigError names the file and the field; with `vocab_size`, token ids must lie in the vocabulary."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "generation_config.json")
        try:
            d = read_json_object(path, error=ConfigError, max_bytes=MAX_CONFIG_BYTES,
                                 what="generation_config.json")
        except FileNotFoundError:
            d = {}
        names = {f.name for f in fields(cls)}
        g = cls(**{k: v for k, v in d.items() if k in names})
        try:
            g.check(vocab_size)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        return g

    def check(self, vocab_size=None):
        """ValueError naming the first field outside its range."""
        check_setting("max_new_tokens", self.max_new_tokens)
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.do_sample)
        high = math.inf if vocab_size is None else vocab_size - 1
        for name in self.TOKEN_IDS:
            value = getattr(self, name)
            if not (is_integer(value) and 0 <= value <= high):
                raise ValueError(f"{name} must be a token id in [0, {high}], got {value!r:.60}")


def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# What each setting must be, for generate(), the command line and generation_config.json alike.
SETTINGS = {
    "max_new_tokens": (lambda v: is_integer(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: is_finite_real(v) and v > 0, "a finite number > 0 (or use greedy decoding)"),
    "top_k": (lambda v: is_integer(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: is_finite_real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "repetition_penalty": (lambda v: is_finite_real(v) and v > 0, "a finite number > 0 (1.0 = off)"),
    "do_sample": (lambda v: isinstance(v, (bool, np.bool_)), "true or false"),
}


def check_setting(name, value, label=None):
    """ValueError "`label` (default `name`) must be ..., got `value`" when `value` is outside what generation
    can use."""
    valid, expected = SETTINGS[name]
    if not valid(value):
        raise ValueError(f"{label or name} must be {expected}, got {value!r:.60}")


def check_sampling_args(temperature, top_k, top_p, repetition_penalty, do_sample):
    """One clear ValueError for a setting outside its range (greedy decoding ignores the temperature)."""
    check_setting("do_sample", do_sample)
    if do_sample:
        check_setting("temperature", temperature)
    check_setting("top_k", top_k)
    check_setting("top_p", top_p)
    check_setting("repetition_penalty", repetition_penalty)


def apply_repetition_penalty(logits, seen_ids, penalty):
    """Make every token already in the sequence (prompt included) less likely: a positive logit is divided by
    the penalty, a negative one multiplied (dividing a negative logit would raise it). Each token once, however
    often it was seen."""
    if penalty == 1.0 or len(seen_ids) == 0:
        return logits
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    out = logits.copy()
    seen = out[ids]
    with np.errstate(over="ignore"):
        penalized = np.where(seen < 0, seen * np.float32(penalty), seen / np.float32(penalty))
    # An extreme penalty overflows float32 (1e-45 makes a logit of 1 infinite, and then the temperature's
    # inf - inf is NaN): saturate at the largest float32 instead; a removed token (-inf) stays removed.
    out[ids] = np.where(np.isfinite(seen), np.clip(penalized, -FLOAT32_MAX, FLOAT32_MAX), seen)
    return out


def apply_temperature(logits, temperature):
    """The logits' distances from the largest, divided by the temperature: the softmax of logits / T (a shift
    does not change it), but finite or -inf for any T > 0. Dividing first overflows: at T = 1e-45 every logit
    becomes +-inf and the softmax NaN; shifted, the largest stays 0 and the others go to -inf, which is greedy
    decoding, the limit of T -> 0."""
    check_setting("temperature", temperature)
    shifted = np.asarray(logits - logits.max(), dtype=np.float64)  # float64: a T below 1e-45 is 0 in float32
    with np.errstate(over="ignore"):
        return (shifted / temperature).astype(np.float32)


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
    if np.isnan(logits).any() or np.isposinf(logits).any() or not (logits > -np.inf).any():
        raise ValueError("next_token: the logits hold NaN or +inf, or every token is removed (-inf); "
                         "nothing can be sampled from them")
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
