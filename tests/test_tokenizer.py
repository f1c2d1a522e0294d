"""The tokenizer (SPEC §3) and the streaming detokenizer.

The tiny SentencePiece model in tests/fixtures/tokenizers always runs; Baichuan's released tokenizers are not
ours to ship and are found through $BCNP_TOKENIZER_DIR (skipped without it)."""
import functools
import json
import os
import pathlib
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bcnp.tokenizer import StreamDecoder, Tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tokenizers" / "tiny-spm.model"


def released_tokenizer_path(name):
    directory = os.environ.get("BCNP_TOKENIZER_DIR")
    path = pathlib.Path(directory) / f"{name}.model" if directory else None
    if path is None or not path.is_file():
        pytest.skip(f"{name}.model not found (set BCNP_TOKENIZER_DIR to the folder holding the released tokenizers)")
    return path


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer(TINY)


@pytest.fixture(scope="module")
def baichuan13b():
    return Tokenizer(released_tokenizer_path("baichuan-13b"))


@pytest.fixture(scope="module", params=["tiny-spm", "baichuan-13b"])
def any_tokenizer(request):
    if request.param == "tiny-spm":
        return Tokenizer(TINY)
    return Tokenizer(released_tokenizer_path("baichuan-13b"))


# --- encode / decode and the special ids -----------------------------------------------------------------------

def test_tiny_special_ids_come_from_the_model_file(tiny):
    assert tiny.vocab_size == len(tiny) == 512
    assert (tiny.unk_id, tiny.bos_id, tiny.eos_id) == (0, 1, 2)
    assert tiny.pad_id == 0                 # no pad piece in the file: pad = unk, as Baichuan's tokenizer_config


def test_tokenizer_config_beside_the_model_names_special_pieces(tmp_path):
    shutil.copy(TINY, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "pad_token": "</s>",
        "eos_token": {"__type": "AddedToken", "content": "<s>"},
        "unk_token": "<no such piece>",      # not in the vocabulary: ignored
    }))
    t = Tokenizer(tmp_path / "tokenizer.model")
    assert (t.pad_id, t.eos_id, t.unk_id, t.bos_id) == (2, 1, 0, 1)


@pytest.mark.parametrize("content, message", [
    (b"[" * 100_000, "tokenizer_config.json is nested too deeply"),
    ('{"pad_token": "\xe9"}'.encode("latin-1"), "tokenizer_config.json is not UTF-8"),
    (b'{"bos_token": 5}', r"bos_token must be a piece \(a string or \{\"content\": string\}\), got 5"),
    (b'{"eos_token": {"content": ["</s>"]}}', "eos_token must be a piece"),
], ids=["deep", "latin-1", "number", "list"])
def test_a_bad_tokenizer_config_is_a_config_error_naming_the_file(tmp_path, content, message):
    from bcnp.config import ConfigError
    shutil.copy(TINY, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'tokenizer_config.json'}: {message}"):
        Tokenizer(tmp_path / "tokenizer.model")


@pytest.mark.parametrize("text, where", [("a\udcffb", "byte 0xff at character 1"),
                                         ("\ud800", "a lone surrogate U\\+D800 at character 0")])
def test_text_that_is_not_utf8_is_a_value_error_not_a_pybind11_message(tiny, text, where):
    """Undecodable bytes in sys.argv or stdin arrive as surrogate escapes ('\\xff' -> U+DCFF)."""
    with pytest.raises(ValueError, match=f"encode: the text is not valid UTF-8 \\({where}\\)"):
        tiny.encode(text)


def test_encode_is_plain_sentencepiece_without_bos_or_eos(tiny):
    cases = json.loads((FIXTURES / "chat_input.json").read_text(encoding="utf-8"))["cases"]
    for case in cases:
        if case["tokenizer"] == "tiny-spm":
            for message, ids in zip(case["messages"], case["content_token_ids"]):
                assert tiny.encode(message["content"]) == ids
    assert tiny.encode("") == []
    assert tiny.bos_id not in tiny.encode("hello") and tiny.eos_id not in tiny.encode("hello")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]) | st.sampled_from("世界你好\n\t"),
               max_size=40))
def test_decode_inverts_encode_on_normalized_text(tiny, text):
    # ASCII, these CJK characters, newline and tab are unchanged by nmt_nfkc; spaces are kept as they are
    assert tiny.decode(tiny.encode(text)) == text


def test_user_errors_are_clear(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="no such tokenizer model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "garbage.model").write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "garbage.model")
    with pytest.raises(ValueError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        tiny.decode([5, 512])
    with pytest.raises(TypeError, match="expected str"):
        tiny.encode(b"bytes")


# --- the released Baichuan-13B tokenizer (SPEC §3) -------------------------------------------------------------

def test_baichuan13b_facts(baichuan13b):
    t = baichuan13b
    assert t.vocab_size == 64000
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, 0)
    assert t.encode("世界上第二高的山峰是哪一座?") == [31106, 13839, 3268, 7464, 31452, 32312, 31161, 31853, 23403, 81]
    assert t.encode("Hello world") == [24568, 1275]
    assert (t.id_to_piece(195), t.id_to_piece(196)) == ("<reserved_102>", "<reserved_103>")
    assert t.is_byte(t.sp.piece_to_id("<0xE4>"))


def test_baichuan13b_differs_from_7b_in_ids_93_to_99(baichuan13b):
    b7 = Tokenizer(released_tokenizer_path("baichuan-7b"))
    differ = [i for i in range(64000) if baichuan13b.id_to_piece(i) != b7.id_to_piece(i)]
    assert differ == list(range(93, 100))
    assert all(set(baichuan13b.id_to_piece(i)) == {"▁"} for i in differ)      # runs of '▁' (whitespace)


# --- streaming ---------------------------------------------------------------------------------------------------

def stream(tokenizer, ids):
    decoder = StreamDecoder(tokenizer)
    return [decoder.put(i) for i in ids] + [decoder.end()]


def test_stream_holds_byte_pieces_until_the_character_is_complete(tiny):
    ids = tiny.encode("a😀b")                        # 😀 is not a tiny-spm piece: four byte pieces F0 9F 98 80
    pieces = [tiny.id_to_piece(i) for i in ids]
    assert pieces == ["▁a", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "b"]
    assert stream(tiny, ids) == ["a", "", "", "", "😀", "b", ""]


def test_stream_keeps_the_spaces_that_decoding_one_piece_alone_drops(tiny):
    ids = tiny.encode("hello world")
    assert tiny.decode([ids[-2]]) == "or"           # '▁w' alone decodes without its space ...
    assert "".join(stream(tiny, ids)) == "hello world"
    assert " w" in stream(tiny, ids)                 # ... but the stream prints it


def test_stream_across_control_tokens(tiny):
    # </s> prints nothing and does not end the start of the text: ' world' after it keeps its space
    ids = [tiny.bos_id] + tiny.encode("hello") + [tiny.eos_id] + tiny.encode("world") + [tiny.eos_id]
    assert tiny.decode(ids) == "hello world"
    assert "".join(stream(tiny, ids)) == "hello world"
    assert "".join(stream(tiny, [tiny.eos_id] + tiny.encode("world"))) == "world"


def test_stream_decoder_starts_afresh_after_end(tiny):
    decoder = StreamDecoder(tiny)
    for text in ["  two spaces", "世界 😀", "hello"]:
        ids = tiny.encode(text)
        assert "".join(decoder.put(i) for i in ids) + decoder.end() == tiny.decode(ids)


@functools.lru_cache(maxsize=None)
def id_sequences(tokenizer):
    """Random ids, half of them byte-fallback pieces so that characters split, complete and break, and the
    unknown and control ids 0, 1, 2."""
    byte_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_byte(i)]
    utf8_starts = [i for i in byte_ids if int(tokenizer.id_to_piece(i)[3:5], 16) >= 0xC2]
    return st.lists(st.one_of(st.integers(0, tokenizer.vocab_size - 1), st.sampled_from(byte_ids),
                              st.sampled_from(utf8_starts), st.sampled_from([0, 1, 2])), max_size=24)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_streamed_pieces_concatenate_to_the_full_decode(any_tokenizer, data):
    ids = data.draw(id_sequences(any_tokenizer))
    assert "".join(stream(any_tokenizer, ids)) == any_tokenizer.decode(ids)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\ufffd"), max_size=40))
def test_stream_of_valid_text_never_prints_a_replacement_character(any_tokenizer, text):
    ids = any_tokenizer.encode(text)
    pieces = stream(any_tokenizer, ids)
    assert "".join(pieces) == any_tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)
