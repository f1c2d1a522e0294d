"""Streamed text of the server: stop strings are matched on the text across any split into pieces, never sent,
and what is sent is the text cut before the first of them; tokens shown as log-probabilities show their bytes."""
import pathlib

import pytest
from hypothesis import given, settings, strategies as st

from bcnp.demo import build_demo_model
from bcnp.server.text import ChoiceText, StopMatcher, token_text
from bcnp.tokenizer import Tokenizer

ALPHABET = "ab\n:世"


def cut_at_first_stop(text, stops):
    """The text before the stop string that is complete first, reading from the left (the longest one there)."""
    for end in range(len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[:end - max(map(len, ending))]
    return text


def pieces_of(text, cuts):
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=300, deadline=None)
@given(text=st.text(ALPHABET, max_size=30), cuts=st.lists(st.integers(0, 40), max_size=10),
       stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3))
def test_what_is_sent_is_the_text_cut_before_the_first_stop_string(text, cuts, stops):
    matcher = StopMatcher(stops)
    sent = []
    for piece in pieces_of(text, cuts):
        sent.append(matcher.put(piece))
        assert not any(s in "".join(sent) for s in stops)           # never sent, not even in part ahead of time
    sent.append(matcher.end())
    assert "".join(sent) == cut_at_first_stop(text, stops)
    assert matcher.stopped == (cut_at_first_stop(text, stops) != text or any(s in text for s in stops))


def test_text_that_may_start_a_stop_string_waits_for_the_next_piece():
    matcher = StopMatcher(["\nUser:"])
    assert matcher.put("Hello\nUs") == "Hello"
    assert matcher.put("ually") == "\nUsually"
    assert matcher.put(" fine\nUse") == " fine"
    assert (matcher.put("r: hi"), matcher.stopped) == ("", True)
    assert matcher.put("more") == "" and matcher.end() == ""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(pathlib.Path(build_demo_model(tmp_path_factory.mktemp("text") / "demo")) / "tokenizer.model")


@settings(max_examples=50, deadline=None)
@given(text=st.text("ab 世界\u00e9\U0001f600", min_size=1, max_size=12), stop=st.sampled_from(["界", "b 世", "\U0001f600"]))
def test_a_choice_streams_whole_characters_and_stops_on_the_decoded_text(tokenizer, text, stop):
    ids = tokenizer.encode(text)
    choice, sent = ChoiceText(tokenizer, [stop]), []
    for token in ids:
        sent.append(choice.put(token))
        assert "\ufffd" not in sent[-1]                             # never half a character (emoji are bytes here)
        if choice.stopped:
            break
    sent.append(choice.end())
    assert "".join(sent) == cut_at_first_stop(tokenizer.decode(ids), [stop])


def test_log_probability_tokens_show_their_bytes(tokenizer):
    ids = tokenizer.encode("a世\U0001f600")
    shown = [token_text(tokenizer, t) for t in ids]
    assert b"".join(t.data for t in shown).decode("utf-8").strip() == "a世\U0001f600"
    byte_pieces = [t for t, i in zip(shown, ids) if tokenizer.is_byte(i)]
    assert byte_pieces and all(t.text.startswith("bytes:\\x") and len(t.data) == 1 for t in byte_pieces)
