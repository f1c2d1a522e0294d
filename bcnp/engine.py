"""The engine: many sequences decoded together, one pass over the weights per step, and KV caches that are reused.

Decoding is bound by reading the weights (one token of the int4 13B reads 7.5 GB), so the engine advances every
active sequence by one token in the same forward pass: the linear layers multiply all B tokens at once (each
weight read once; the int8/int4 kernels round each token's activations exactly as they would alone), and only
attention, which is each sequence's own, runs per sequence (`BatchCache`).

A step of the engine is:
1. admit queued sequences while there are free slots;
2. one forward pass over the next token of every generating sequence and at most `prefill_chunk` tokens of the
   prompts still being prefilled (several newcomers share it), so a long prompt never freezes the others for more
   than one chunk; a newcomer starts from the longest prefix of its prompt that a cache already holds (a previous
   chat turn, a shared system prompt or few-shot examples): only the rest is computed.

Each sequence keeps its own sampling settings, seed, stop tokens and budget; with the same seed it produces the
tokens it would produce alone (greedy: the same tokens; float logits equal to float32 rounding).

    engine = Engine(model, max_batch=8)
    a = engine.submit(ids_a, max_new_tokens=64, seed=1)
    b = engine.submit(ids_b, max_new_tokens=64, do_sample=False)
    for seq, token in engine.run():          # tokens of all sequences, as they are produced
        ...
    for token in engine.stream(a): ...       # or one sequence's tokens
"""
import itertools
from dataclasses import dataclass, field

import numpy as np

from .forward import transformer
from .cache import KVCache, new_cache, to_numpy
from .sampling import check_sampling_args, next_token


# --- a batch of sequences, seen by the forward pass as one cache -----------------------------------------------------

@dataclass
class BatchCache:
    """Several sequences' caches and how many new tokens each brings (one when decoding, a chunk of its prompt when
    prefilling): `transformer` runs over all their tokens at once, as if they were one sequence, so every linear
    layer reads its weights once for the whole batch, while each token is stored in, and attends over, its own
    sequence's cache at its own position."""
    caches: list
    counts: list

    def advance(self, T):
        """The step's T tokens are stored: each sequence's cache grew by its own count."""
        for cache, n in zip(self.caches, self.counts):
            cache.advance(n)

    def segments(self):
        """(cache, first row, rows) of each sequence in the batch's T tokens."""
        start = 0
        for cache, n in zip(self.caches, self.counts):
            yield cache, start, n
            start += n

    def positions(self, xp, T):
        assert T == sum(self.counts), "the batch's tokens are its sequences' tokens, in order"
        return xp.concatenate([cache.positions(xp, n) for cache, _, n in self.segments()])

    def span(self, T):
        # the bias is built for the longest span; each row is exact for its own position and sliced to its span
        return max(cache.length + n for cache, _, n in self.segments())

    def store(self, i, k, v):
        for cache, start, n in self.segments():
            cache.store(i, k[start:start + n], v[start:start + n])

    def attend(self, xp, i, q, bias):
        """q (nh, T, hd), bias (nh or 1, T, S_max) -> (nh, T, hd), each sequence's rows over its own cache."""
        outs = [cache.attend(xp, i, q[:, start:start + n], bias[:, start:start + n, :cache.length + n])
                for cache, start, n in self.segments()]
        return xp.concatenate(outs, axis=1)


# --- one sequence ----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Sequence:
    """A prompt being answered: its settings, its cache, what it has produced and why it stopped."""
    prompt: list
    max_new_tokens: int
    settings: dict
    rng: object
    stop_ids: frozenset
    id: int = 0
    cache: KVCache = None
    cached: list = field(default_factory=list)     # the tokens whose keys and values are in the cache, in order
    generated: list = field(default_factory=list)
    pending: int = None                            # the last sampled token, not yet fed to the model
    finish_reason: str = None                      # "stop" (a stop token), "length" (budget or context), "cancelled"
    reused: int = 0                                # prompt tokens taken from a cached prefix instead of computed
    top_logprobs: int = None                       # None: no log-probabilities; n >= 0: the token's and n others
    logprobs: list = field(default_factory=list)   # per generated token: (logprob, [(token, logprob), ...])

    @property
    def done(self):
        return self.finish_reason is not None

    @property
    def seen(self):
        return self.prompt + self.generated

    def cancel(self):
        """Stop this sequence; its slot is freed at the next step (e.g. a client that went away)."""
        if not self.done:
            self.finish_reason = "cancelled"


def token_logprobs(logits, token, n):
    """(log p(token), [(id, log p(id)) for the n most likely ids]) under softmax(logits), in float64."""
    x = np.asarray(logits, dtype=np.float64)
    log_z = x.max() + np.log(np.exp(x - x.max()).sum())
    top = np.argsort(-x, kind="stable")[:n]
    return float(x[token] - log_z), [(int(t), float(x[t] - log_z)) for t in top]


def common_prefix(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# --- the engine --------------------------------------------------------------------------------------------------------

# Prompt tokens one step takes, besides the decoding sequences' next tokens: a (40, 256, S) score array at most
# per layer, and at 256 tokens the prefill GEMM is near its best speed per token (tools/bench.py kernels).
PREFILL_CHUNK = 256

# A newcomer waits a step for a prompt in this step's batch that computes a prefix it shares, when the newcomers
# that would reuse that prefix save this many prompt tokens or more together. Waiting costs a waiter one more pass
# over the weights (~15 ms for 2 layers of 13B width, int4, 2 Zen 4 cores) and a prompt token costs ~2.5 ms there
# (prefill is bound by arithmetic), so 16 tokens saved pay for it. The group counts, not each newcomer alone: chat
# requests that come together share a template and a question's first words (14-16 tokens), the caches of earlier
# turns hold 5 of them, and 7 newcomers with 9-11 tokens each to gain save 70 together. A burst of 8 such prompts
# (tools/bench.py batch, `burst_ttft`) has 138 of its 248 prompt tokens computed; with a threshold per newcomer, 208.
SHARED_PREFIX_MIN = 16


class Engine:
    """Runs many `Sequence`s over one model: `submit`, then `step` (or `run`) until they are done."""

    def __init__(self, model, max_batch=8, prefill_chunk=PREFILL_CHUNK, keep_cached=4):
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not (isinstance(prefill_chunk, int) and prefill_chunk >= 1):
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.model, self.max_batch, self.prefill_chunk, self.keep_cached = model, max_batch, prefill_chunk, keep_cached
        self.queue, self.active = [], []
        self.idle = []                # (tokens, cache) of finished sequences, newest last: prefixes to reuse
        self.prompt_tokens = self.reused_tokens = 0     # all prompts' tokens, and those taken from a cache
        self._ids = itertools.count()

    # --- sequences in ---

    def submit(self, prompt, max_new_tokens=None, temperature=None, top_k=None, top_p=None,
               repetition_penalty=None, do_sample=None, seed=None, stop_ids=None, top_logprobs=None):
        """Queue a prompt (token ids); unset settings come from the model's generation_config.json. Returns its
        `Sequence`, whose `generated` fills as `step` runs. `top_logprobs` (an int >= 0) records each new token's
        log-probability under the model (before any sampling setting) and the `top_logprobs` most likely tokens'."""
        model, g = self.model, self.model.generation_config
        prompt = [int(t) for t in model._check_ids(prompt)]
        if len(prompt) >= model.config.max_position:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context holds {model.config.max_position} "
                             "(prompt plus at least one new token)")
        max_new_tokens = g.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        settings = dict(temperature=g.temperature if temperature is None else temperature,
                        top_k=g.top_k if top_k is None else top_k,
                        top_p=g.top_p if top_p is None else top_p,
                        repetition_penalty=g.repetition_penalty if repetition_penalty is None else repetition_penalty,
                        do_sample=g.do_sample if do_sample is None else do_sample)
        check_sampling_args(**settings)
        stop_ids = frozenset([model.config.eos_token_id] if stop_ids is None else [int(t) for t in stop_ids])
        if top_logprobs is not None and not (isinstance(top_logprobs, (int, np.integer)) and 0 <= top_logprobs <= 20):
            raise ValueError(f"top_logprobs must be an integer in [0, 20], got {top_logprobs!r}")
        seq = Sequence(prompt, int(max_new_tokens), settings, np.random.default_rng(seed), stop_ids, next(self._ids),
                       top_logprobs=top_logprobs)
        if seq.max_new_tokens == 0:
            seq.finish_reason = "length"
        else:
            self.queue.append(seq)
        return seq

    # --- the step ---

    def step(self):
        """One step: admit newcomers, then ONE forward pass over the next token of every generating sequence and
        up to `prefill_chunk` prompt tokens of those still prefilling. Returns [(sequence, new token)]."""
        self._retire()
        self._admit()
        batch = [(s, [s.pending]) for s in self.active if s.pending is not None and not s.done]
        budget, held = self.prefill_chunk, {}
        for seq in [s for s in self.active if s.cache is None or len(s.cached) < len(s.prompt)]:
            if budget == 0:
                break
            if seq.cache is None:
                if self._waits_for_shared_prefix(seq, [s for s, _ in batch], held):
                    continue
                self._attach_cache(seq)
            chunk = seq.prompt[len(seq.cached):len(seq.cached) + budget]
            budget -= len(chunk)
            batch.append((seq, chunk))
        produced = self._forward(batch) if batch else []
        self._retire()
        return produced
    def run(self):
        """Step until every sequence is done, yielding (sequence, token) as they are produced."""
        while self.busy:
            yield from self.step()

    def stream(self, seq):
        """`seq`'s tokens as they are produced, stepping the engine (and so every other sequence) as needed.
        Several streams over one engine may be interleaved; closing one early cancels its sequence."""
        sent = 0
        try:
            while True:
                while sent < len(seq.generated):
                    yield seq.generated[sent]
                    sent += 1
                if seq.done:
                    return
                self.step()
        finally:
            seq.cancel()

    @property
    def busy(self):
        return bool(self.queue or self.active)

    # --- inside a step ---

    def _admit(self):
        while self.queue and len(self.active) < self.max_batch:
            seq = self.queue.pop(0)
            if not seq.done:                                                 # not cancelled while queued
                self.active.append(seq)

    def _attach_cache(self, seq):
        """Give `seq` a cache holding the longest prefix of its prompt that any cache already holds."""
        # On the CPU a cache's pages are mapped only when written (np.zeros), so a whole-context cache costs what
        # it holds, and the next chat turn can take it over without a copy; a GPU allocates what it is asked for.
        context = self.model.config.max_position
        size = context if self.model.xp is np else min(context, len(seq.prompt) + seq.max_new_tokens)
        owners = ([(tokens, cache, True) for tokens, cache in self.idle]
                  + [(s.cached, s.cache, False) for s in self.active if s.cache is not None])
        best, best_n = None, 0
        for owner in owners:
            n = min(common_prefix(owner[0], seq.prompt), len(seq.prompt) - 1)   # the last prompt token is fed
            if n > best_n:
                best, best_n = owner, n
        if best is not None and best[2] and best[1].max_len >= size and best[1].k.dtype == self.model.cache_dtype:
            # a finished sequence's cache (the previous chat turn): take it over, no copy
            self.idle = [entry for entry in self.idle if entry[1] is not best[1]]
            seq.cache = best[1]
        else:
            seq.cache = self.model.new_cache(size)
            if best is not None:                                             # another's: copy the shared prefix
                seq.cache.k[:, :, :best_n] = best[1].k[:, :, :best_n]
                seq.cache.v[:, :, :best_n] = best[1].v[:, :, :best_n]
        seq.cache.length = best_n
        seq.cached = list(seq.prompt[:best_n])
        seq.reused = best_n
        self.prompt_tokens += len(seq.prompt)
        self.reused_tokens += best_n

    def _held(self, prompt):
        """The longest prefix of `prompt` that a cache holds: a finished sequence's, or an active one's so far."""
        return max([common_prefix(tokens, prompt) for tokens, _ in self.idle]
                   + [common_prefix(s.cached, prompt) for s in self.active if s.cache is not None] + [0])

    def _waits_for_shared_prefix(self, seq, batch, held):
        """True when a prompt this step's batch is computing shares with `seq` more than any cache holds, and the
        newcomers that would take that prefix from it save SHARED_PREFIX_MIN prompt tokens or more together:
        starting a step later lets them reuse it (the same system prompt, few-shot examples, a chat template).
        `held` keeps each newcomer's `_held` for the step: a cache attached in it holds a prefix of another's."""
        newcomers = [s for s in self.active if s.cache is None]
        for s in newcomers:
            if s.id not in held:
                held[s.id] = self._held(s.prompt)
        for leader in [s for s in batch if len(s.cached) < len(s.prompt)]:
            if common_prefix(leader.prompt, seq.prompt) <= held[seq.id]:
                continue
            saved = sum(max(0, min(common_prefix(leader.prompt, s.prompt), len(s.prompt) - 1) - held[s.id])
                        for s in newcomers)
            if saved >= SHARED_PREFIX_MIN:
                return True
        return False

    def _forward(self, batch):
        """One forward pass over [(sequence, its new tokens)]; samples where a sequence's prompt is complete."""
        ids = np.asarray([t for _, tokens in batch for t in tokens])
        last = list(itertools.accumulate(len(tokens) for _, tokens in batch))
        wanted = [b for b, (seq, tokens) in enumerate(batch) if len(seq.cached) + len(tokens) >= len(seq.prompt)]
        with np.errstate(over="ignore", invalid="ignore"):      # an overflow is reported once, by _sample
            if len(batch) == 1:       # the model's own step (a GPU replays one-token steps from CUDA graphs)
                seq, tokens = batch[0]
                logits = self.model.next_logits(ids, seq.cache)[None]
            else:
                cache = BatchCache([seq.cache for seq, _ in batch], [len(tokens) for _, tokens in batch])
                logits = to_numpy(transformer(self.model.xp, self.model.w, self.model.config, ids, cache,
                                              rows=[last[b] - 1 for b in wanted]))
                logits = dict(zip(wanted, logits))
        for seq, tokens in batch:            # every cache grew by its tokens: say so before anything can fail
            seq.cached += tokens
            seq.pending = None
        produced, failure = [], None
        for b in wanted:
            try:
                produced += self._sample(batch[b][0], logits[b])
            except ValueError as e:          # that sequence has stopped; the others' tokens still count
                failure = failure or e
        if failure is not None:
            raise failure
        return produced

    def _sample(self, seq, logits):
        if seq.done:                                                         # cancelled during the step
            return []
        if not np.isfinite(logits).all():
            seq.finish_reason = "error"
            raise ValueError(f"{self.model.path or 'the model'}: the logits at position {len(seq.cached) - 1} are "
                             "not finite (NaN or infinity): a weight or an activation overflowed; stopping instead "
                             "of printing tokens chosen from them")
        token = next_token(logits, seq.seen, rng=seq.rng, **seq.settings)
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
            return []
        seq.generated.append(token)
        if seq.top_logprobs is not None:
            seq.logprobs.append(token_logprobs(logits, token, seq.top_logprobs))
        if len(seq.generated) >= seq.max_new_tokens or seq.cache.length >= seq.cache.max_len:
            seq.finish_reason = "length"
        else:
            seq.pending = token
        return [(seq, token)]

    def _retire(self):
        """Finished sequences leave their slot; their caches are kept (newest last) for prefixes to come."""
        for seq in [s for s in self.active if s.done]:
            self.active.remove(seq)
            if seq.cache is not None and seq.cached and seq.finish_reason != "error":
                self.idle.append((seq.cached, seq.cache))
            seq.cache = None
        del self.idle[: max(0, len(self.idle) - self.keep_cached)]
