"""A float16 KV cache: the default of quantized models, and what it does to the logits.

Rounding a key or value to float16 moves it by at most 2^-11 of itself (4.9e-4). Measured on the fixtures (tiny
models, 1 to 33 tokens), the logits with a float16 cache differ from a float32 cache by at most 3.5e-4 of
max(1, max |logit|), float or quantized weights alike; int8 weights move them by ~1e-2 (test_quantized_model).
Asserted: 1e-3 of that scale, and the same top-1 token everywhere. Float16 storage is a grid, so two computations
that differ by float32 rounding may store a value one float16 step apart: agreements that are 1e-5 with a float32
cache (any prefill/decode split, a sequence alone or in a batch) are 1e-4 with a float16 one (measured <= 4.2e-5).
"""
import io
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bcnp import Model, generate, serve
from bcnp.convert import convert
from bcnp.engine import BatchCache
from bcnp.forward import transformer
from bcnp.quant import BATCH_TOKENS, _quant
from bcnp.cache import FLOAT16_MAX, new_cache
from conftest import FIXTURES, MODELS

ALL_MODELS = MODELS + ["b2-13-alibi-h8-l4-bf16", "b2-7-rope-h4-l3-fp16"]
EFFECT = 1e-3             # float16 vs float32 cache, scaled
AGREEMENT = 1e-4          # two computations over float16 caches, scaled


def open_fixture(name):
    family = "baichuan2" if name.startswith("b2-") else None
    return Model.from_pretrained(FIXTURES / name / "hf", family=family), np.load(FIXTURES / name / "golden.npz")


def with_cache(model, dtype):
    model.cache_dtype = np.dtype(dtype)
    return model


def scaled_error(a, b):
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


@pytest.fixture(scope="module", params=ALL_MODELS)
def fixture(request):
    return open_fixture(request.param)


# --- which cache a model gets ------------------------------------------------------------------------------------

def test_a_float_model_keeps_float32_and_a_quantized_one_gets_float16(tmp_path):
    model, golden = open_fixture(MODELS[0])
    assert model.cache_dtype == np.float32 and model.new_cache(4).k.dtype == np.float32
    for bits in (8, 4):
        quantized = model.quantize(bits)
        assert quantized.cache_dtype == np.float16
        cache = quantized.new_cache(4)
        assert cache.k.dtype == cache.v.dtype == np.float16
    convert(FIXTURES / MODELS[0] / "hf", tmp_path / "q4", quantize_bits=4, progress=False)
    assert Model.from_pretrained(tmp_path / "q4").cache_dtype == np.float16       # quantized on disk
    assert Model(model.config, model.w, cache_dtype="float16").cache_dtype == np.float16


def test_a_cache_is_float16_or_float32():
    model, _ = open_fixture(MODELS[0])
    with pytest.raises(ValueError, match="float16 or float32, got float64"):
        new_cache(np, model.config, 4, np.float64)


def test_a_float16_cache_saturates_instead_of_storing_infinity():
    model, _ = open_fixture(MODELS[0])
    cache = new_cache(np, model.config, 4, np.float16)
    nh, hd = model.config.num_attention_heads, model.config.head_dim
    k = np.full((2, nh, hd), 1e6, np.float32)
    cache.store(0, k, -k)
    assert (cache.k[0, :, :2] == FLOAT16_MAX).all() and (cache.v[0, :, :2] == -FLOAT16_MAX).all()


# --- what it does to the logits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [None, 8])
def test_float16_cache_logits_stay_within_1e_3_of_float32_with_the_same_top_token(fixture, bits):
    model, golden = fixture
    model = model if bits is None else model.quantize(bits)
    for i in (1, 2):
        want = with_cache(model, np.float32).logits(golden[f"prompt_{i}"])
        got = with_cache(model, np.float16).logits(golden[f"prompt_{i}"])
        assert scaled_error(got, want) <= EFFECT
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_float16_cache_moves_int4_logits_by_a_tenth_of_int4s_own_error(fixture):
    """A 4-bit model rounds x to int8 per block (bcnp.quant.ACTIVATION_LIMIT), so a float16 cache's 1e-4-sized
    changes move some elements across a rounding step: 0.004-0.010 scaled on these fixtures (against 1e-3 when x
    was rounded to int16), about 5% of what 4 bits cost against float (0.08-0.20), and the top token agrees with
    the float model's as often."""
    model, golden = fixture
    q4 = model.quantize(4)
    for i in (1, 2):
        prompt = golden[f"prompt_{i}"]
        exact = with_cache(model, np.float32).logits(prompt)
        want = with_cache(q4, np.float32).logits(prompt)
        got = with_cache(q4, np.float16).logits(prompt)
        assert scaled_error(got, want) <= scaled_error(want, exact) / 10
        agree = [int((y.argmax(-1) == exact.argmax(-1)).sum()) for y in (got, want)]
        assert agree[0] >= agree[1] - 1, agree


def test_greedy_tokens_with_a_float16_cache_are_the_originals(fixture):
    model, golden = fixture
    model = with_cache(model, np.float16)
    for i in (1, 2):
        tokens = model.generate(golden[f"prompt_{i}"], max_new_tokens=20, do_sample=False, repetition_penalty=1.0)
        got = list(tokens)
        assert got == list(golden[f"greedy_tokens_{i}"])[: len(got)]
        assert len(got) == 20 or golden[f"greedy_tokens_{i}"][len(got)] == model.config.eos_token_id


def test_any_split_into_steps_gives_the_same_logits_over_a_float16_cache(fixture):
    model, golden = fixture
    model = with_cache(model, np.float16)
    prompt = golden["prompt_2"]
    full = model.logits(prompt)
    cache = model.new_cache()
    split = np.concatenate([model.forward(prompt[:26], cache)] + [model.forward([t], cache) for t in prompt[26:]])
    cache = model.new_cache()
    steps = np.concatenate([model.forward([t], cache) for t in prompt])
    assert scaled_error(split, full) <= AGREEMENT and scaled_error(steps, full) <= AGREEMENT


@pytest.fixture(scope="module", params=MODELS)
def quantized(request):
    model, _ = open_fixture(request.param)
    return model.quantize(4), model


@settings(max_examples=10, deadline=None)
@given(segments=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 6)), min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
def test_a_sequence_in_a_batch_gets_what_it_gets_alone_over_float16_caches(quantized, segments, seed):
    """As tests/test_engine.py's property, on an int4 model with its default float16 cache: the same bits on
    AVX-512 builds, where every kernel adds the same sums; elsewhere a step of more than BATCH_TOKENS tokens goes
    through the prompt GEMM, whose float sums are not the matvec's, and a sequence's logits differ from its own
    by at most a tenth of what int4 quantization moves them (see test_engine.py)."""
    model, base = quantized
    rng = np.random.default_rng(seed)
    V = model.config.vocab_size
    prompts = [rng.integers(0, V, n) for n, _ in segments]
    new = [rng.integers(0, V, n) for _, n in segments]
    caches, alone = [], []
    for p, q in zip(prompts, new):
        for pool in (caches, alone):
            cache = model.new_cache(len(p) + len(q) + 1)
            assert cache.k.dtype == np.float16
            if len(p):
                model.forward(p, cache)
            pool.append(cache)
    counts = [len(q) for q in new]
    batched = transformer(np, model.w, model.config, np.concatenate(new), BatchCache(caches, counts),
                          rows=np.cumsum(counts) - 1)
    for b, cache in enumerate(alone):
        want = model.forward(new[b], cache)[-1]
        if _quant.GROUPS or sum(counts) <= BATCH_TOKENS:
            assert batched[b].tobytes() == want.tobytes()
        else:
            quantization = scaled_error(want, base.logits(np.concatenate([prompts[b], new[b]]))[-1])
            assert 0 < quantization and scaled_error(batched[b], want) <= 0.1 * quantization
        assert caches[b].length == cache.length


def test_the_engine_does_not_take_over_an_idle_cache_of_another_dtype():
    model, golden = open_fixture(MODELS[0])
    model = with_cache(model, np.float32)
    list(model.generate(golden["prompt_2"], max_new_tokens=2, do_sample=False))
    with_cache(model, np.float16)
    list(model.generate(golden["prompt_2"], max_new_tokens=2, do_sample=False))
    engine = model.engine()
    assert [cache.k.dtype for _, cache in engine.idle] == [np.float16]


# --- long prompts ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_forward_longer_than_a_chunk_goes_through_the_cache_in_chunks_with_the_same_logits(monkeypatch, dtype):
    """Model.forward runs FORWARD_CHUNK tokens per pass (no (nh, T, S) arrays of a whole 4000-token prompt)."""
    import bcnp.api
    model, golden = open_fixture(MODELS[0])
    model = with_cache(model, dtype)
    prompt = golden["prompt_2"]
    one_pass = np.asarray(transformer(np, model.w, model.config, prompt, model.new_cache(len(prompt))))
    passes = []
    monkeypatch.setattr(bcnp.api, "transformer", lambda *a, **k: passes.append(len(a[3])) or transformer(*a, **k))
    monkeypatch.setattr(bcnp.api, "FORWARD_CHUNK", 7)
    cache = model.new_cache(len(prompt) + 1)
    chunked = model.forward(prompt, cache)
    assert passes == [7, 7, 7, 7, 5] and cache.length == len(prompt) and chunked.shape == one_pass.shape
    assert scaled_error(chunked, one_pass) <= (1e-5 if dtype == np.float32 else AGREEMENT)
    if dtype == np.float32:
        assert scaled_error(chunked, golden["logits_full_2"]) <= 1e-4


# --- the command lines ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("f16-chat") / "hf"
    shutil.copytree(FIXTURES / MODELS[0] / "hf", directory)
    shutil.copy(FIXTURES / "tokenizers" / "tiny-spm.model", directory / "tokenizer.model")
    return directory


@pytest.mark.parametrize("flags, want", [([], np.float32), (["--quantize", "4"], np.float16),
                                         (["--cache-dtype", "float16"], np.float16),
                                         (["--quantize", "8", "--cache-dtype", "float32"], np.float32)])
def test_cache_dtype_flag_defaults_to_the_models_choice(chat_dir, flags, want):
    for module in (generate, serve):
        args = module.parse_args(["--model", str(chat_dir), *flags])
        assert generate.load_model(args).cache_dtype == want


def test_a_greedy_reply_with_a_float16_cache(chat_dir):
    replies = {}
    for dtype in ("float32", "float16"):
        out, err = io.StringIO(), io.StringIO()
        status = generate.main(["--model", str(chat_dir), "--prompt", "hello", "--greedy", "--max-new-tokens", "8",
                                "--cache-dtype", dtype], out, err)
        assert status == 0, err.getvalue()
        replies[dtype] = out.getvalue()
    assert replies["float16"] == replies["float32"]


@pytest.mark.parametrize("module", [generate, serve])
def test_a_bad_cache_dtype_is_a_usage_error_naming_the_flag(chat_dir, module):
    err = io.StringIO()
    kwargs = {"out": io.StringIO()} if module is generate else {}
    status = module.main(["--model", str(chat_dir), "--cache-dtype", "bfloat16"], err=err, **kwargs)
    assert status == 2 and "--cache-dtype" in err.getvalue() and "bfloat16" in err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert json.dumps(err.getvalue())        # one printable report
