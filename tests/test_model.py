"""The forward pass against the original implementation (golden logits of ../shared/fixtures, copied into
tests/fixtures), and the properties the architecture promises."""
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bcnp import Model
from bcnp.config import BAICHUAN_13B, BAICHUAN_7B, Config, ConfigError
from bcnp.forward import ROPE_INV_FREQ, alibi_slopes, attention_bias, softmax, transformer
from bcnp.cache import new_cache
from bcnp.weights import random_weights, rope_inv_freq
from conftest import FIXTURES

MODELS = ["b13-alibi-h8-l4-bf16", "b7-rope-h4-l3-fp16"]
BAICHUAN2 = ["b2-13-alibi-h8-l4-bf16", "b2-7-rope-h4-l3-fp16"]   # vocab 512: only family= tells them Baichuan2
SOURCES = ["hf", "hf-safetensors", "converted"]


def sources(name):
    return [s for s in SOURCES if s == "converted" or (FIXTURES / name / s).is_dir()]


def scaled_error(got, want):
    """SPEC §7: max |Δ| / max(1, max |logit|)."""
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


@pytest.fixture(scope="module", params=[(m, s) for m in MODELS + BAICHUAN2 for s in sources(m)],
                ids=lambda p: "-".join(p))
def loaded(request, tmp_path_factory):
    name, source = request.param
    family = "baichuan2" if name in BAICHUAN2 else None
    if source == "converted":        # the converted directory records the family: it opens without the flag
        from bcnp.convert import convert
        path = convert(FIXTURES / name / "hf", tmp_path_factory.mktemp(name) / "converted", progress=False,
                       family=family)
        return Model.from_pretrained(path), np.load(FIXTURES / name / "golden.npz")
    return Model.from_pretrained(FIXTURES / name / source, family=family), np.load(FIXTURES / name / "golden.npz")


@pytest.mark.parametrize("i", [0, 1, 2])
def test_full_forward_matches_original(loaded, i):
    model, golden = loaded
    assert scaled_error(model.logits(golden[f"prompt_{i}"]), golden[f"logits_full_{i}"]) <= 1e-4


@pytest.mark.parametrize("i", [0, 1, 2])
def test_hidden_states_match_original_layer_by_layer(loaded, i):
    model, golden = loaded
    hidden, want = model.hidden_states(golden[f"prompt_{i}"]), golden[f"hidden_{i}"]
    assert hidden.shape == want.shape
    for layer in range(len(want)):
        assert scaled_error(hidden[layer], want[layer]) <= 1e-4, f"layer {layer}"


@pytest.mark.parametrize("i", [0, 1, 2])
def test_one_token_at_a_time_matches_original(loaded, i):
    model, golden = loaded
    cache = model.new_cache()
    logits = np.concatenate([model.forward([t], cache) for t in golden[f"prompt_{i}"]])
    assert cache.length == len(golden[f"prompt_{i}"])
    assert scaled_error(logits, golden[f"logits_incr_{i}"]) <= 1e-4


def test_prefill_then_decode_matches_original(loaded):
    model, golden = loaded
    prompt, cache = golden["prompt_2"], model.new_cache()
    logits = [model.forward(prompt[:26], cache)] + [model.forward([t], cache) for t in prompt[26:]]
    assert scaled_error(np.concatenate(logits), golden["logits_prefill_decode_2"]) <= 1e-4


@pytest.mark.parametrize("i", [1, 2])
def test_greedy_continuation_is_identical(loaded, i):
    model, golden = loaded
    tokens = list(model.generate(golden[f"prompt_{i}"], max_new_tokens=20, do_sample=False,
                                 repetition_penalty=1.0))
    assert tokens == golden[f"greedy_tokens_{i}"].tolist()
    # and the logits each greedy token came from
    cache = model.new_cache()
    steps = [model.forward(golden[f"prompt_{i}"], cache)[-1:]]
    steps += [model.forward([t], cache) for t in tokens[:-1]]
    assert scaled_error(np.concatenate(steps), golden[f"greedy_step_logits_{i}"]) <= 1e-4


def test_position_tables_match_original():
    g13 = np.load(FIXTURES / MODELS[0] / "golden.npz")
    np.testing.assert_array_equal(np.float32(alibi_slopes(8)), g13["alibi_slopes"])
    np.testing.assert_allclose(alibi_slopes(8), g13["alibi_slopes_f64"], rtol=0, atol=1e-15)
    g7 = np.load(FIXTURES / MODELS[1] / "golden.npz")
    cfg = Config.from_json(FIXTURES / MODELS[1] / "hf")
    np.testing.assert_array_equal(rope_inv_freq(cfg), g7["rope_inv_freq"])


@pytest.mark.parametrize("source", ["hf", "hf-safetensors", "converted"])
def test_the_checkpoints_own_rope_table_is_the_one_used(source, tmp_path):
    """The original rotates with the stored `rotary_emb.inv_freq`; a converted directory keeps it in config.json."""
    path = FIXTURES / MODELS[1] / source
    if source == "converted":
        from bcnp.convert import convert
        path = convert(FIXTURES / MODELS[1] / "hf", tmp_path / "c", progress=False)
    model = Model.from_pretrained(path)
    config = model.config
    stored = np.load(FIXTURES / MODELS[1] / "golden.npz")["rope_inv_freq"]
    assert config.rope_inv_freq is not None
    np.testing.assert_array_equal(model.w[ROPE_INV_FREQ], stored)                     # the table the forward uses
    table = tuple(float(np.nextafter(np.float32(v), np.float32(1))) for v in config.rope_inv_freq)
    import dataclasses
    np.testing.assert_array_equal(rope_inv_freq(dataclasses.replace(config, rope_inv_freq=table)),
                                  np.float32(table))


def test_without_a_stored_table_the_rope_table_is_the_one_torch_computes():
    """Baichuan2-7B stores no table, so bcnp computes the one torch's float32 pow (SLEEF) makes. At head_dim 128
    that is the correctly rounded table (float64 pow rounded to float32, then float32's division), not the
    float64 formula rounded once (19 of 64 values differ). NumPy's own float32 pow is no reference: it depends on
    the machine (on AVX-512 builds it differed from this table in 9 of 64 values, 1-2 ulp; on an AVX2 Zen 3 it
    agreed)."""
    from bcnp.config import BAICHUAN2_7B
    ours = rope_inv_freq(BAICHUAN2_7B)
    exponents = np.arange(0, 128, 2, dtype=np.float32) / np.float32(128)
    correctly_rounded = np.float32(1) / (10000.0 ** exponents.astype(np.float64)).astype(np.float32)
    via_float64 = (1.0 / 10000.0 ** (np.arange(0, 128, 2) / 128)).astype(np.float32)
    np.testing.assert_array_equal(ours, correctly_rounded)
    assert np.count_nonzero(ours != via_float64) == 19
    for name in (MODELS[1], BAICHUAN2[1]):               # the original's tables at the fixtures' head_dim 16
        cfg = Config.from_json(FIXTURES / name / "hf", family="baichuan2" if name in BAICHUAN2 else None)
        np.testing.assert_array_equal(rope_inv_freq(cfg), np.load(FIXTURES / name / "golden.npz")["rope_inv_freq"])


@settings(max_examples=200, deadline=None)
@given(st.floats(1.01, 1e6), st.floats(0.0, 1.0))
def test_torchs_powf_is_within_one_ulp(x, y):
    from bcnp.torch_pow import powf
    x, y = np.float32(x), np.float32(y)
    exact = float(x) ** float(y)
    got = powf(x, y)
    assert abs(float(got) - exact) <= float(np.spacing(np.float32(exact)))


def rewritten_inv_freq(tmp_path, change):
    """A copy of the 7B fixture's safetensors directory with layer 0's RoPE table changed by `change`."""
    import shutil
    import safetensors.numpy
    out = tmp_path / "m"
    shutil.copytree(FIXTURES / MODELS[1] / "hf-safetensors", out)
    shard = out / "model-00001-of-00002.safetensors"
    tensors = safetensors.numpy.load_file(shard)
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    tensors[name] = change(tensors[name])
    safetensors.numpy.save_file(tensors, shard)
    return out


@pytest.mark.parametrize("change, message", [
    (lambda t: t * np.float32(1.01), "is not the RoPE table of rope_theta 10000 and head_dim 16"),
    (lambda t: t[:4], r"has shape \(4,\), expected \(8,\)"),
    (lambda t: np.nextafter(t, np.float32(2)), "differs from the RoPE table of the other layers")])
def test_a_stored_rope_table_is_checked_against_the_config(tmp_path, change, message):
    from bcnp.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d\.self_attn\.rotary_emb\.inv_freq.*" + message):
        Model.from_pretrained(rewritten_inv_freq(tmp_path, change))


def test_a_recorded_rope_table_is_checked():
    d = {**BAICHUAN_7B.to_hf_dict(), "bcnp": {"rope_inv_freq": [1.0, 0.5]}}
    with pytest.raises(ConfigError, match="bcnp.rope_inv_freq must be a list of head_dim / 2 = 64"):
        Config.from_dict(d)


# --- configuration -------------------------------------------------------------------------------------------------

def test_parameter_counts_equal_the_released_models():
    assert BAICHUAN_13B.num_parameters() == 13_264_901_120
    assert BAICHUAN_7B.num_parameters() == 7_000_559_616
    assert BAICHUAN_13B.num_parameters() * 2 == 26_529_802_240  # the released bfloat16 shards


def test_config_reads_both_architectures_and_ignores_unknown_keys():
    c13 = Config.from_dict({**BAICHUAN_13B.to_hf_dict(), "some_future_key": 1})
    c7 = Config.from_dict(BAICHUAN_7B.to_hf_dict())
    assert c13 == BAICHUAN_13B and c7 == BAICHUAN_7B
    assert (c13.position_embedding, c7.position_embedding) == ("alibi", "rope")
    assert c13.head_dim == c7.head_dim == 128


def test_config_errors_name_the_field():
    d = BAICHUAN_13B.to_hf_dict()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        Config.from_dict(d)
    with pytest.raises(ConfigError, match="not a Baichuan config"):
        Config.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 8})


# --- ALiBi ---------------------------------------------------------------------------------------------------------

@given(st.integers(0, 9))
def test_alibi_slopes_of_a_power_of_two_are_the_closed_form(k):
    n = 2 ** k
    np.testing.assert_allclose(alibi_slopes(n), [2 ** (-8 * (i + 1) / n) for i in range(n)], rtol=1e-12)


@given(st.integers(1, 300))
def test_alibi_slopes_compose_from_the_neighbouring_powers_of_two(n):
    slopes = alibi_slopes(n)
    assert len(slopes) == n and all(0 < s < 1 for s in slopes)
    p = 2 ** math.floor(math.log2(n))
    assert slopes[:p] == alibi_slopes(p)
    assert slopes[p:] == alibi_slopes(2 * p)[0::2][: n - p]


def test_alibi_slopes_of_baichuan_13b_forty_heads():
    slopes = alibi_slopes(40)
    np.testing.assert_allclose(slopes[:32], [2 ** (-0.25 * (h + 1)) for h in range(32)], rtol=1e-12)
    np.testing.assert_allclose(slopes[32:], [2 ** (-0.125 * (2 * h + 1)) for h in range(8)], rtol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_alibi_relative_bias_gives_the_original_softmax(n_heads, T, seed):
    """The original adds slope·j; bcnp adds slope·(j - i): the row shift cancels in the softmax."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n_heads, T, T)).astype(np.float32)
    cfg = Config(vocab_size=8, hidden_size=n_heads * 2, intermediate_size=8, num_hidden_layers=1,
                 num_attention_heads=n_heads, max_position=64, position_embedding="alibi")
    pos = np.arange(T)
    ours = softmax(np, scores + attention_bias(np, cfg, pos, pos))
    slopes = np.float32(alibi_slopes(n_heads))[:, None, None]
    original = np.where(pos[None, :] > pos[:, None], np.finfo(np.float32).min, 0) + slopes * pos[None, None, :]
    np.testing.assert_allclose(ours, softmax(np, scores + original.astype(np.float32)), atol=2e-6)
    assert np.all(np.triu(ours, 1) == 0)          # no weight on future keys


# --- the KV cache ----------------------------------------------------------------------------------------------------

def tiny_config(position_embedding, heads=4, layers=2):
    return Config(vocab_size=97, hidden_size=heads * 8, intermediate_size=40, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position=80, position_embedding=position_embedding)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["alibi", "rope"]), st.integers(0, 2**32 - 1),
       st.lists(st.integers(1, 12), min_size=1, max_size=6))
def test_cached_decoding_equals_full_recompute_for_any_split(position_embedding, seed, chunks):
    cfg = tiny_config(position_embedding)
    w = random_weights(cfg, seed=seed % 1000, std=0.3)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, sum(chunks))
    full = transformer(np, w, cfg, ids, new_cache(np, cfg))
    cache, parts, start = new_cache(np, cfg), [], 0
    for n in chunks:
        parts.append(transformer(np, w, cfg, ids[start:start + n], cache))
        start += n
    assert cache.length == len(ids)
    assert scaled_error(np.concatenate(parts), full) <= 1e-5


def test_context_overflow_is_a_clear_error():
    cfg = tiny_config("alibi")
    model = Model(cfg, random_weights(cfg))
    with pytest.raises(ValueError, match="context"):
        list(model.generate(np.zeros(cfg.max_position, dtype=int), max_new_tokens=1, do_sample=False))
    with pytest.raises(ValueError, match="token ids"):
        model.logits([cfg.vocab_size])


# --- public methods check their inputs -------------------------------------------------------------------------------

def tiny_model(**weights_changes):
    cfg = tiny_config("alibi")
    w = random_weights(cfg)
    for name, change in weights_changes.items():
        change(w[name.replace("__", ".")])
    return Model(cfg, w)


@pytest.mark.parametrize("ids", [[-1], [97], ["a"], [[1, 2]], [], "hello"])
def test_next_logits_and_forward_refuse_ids_outside_the_vocabulary(ids):
    """next_logits([-1], cache) used to read the last row of the embedding."""
    model = tiny_model()
    for method in (model.next_logits, model.forward):
        with pytest.raises(ValueError, match="token ids must be"):
            method(ids, model.new_cache(8))


@pytest.mark.parametrize("max_len", [0, -1, 81, 2.5, "8", True])
def test_new_cache_refuses_a_length_outside_the_context(max_len):
    with pytest.raises(ValueError, match=r"max_len must be an integer in \[1, 80\]"):
        tiny_model().new_cache(max_len)


class NoMemory:
    """An array module that cannot allocate, like NumPy asked for 1.7 TB."""
    float32 = np.float32

    @staticmethod
    def zeros(shape, dtype):
        raise MemoryError("Unable to allocate")


def test_a_cache_that_cannot_be_allocated_says_how_much_the_context_needs():
    cfg = Config(**{**BAICHUAN_13B.__dict__, "max_position": 2**20})
    with pytest.raises(MemoryError, match=r"the context of 1048576 tokens needs 1718\.0 GB of KV cache"):
        new_cache(NoMemory, cfg)
    overcommit = pathlib.Path("/proc/sys/vm/overcommit_memory")
    if not overcommit.exists() or overcommit.read_text().strip() != "1":     # else 1.7 TB "succeed", lazily
        with pytest.raises(MemoryError, match="the context of 1048576 tokens needs"):
            Model(cfg, {}).new_cache()


def test_quantizing_again_to_other_bits_is_refused_and_to_the_same_bits_changes_nothing():
    """model.quantize(8).quantize(4) used to stay 8-bit silently."""
    q8 = tiny_model().quantize(8)
    with pytest.raises(ValueError, match=r"quantize\(4\): the model is already quantized \(.* has 8 bits\)"):
        q8.quantize(4)
    again = q8.quantize(8)
    assert all(again.w[k] is v for k, v in q8.w.items() if k != "model.embed_tokens.weight")
    assert tiny_model().quantize(4).quantize(4).w["lm_head.weight"].bits == 8
    for bits in (16, True, "8"):
        with pytest.raises(ValueError, match="bits must be 8 or 4"):
            tiny_model().quantize(bits)


@pytest.mark.parametrize("settings, message", [
    (dict(max_new_tokens="abc"), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_generate_checks_its_settings_when_called_not_at_the_first_token(settings, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().generate([1, 2], **settings)                      # no next(): nothing computed yet


@pytest.mark.parametrize("do_sample", [False, True])
def test_generation_stops_with_a_clear_error_when_the_logits_are_not_finite(do_sample):
    """One NaN weight used to print '⁇ ⁇ ⁇' with exit status 0 under greedy decoding."""
    model = tiny_model(lm_head__weight=lambda w: w.__setitem__((5, 3), np.nan))
    with pytest.raises(ValueError, match="the logits at position 2 are not finite"):
        list(model.generate([1, 2, 3], max_new_tokens=4, do_sample=do_sample, seed=0))
    overflowing = tiny_model(model__norm__weight=lambda w: w.__setitem__(slice(None), 1e38),
                             lm_head__weight=lambda w: w.__setitem__(slice(None), 1e38))     # float32 overflows
    with pytest.raises(ValueError, match="not finite"):
        list(overflowing.generate([1], max_new_tokens=2, do_sample=do_sample, seed=0))


def test_a_bad_generation_config_is_refused_when_the_model_is_opened(tmp_path):
    import shutil
    from bcnp.config import ConfigError
    model_dir = shutil.copytree(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf-safetensors", tmp_path / "m")
    (model_dir / "generation_config.json").write_text('{"eos_token_id": 512}')          # vocab_size is 512
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id must be a token id in \[0, 511\]"):
        Model.from_pretrained(model_dir)


def test_importing_bcnp_never_imports_torch():
    code = ("import sys, bcnp, bcnp.convert, bcnp.checkpoint, bcnp.cache, bcnp.api, bcnp.gpu.graphs; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_cache_takes_memory_only_where_it_is_written():
    """NumPy's large arrays ask for 2 MB huge pages: one token per head would make whole rows resident."""
    import resource
    from bcnp.cache import cache_zeros

    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    before = resident_mb()
    k = cache_zeros(np, (4, 40, 4096, 128), np.float32)          # 336 MB: four 13B-width layers
    k[:, :, :22] = 1.0
    assert resident_mb() - before < 40 and k.sum() == 4 * 40 * 22 * 128
