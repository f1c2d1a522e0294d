"""`Model`, the public face of bcnp: a thin layer that composes the others.

    model = Model.from_pretrained(path)        # bcnp.checkpoint + bcnp.weights.read_weights: nothing read yet
    model = model.quantize(4)                  # bcnp.weights passes, one tensor at a time
    model = model.cuda()                       # bcnp.gpu: to_device
    model.logits(ids)                          # bcnp.forward.transformer
    model.generate(ids, ...)                   # bcnp.engine.Engine, one sequence
    model(messages)                            # bcnp.chat.chat_prompt, then generate

A model holds `config`, the array module `xp`, and its weights: `weights` as held (a checkpoint opened by
from_pretrained holds memory-mapped `Tensor`s, not read), and `w`, the plain dict the forward pass uses, which is
made from them the first time it is asked for.
"""
import numbers
import os

import numpy as np

from .chat import build_chat_input, chat_prompt
from .checkpoint import read_model_dir
from .tensor import Tensor
from .engine import PREFILL_CHUNK, Engine
from .forward import transformer
from .gpu.cache import DeviceKVCache
from .gpu.graphs import DecodeGraphs
from .gpu.kernels import cuda_kernels, get_cupy, is_cupy
from .gpu.weights import DeviceQuantizedWeight, device_weights, host_dtype, host_weights
from .layout import is_linear
from .cache import new_cache, to_numpy
from .quant import QuantizedWeight
from .sampling import GenerationConfig, check_sampling_args, check_setting
from .tokenizer import StreamDecoder, Tokenizer
from .weights import materialised, quantized, read_weights


FORWARD_CHUNK = PREFILL_CHUNK     # tokens per pass of Model.forward: the engine's prompt chunk


def default_cache_dtype(w):
    """float16 for a quantized model (at long contexts its decode reads the cache as much as the weights; the
    logits move by <= 3.5e-4 of their scale, tests/test_float16_cache.py), float32 for a float one (the reference:
    the golden logits)."""
    quantized = any(isinstance(value, QuantizedWeight) for value in w.values())
    return np.dtype(np.float16 if quantized else np.float32)


class Model:
    """Baichuan-13B / 7B: `config`, the weights (by checkpoint name), the array module `xp`."""

    def __init__(self, config, w, xp=np, tokenizer=None, generation_config=None, path=None, cache_dtype=None):
        self.config, self.weights, self.xp = config, w, xp
        self.cache_dtype = default_cache_dtype(w) if cache_dtype is None else np.dtype(cache_dtype)
        self.tokenizer = tokenizer
        self.generation_config = generation_config or GenerationConfig()
        self.path = path
        self._engine = None

    @property
    def w(self):
        """The weights by checkpoint name as the forward pass uses them: a plain dict. The one place a model's
        mapped checkpoint tensors are read (all of them, the first time `w` is used): opening the real 13B
        (26.5 GB of bfloat16) must not materialise it, and quantize() and cuda() go from the mapped tensors one
        at a time without asking for `w`."""
        if any(isinstance(v, Tensor) for v in self.weights.values()):
            self.weights = dict(materialised(self.config, self.weights))
        return self.weights

    # --- loading ---

    @classmethod
    def from_pretrained(cls, path, family=None):
        """A Hugging Face directory (.bin or .safetensors shards) or one written by `python -m bcnp.convert`.
        family: "baichuan" or "baichuan2" (NormHead), overriding what the vocabulary or the bcnp section says."""
        path = os.fspath(path)
        config, _, tensors = read_model_dir(path, family=family)
        tokenizer_path = os.path.join(path, "tokenizer.model")
        tokenizer = Tokenizer(tokenizer_path) if os.path.exists(tokenizer_path) else None
        return cls(config, read_weights(config, tensors), np, tokenizer,
                   GenerationConfig.from_json(path, config.vocab_size), path)

    def _with_weights(self, w, xp):
        return Model(self.config, w, xp, self.tokenizer, self.generation_config, self.path)

    def quantize(self, bits):
        """Every linear weight to `bits` (8 or 4; lm_head always 8), the embedding to float16; one tensor at a
        time, so a bfloat16 13B quantizes in little more memory than its quantized size."""
        if bits not in (8, 4) or isinstance(bits, bool):
            raise ValueError(f"quantize: bits must be 8 or 4, got {bits!r}")
        if self.xp is not np:
            raise ValueError("quantize on the CPU, then move: model.quantize(8).cuda()")
        return self._with_weights(dict(quantized(materialised(self.config, self.weights), bits)), np)

    def cuda(self):
        return to_device(self)

    def cpu(self):
        return to_host(self)

    # --- running ---

    def new_cache(self, max_len=None):
        """An empty cache for `max_len` positions (default: the whole context)."""
        return new_cache(self.xp, self.config, max_len, self.cache_dtype)

    def forward(self, ids, cache):
        """Logits (T_new, V) for `ids` appended after what `cache` holds; always host float32. A long `ids` goes
        through the cache FORWARD_CHUNK tokens at a time, as the engine's prefill does: one pass over 4000 tokens of
        the 13B would hold (40, 4000, 4000) float32 biases and scores, 2.6 GB each (2 int4 layers of 13B width
        peaked at 11.2 GB in one pass; chunked: 2.8 GB, 1 GB of it the logits, tools/memory_bench.py memory)."""
        ids = self._check_ids(ids)
        if len(ids) <= FORWARD_CHUNK:
            return to_numpy(transformer(self.xp, self.w, self.config, ids, cache))
        logits = np.empty((len(ids), self.config.vocab_size), np.float32)          # filled in place: no 2nd copy
        for start in range(0, len(ids), FORWARD_CHUNK):
            chunk = ids[start:start + FORWARD_CHUNK]
            logits[start:start + len(chunk)] = to_numpy(transformer(self.xp, self.w, self.config, chunk, cache))
        return logits

    def logits(self, ids):
        """Logits (T, V) of one full forward pass with a fresh cache."""
        ids = self._check_ids(ids)
        return self.forward(ids, self.new_cache(len(ids)))

    def hidden_states(self, ids):
        """(L + 1, T, H): the embedding output, each layer's input, the final norm's output."""
        ids = self._check_ids(ids)
        hidden = []
        transformer(self.xp, self.w, self.config, ids, self.new_cache(len(ids)), hidden=hidden)
        return np.stack([to_numpy(h) for h in hidden])

    def next_logits(self, ids, cache):
        """Host float32 logits (V,) of the last of `ids`, appended to `cache`: one step of generation."""
        ids = self._check_ids(ids)
        return to_numpy(transformer(self.xp, self.w, self.config, ids, cache, last_only=True))[0]

    def _check_ids(self, ids):
        if isinstance(ids, (str, bytes)):
            raise ValueError(f"token ids must be a sequence of integers, got {type(ids).__name__} (encode text with "
                             "model.tokenizer.encode first)")
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be a non-empty 1-D sequence of integers, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")
        return ids.astype(np.int64)

    def generate(self, ids, max_new_tokens=None, temperature=None, top_k=None, top_p=None,
                 repetition_penalty=None, do_sample=None, seed=None):
        """An iterator of new token ids; it stops at eos (not yielded), max_new_tokens or a full context.
        Unset arguments come from the checkpoint's generation_config.json. Everything is checked here, before
        the first token; a step whose logits are not finite (NaN or infinity) stops it with a ValueError.
        It runs on the model's engine: the longest prefix of `ids` already in a cache (the previous chat turn)
        is not computed again."""
        g = self.generation_config
        max_new_tokens = g.max_new_tokens if max_new_tokens is None else max_new_tokens
        settings = dict(temperature=g.temperature if temperature is None else temperature,
                        top_k=g.top_k if top_k is None else top_k,
                        top_p=g.top_p if top_p is None else top_p,
                        repetition_penalty=g.repetition_penalty if repetition_penalty is None else repetition_penalty,
                        do_sample=g.do_sample if do_sample is None else do_sample)
        check_setting("max_new_tokens", max_new_tokens)
        check_sampling_args(**settings)
        if seed is not None and not (isinstance(seed, numbers.Integral) and seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {seed!r:.60}")
        engine = self.engine()
        return engine.stream(engine.submit(ids, max_new_tokens=max_new_tokens, seed=seed, **settings))

    def engine(self):
        """This model's engine (bcnp.engine), made on first use: one sequence per `generate` call, and the caches
        of finished ones kept, so a chat turn that extends the previous one computes only its new tokens."""
        if self._engine is None:
            self._engine = Engine(self, keep_cached=1)          # one conversation: its last turn's cache
        return self._engine

    # --- chat ---

    def build_chat_input(self, messages, max_new_tokens=0):
        g = self.generation_config
        return build_chat_input(self._require_tokenizer(), messages, model_max_length=self.config.max_position,
                                max_new_tokens=max_new_tokens, generation_max_new_tokens=g.max_new_tokens,
                                user_token_id=g.user_token_id, assistant_token_id=g.assistant_token_id)

    def chat_prompt(self, messages, max_new_tokens=None):
        """(token ids, reply budget) of `messages` by the chat's one policy (bcnp.chat.chat_prompt), which the
        command line (bcnp.generate) and the server use too."""
        g = self.generation_config
        return chat_prompt(self._require_tokenizer(), messages, context=self.config.max_position,
                           max_new_tokens=max_new_tokens, generation_max_new_tokens=g.max_new_tokens,
                           user_token_id=g.user_token_id, assistant_token_id=g.assistant_token_id)

    def __call__(self, messages, stream=False, **generate_kwargs):
        """The seed's chat API: {'response': text, 'history': messages + [reply]}, or with stream=True an
        iterator of text pieces as they are produced."""
        pieces = self._chat_stream(messages, generate_kwargs)
        if stream:
            return pieces
        response = "".join(pieces)
        return {"response": response, "history": list(messages) + [{"role": "assistant", "content": response}]}

    def _chat_stream(self, messages, generate_kwargs):
        ids, budget = self.chat_prompt(messages, generate_kwargs.get("max_new_tokens"))
        decoder = StreamDecoder(self._require_tokenizer())
        for token in self.generate(ids, **{**generate_kwargs, "max_new_tokens": budget}):
            text = decoder.put(token)
            if text:
                yield text
        text = decoder.end()
        if text:
            yield text

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.path or 'this model'}: no tokenizer.model in the model directory")
        return self.tokenizer


class DeviceModel(Model):
    """A Model whose weights are on the GPU (or on the tests' strict module): DeviceKVCaches, and one-token steps
    replayed from CUDA graphs (`graphs = False`: launched op by op).

    Graphs are on when every linear weight multiplies in bcnp's kernels (float16 or quantized weights); float32
    weights (`to_device(dtype="float32")`, the golden-test mode) multiply in cuBLAS, which CuPy does not
    promise to record into a graph, so that mode decodes op by op."""

    def __init__(self, *args, kernels=None, graphs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = kernels
        if graphs is None:
            graphs = all(isinstance(v, DeviceQuantizedWeight) for k, v in self.w.items() if is_linear(k))
        self.graphs = graphs

    def new_cache(self, max_len=None):
        c = new_cache(self.xp, self.config, max_len, self.cache_dtype)
        return DeviceKVCache(c.k, c.v, kernels=self.kernels)

    def next_logits(self, ids, cache):
        ids = self._check_ids(ids)
        if len(ids) != 1 or not isinstance(cache, DeviceKVCache):
            return super().next_logits(ids, cache)
        decoder = getattr(cache, "decoder", None)
        if decoder is None:
            decoder = cache.decoder = DecodeGraphs(self)
        return decoder.step(cache, int(ids[0]))

    def forward(self, ids, cache):
        ids = self._check_ids(ids)
        if len(ids) == 1:
            return self.next_logits(ids, cache)[None]
        return super().forward(ids, cache)


# --- moving a model ------------------------------------------------------------------------------------------------

def to_device(model, xp=None, dtype="float16"):
    """`model` with its weights on the GPU (CuPy), or on the array module `xp` (the tests' strict module).

    dtype "float16": float weights stored as float16, prefill in float16 with float32 accumulation, float16
    KV cache. "float32": float32 weights, prefill and cache (the CPU's numbers; twice the memory).
    Quantized weights move as they are; the device multiplies them, dequantized, by x in float, where the CPU's
    kernels round x per block first (bcnp.quant.round_activation). One tensor at a time: a memory-mapped checkpoint is read tensor by
    tensor (bcnp.weights.materialised) and no host copy is kept."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"to_device: dtype must be 'float16' or 'float32', got {dtype!r}")
    if model.xp is not np:
        if xp is None or xp is model.xp:
            return model
        raise ValueError("to_device: the model is not on the CPU; move it back with model.cpu() first")
    xp = get_cupy() if xp is None else xp
    kernels = cuda_kernels(xp) if is_cupy(xp) else None
    dtype = np.dtype(dtype)
    host = materialised(model.config, model.weights, dtype_of=lambda name: host_dtype(name, dtype))
    return DeviceModel(model.config, device_weights(xp, host, dtype, kernels), xp, model.tokenizer,
                       model.generation_config, model.path, cache_dtype=dtype, kernels=kernels)


def to_host(model):
    """`model` back on the CPU: float weights as float32 NumPy arrays, quantized ones as QuantizedWeight (the
    embedding of a quantized model as float16, as Model.quantize leaves it)."""
    if model.xp is np:
        return model
    return model._with_weights(host_weights(model.w), np)
