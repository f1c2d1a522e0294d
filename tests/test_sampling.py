"""Sampling (SPEC §3): each step of the Hugging Face order as a property, then next_token and GenerationConfig."""
import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bcnp.config import ConfigError
from bcnp.sampling import (GenerationConfig, apply_repetition_penalty, apply_temperature, next_token, softmax,
                           top_k_filter, top_p_filter)

finite = st.floats(-30, 30, allow_nan=False, width=32)
logit_vectors = arrays(np.float32, st.integers(1, 40), elements=finite)
distinct_logit_vectors = arrays(np.float32, st.integers(1, 40), elements=finite, unique=True)

SAMPLE = dict(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0, do_sample=True)
GREEDY = dict(SAMPLE, do_sample=False)


def kept(logits):
    return set(np.flatnonzero(logits > -np.inf).tolist())


# --- repetition penalty ------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(logit_vectors, st.data(), st.floats(1.01, 3.0))
def test_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens(logits, data, penalty):
    seen = data.draw(st.lists(st.integers(0, len(logits) - 1), max_size=10))   # repeats count once
    out = apply_repetition_penalty(logits, seen, penalty)
    for i, (before, after) in enumerate(zip(logits, out)):
        if i not in seen:
            assert after == before
        elif before > 0:
            assert after == np.float32(before / np.float32(penalty)) and (after < before or before < np.finfo(np.float32).tiny)
        else:
            assert after == np.float32(before * np.float32(penalty)) and after <= before
    assert logits is out or not np.shares_memory(logits, out)       # the input is left alone


def test_penalty_one_or_nothing_seen_changes_nothing():
    logits = np.array([1.0, -1.0, 0.5], dtype=np.float32)
    assert np.array_equal(apply_repetition_penalty(logits, [0, 1], 1.0), logits)
    assert np.array_equal(apply_repetition_penalty(logits, [], 1.3), logits)


# --- temperature -------------------------------------------------------------------------------------------------

def test_temperature_divides_the_distances_from_the_largest_logit():
    logits = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    assert np.array_equal(apply_temperature(logits, 0.5), (logits - 1.0) * 2)
    np.testing.assert_allclose(softmax(apply_temperature(logits, 0.5)), softmax(logits / 0.5), rtol=1e-6)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        apply_temperature(logits, 0.0)


@settings(max_examples=200, deadline=None)
@given(logit_vectors, st.sampled_from([1e-6, 1e-30, 1e-45, 1e-50, 1e-300, 5e-324]))
def test_a_tiny_temperature_stays_finite_and_is_greedy(logits, temperature):
    """1e-45 used to turn every logit into +-inf and the probabilities into NaN."""
    scaled = apply_temperature(logits, temperature)
    assert not np.isnan(scaled).any() and scaled.max() == 0 and (scaled <= 0).all()
    probabilities = softmax(scaled)
    assert np.isfinite(probabilities).all() and probabilities.sum() == pytest.approx(1.0)
    top_two = np.sort(logits)[-2:]
    if len(logits) == 1 or top_two[1] - top_two[0] > 50 * temperature:      # else it is not greedy yet
        token = next_token(logits, [], rng=np.random.default_rng(0), **dict(SAMPLE, temperature=temperature))
        assert token == int(np.argmax(logits))


# --- top-k ---------------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(distinct_logit_vectors, st.data())
def test_top_k_keeps_exactly_the_k_largest_distinct_logits(logits, data):
    k = data.draw(st.integers(1, len(logits)))
    out = top_k_filter(logits, k)
    assert kept(out) == set(np.argsort(-logits)[:k].tolist())
    assert np.array_equal(out[list(kept(out))], logits[list(kept(out))])


def test_top_k_keeps_every_tie_at_the_kth_value_like_hugging_face():
    logits = np.array([3.0, 1.0, 2.0, 2.0, 0.0], dtype=np.float32)
    assert kept(top_k_filter(logits, 2)) == {0, 2, 3}
    assert kept(top_k_filter(logits, 0)) == {0, 1, 2, 3, 4}          # 0 = off


# --- top-p ---------------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(distinct_logit_vectors, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_that_reaches_top_p(logits, top_p):
    probs = softmax(logits)
    keep = np.argsort(-logits)[:len(kept(top_p_filter(logits, top_p)))]
    assert set(keep.tolist()) == kept(top_p_filter(logits, top_p))    # the most likely ones
    mass = probs[keep].sum()
    assume(abs(mass - top_p) > 1e-9 and abs(mass - probs[keep[-1]] - top_p) > 1e-9)   # not at the exact edge
    assert mass >= top_p or len(keep) == len(logits)                   # reaches top_p ...
    assert mass - probs[keep[-1]] < top_p                              # ... and one token fewer would not


def test_top_p_keeps_at_least_one_token_and_works_on_what_top_k_left():
    logits = np.array([10.0, 0.0, 0.0], dtype=np.float32)
    assert kept(top_p_filter(logits, 0.01)) == {0}
    # after top-k the probabilities are those among the survivors: 0.5 / 0.5, so top_p 0.6 needs both
    logits = top_k_filter(np.array([1.0, 1.0, -5.0, -5.0], dtype=np.float32), 2)
    assert kept(top_p_filter(logits, 0.6)) == {0, 1}
    assert kept(top_p_filter(logits, 1.0)) == {0, 1}


# --- next_token ----------------------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(logit_vectors, st.integers(0, 2**32), st.integers(0, 5), st.floats(0.05, 1.0))
def test_a_seed_gives_the_same_tokens(logits, seed, top_k, top_p):
    settings_ = dict(SAMPLE, top_k=top_k, top_p=top_p, repetition_penalty=1.1)
    draws = [[next_token(logits, [0], rng=rng, **settings_) for _ in range(5)]
             for rng in (np.random.default_rng(seed), np.random.default_rng(seed))]
    assert draws[0] == draws[1]


@settings(max_examples=200, deadline=None)
@given(logit_vectors, st.integers(0, 2**32), st.integers(0, 5), st.floats(0.05, 1.0), st.lists(st.integers(0, 0)))
def test_samples_only_what_penalty_top_k_and_top_p_leave(logits, seed, top_k, top_p, seen):
    token = next_token(logits, seen, rng=np.random.default_rng(seed),
                       **dict(SAMPLE, top_k=top_k, top_p=top_p, repetition_penalty=1.3))
    allowed = top_p_filter(top_k_filter(apply_temperature(apply_repetition_penalty(logits, seen, 1.3), 0.7), top_k),
                           top_p)
    assert token in kept(allowed)


@settings(max_examples=200, deadline=None)
@given(logit_vectors, st.integers(0, 2**32), st.integers(0, 5), st.floats(0.05, 1.0))
def test_a_draw_among_the_kept_tokens_is_the_draw_over_the_whole_vocabulary(logits, seed, top_k, top_p):
    """next_token draws only among the tokens top-k/top-p keep; with the same seed that is the token a draw over
    all V (zero probability elsewhere, Hugging Face's way) picks."""
    token = next_token(logits, [], rng=np.random.default_rng(seed), **dict(SAMPLE, top_k=top_k, top_p=top_p))
    allowed = top_p_filter(top_k_filter(apply_temperature(logits, 0.7), top_k), top_p)
    assert token == np.random.default_rng(seed).choice(len(logits), p=softmax(allowed))


@settings(max_examples=200, deadline=None)
@given(distinct_logit_vectors, st.integers(0, 2**32), st.integers(0, 5), st.floats(0.05, 1.0))
def test_temperature_towards_zero_is_greedy(logits, seed, top_k, top_p):
    top_two = np.sort(logits)[-2:]
    assume(len(logits) == 1 or top_two[1] - top_two[0] > 1e-2)
    sampled = next_token(logits, [], rng=np.random.default_rng(seed),
                         **dict(SAMPLE, temperature=1e-4, top_k=top_k, top_p=top_p))
    assert sampled == next_token(logits, [], **GREEDY) == int(np.argmax(logits))


def test_greedy_still_applies_the_repetition_penalty():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    assert next_token(logits, [], **GREEDY) == 0
    assert next_token(logits, [0], **dict(GREEDY, repetition_penalty=1.1)) == 1


def test_sampling_follows_the_softmax_probabilities():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    rng = np.random.default_rng(0)
    counts = np.bincount([next_token(logits, [], rng=rng, **dict(SAMPLE, temperature=1.0)) for _ in range(4000)],
                         minlength=3)
    assert np.allclose(counts / 4000, [0.5, 0.3, 0.2], atol=0.03)


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(temperature="0.7"), "temperature must be a finite number > 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(top_k=True), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be a number in \(0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number > 0"),
    (dict(do_sample="yes"), "do_sample must be true or false"),
])
def test_settings_out_of_range_are_a_clear_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        next_token(np.zeros(4, dtype=np.float32), [], rng=np.random.default_rng(0), **dict(SAMPLE, **bad))


@pytest.mark.parametrize("logits", [[0.0, np.nan], [np.inf, 0.0], [-np.inf, -np.inf]])
def test_logits_that_cannot_be_sampled_are_a_clear_value_error(logits):
    for mode in (SAMPLE, GREEDY):
        with pytest.raises(ValueError, match="the logits hold NaN or \\+inf, or every token is removed"):
            next_token(np.array(logits, dtype=np.float32), [], rng=np.random.default_rng(0), **mode)


@settings(max_examples=100, deadline=None)
@given(logit_vectors, st.sampled_from([1e-45, 1e-30, 1e30, 3e38]), st.integers(0, 2**32))
def test_an_extreme_repetition_penalty_saturates_instead_of_overflowing(logits, penalty, seed):
    seen = list(range(len(logits)))
    penalized = apply_repetition_penalty(logits, seen, penalty)
    assert np.isfinite(penalized).all()
    exact = np.where(logits < 0, logits.astype(np.float64) * penalty, logits.astype(np.float64) / penalty)
    assert (np.diff(penalized[np.argsort(exact, kind="stable")]) >= 0).all()        # the order is kept
    assert 0 <= next_token(logits, seen, rng=np.random.default_rng(seed), **dict(SAMPLE, repetition_penalty=penalty)) \
        < len(logits)


def test_greedy_ignores_the_temperature():
    assert next_token(np.array([0.0, 1.0], dtype=np.float32), [], **dict(GREEDY, temperature=0.0)) == 1


# --- GenerationConfig ----------------------------------------------------------------------------------------------

def test_generation_config_defaults_are_baichuan_13b_chat():
    g = GenerationConfig()
    assert (g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.repetition_penalty, g.do_sample) == (
        2048, 0.3, 5, 0.85, 1.1, True)
    assert (g.eos_token_id, g.user_token_id, g.assistant_token_id, g.bos_token_id, g.pad_token_id) == (
        2, 195, 196, 1, 0)


def test_generation_config_from_json(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.9, "top_k": 0, "user_token_id": 7, "transformers_version": "4.29.2"}))   # unknown: ignored
    g = GenerationConfig.from_json(tmp_path)
    assert (g.temperature, g.top_k, g.user_token_id, g.top_p) == (0.9, 0, 7, 0.85)
    assert GenerationConfig.from_json(tmp_path / "generation_config.json") == g
    assert GenerationConfig.from_json(tmp_path / "elsewhere") == GenerationConfig()       # missing: defaults
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json: generation_config.json is not valid JSON"):
        GenerationConfig.from_json(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", "abc", "max_new_tokens must be an integer >= 1, got 'abc'"),
    ("max_new_tokens", None, "max_new_tokens must be an integer >= 1, got None"),
    ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens", 2048.0, "max_new_tokens must be an integer >= 1"),
    ("temperature", "hot", "temperature must be a finite number > 0"),
    ("temperature", 0, "temperature must be a finite number > 0"),
    ("top_k", True, "top_k must be an integer >= 0"),
    ("top_p", 2, r"top_p must be a number in \(0, 1\]"),
    ("repetition_penalty", -1, "repetition_penalty must be a finite number > 0"),
    ("do_sample", "true", "do_sample must be true or false"),
    ("eos_token_id", "two", r"eos_token_id must be a token id in \[0, 511\], got 'two'"),
    ("eos_token_id", 512, r"eos_token_id must be a token id in \[0, 511\]"),
    ("user_token_id", -1, "user_token_id must be a token id"),
    ("assistant_token_id", [196], "assistant_token_id must be a token id"),
])
def test_generation_config_fields_are_checked_when_read(tmp_path, field, value, message):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"temperature": 0.3, field: value}))
    with pytest.raises(ConfigError, match=f"{path}: {message}"):
        GenerationConfig.from_json(tmp_path, vocab_size=512)


@pytest.mark.parametrize("content, message", [(b"[" * 100_000, "is nested too deeply"),
                                              ('{"top_k": "\xe9"}'.encode("latin-1"), "is not UTF-8"),
                                              (b"[]", "must be a JSON object")], ids=["deep", "latin-1", "list"])
def test_an_unreadable_generation_config_names_the_file(tmp_path, content, message):
    (tmp_path / "generation_config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'generation_config.json'}: generation_config.json {message}"):
        GenerationConfig.from_json(tmp_path)
