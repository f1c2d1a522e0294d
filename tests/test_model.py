"""The forward pass against the original implementation (golden logits of ../shared/fixtures, copied into
tests/fixtures), and the properties the architecture promises."""
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bcnp import Model
from bcnp.config import BAICHUAN_13B, BAICHUAN_7B, Config, ConfigError
from bcnp.model import alibi_slopes, attention_bias, new_cache, random_weights, softmax, transformer
from conftest import FIXTURES

MODELS = ["b13-alibi-h8-l4-bf16", "b7-rope-h4-l3-fp16"]
SOURCES = ["hf", "hf-safetensors", "converted"]


def scaled_error(got, want):
    """SPEC §7: max |Δ| / max(1, max |logit|)."""
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


@pytest.fixture(scope="module", params=[(m, s) for m in MODELS for s in SOURCES], ids=lambda p: "-".join(p))
def loaded(request, tmp_path_factory):
    name, source = request.param
    if source == "converted":
        from bcnp.convert import convert
        path = convert(FIXTURES / name / "hf", tmp_path_factory.mktemp(name) / "converted", progress=False)
    else:
        path = FIXTURES / name / source
    return Model.from_pretrained(path), np.load(FIXTURES / name / "golden.npz")


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
    from bcnp.model import rope_inv_freq
    g7 = np.load(FIXTURES / MODELS[1] / "golden.npz")
    cfg = Config.from_json(FIXTURES / MODELS[1] / "hf")
    np.testing.assert_allclose(rope_inv_freq(np, cfg), g7["rope_inv_freq"], rtol=1e-6, atol=0)


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


def test_importing_bcnp_never_imports_torch():
    code = ("import sys, bcnp, bcnp.convert, bcnp.checkpoint, bcnp.model; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
